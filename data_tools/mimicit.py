"""MIMIC-IT's published layout → mmtrain instruction-episode shards (kind "mimicit").

Input (as released with Otter, see docs/formats.md):

- `X_instructions.json`: {"meta": {...}, "data": {ins_id: {"instruction", "answer", "image_ids", "rel_ins_ids"}}}
- `X.parquet`: one row per image, indexed by image id, column `base64` (or the legacy `X.json`:
  {image_id: base64})
- optional `X_train.json`: {ins_id: [in-context ins_ids]}; when given its keys are the episodes.

Memory: the instructions and train-config files are single JSON objects, so they are loaded whole
(unavoidable without a streaming JSON parser; they hold text only). Parquet images are never loaded
whole: only the id column is read up front, and an image is read with its row group's `base64`
column, the last two row groups kept (so memory is bounded by the row-group size, not the file
size). A legacy images JSON is one object and is loaded whole.

Video tasks (DC, E4D, TVC, ...) list a clip's frame ids in `image_ids`; with `video=True`
(`--video`) they are written as the turn's `frames` instead of `images`. This is a flag, not a
guess: MIMIC-IT's frame ids and image ids have the same `X_IMG_...` shape.

Output: shards + `manifest.json` (corpus "mimicit", stats by skip reason) through
`data_tools.sharding.run_conversion`, resumable by episode position. A broken episode (unknown
instruction or image id, bad base64, bytes that are not an image) is skipped and counted by
reason; a missing or malformed input *file* is an error naming the file.
"""

from __future__ import annotations

import collections
import itertools
import json
import os
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

from mmtrain.data.formats import FormatError, validate_episode

from . import DataToolError
from .inputs import decode_base64, file_stamp, load_json, open_parquet, require_file, sniff_image_ext
from .sharding import ConvertResult, Record, run_conversion, sample_key, skipped

IN_CONTEXT_MODES = ("train-config", "rel-ins", "none")
PARQUET_CACHED_ROW_GROUPS = 2

# Skip reasons.
SKIP_MISSING_INSTRUCTION = "missing_instruction"
SKIP_BAD_INSTRUCTION = "bad_instruction"
SKIP_NO_IMAGE_IDS = "bad_image_ids"
SKIP_MISSING_IMAGE = "missing_image"
SKIP_BAD_BASE64 = "bad_base64"
SKIP_UNKNOWN_IMAGE_FORMAT = "unknown_image_format"
SKIP_INVALID_RECORD = "invalid_record"


# ----------------------------------------------------------------------------------------------
# Input files


def load_instructions(path: str) -> Dict[str, Dict]:
    """The `data` object of an `X_instructions.json`, checked to be {ins_id: object}."""
    body = load_json(path, "--instructions")
    if not isinstance(body, dict) or not isinstance(body.get("data"), dict):
        raise DataToolError(f'{path}: expected {{"meta": ..., "data": {{ins_id: {{...}}}}}} (MIMIC-IT instructions)')
    return body["data"]


def load_train_config(path: str) -> Dict[str, List[str]]:
    body = load_json(path, "--train-config")
    if not isinstance(body, dict) or not all(isinstance(v, list) for v in body.values()):
        raise DataToolError(f"{path}: expected {{ins_id: [in-context ins_ids]}} (MIMIC-IT train config)")
    return body


class ImageIndex:
    """id → base64 over one or more image files (parquet or legacy JSON).

    Parquet: the id → (file, row group, row) map is built from the id column alone; values are
    read one row group's `base64` column at a time, keeping the last PARQUET_CACHED_ROW_GROUPS
    (episodes mostly use neighbouring images), so memory does not grow with the file.
    """

    def __init__(self, paths: Sequence[str]):
        self._json: Dict[str, Union[str, bytes]] = {}
        self._files: List = []  # pyarrow ParquetFile per parquet input
        self._where: Dict[str, Tuple[int, int, int]] = {}  # id -> (file, row group, row)
        self._groups: "collections.OrderedDict[Tuple[int, int], object]" = collections.OrderedDict()
        for path in paths:
            if _is_parquet(path):
                self._add_parquet(path)
            else:
                self._add_json(path)

    def _add_json(self, path: str) -> None:
        body = load_json(path, "--images")
        if not isinstance(body, dict):
            raise DataToolError(f"{path}: expected {{image_id: base64}} (legacy MIMIC-IT images JSON)")
        self._json.update(body)

    def _add_parquet(self, path: str) -> None:
        pf = open_parquet(path, "--images")
        schema = pf.schema_arrow
        if "base64" not in schema.names:
            raise DataToolError(f"{path}: no 'base64' column (columns: {', '.join(schema.names)})")
        id_col = _parquet_id_column(schema)
        if id_col is None:
            raise DataToolError(
                f"{path}: cannot find the image-id column: expected a pandas index, an 'id' column or "
                f"'__index_level_0__' (columns: {', '.join(schema.names)})"
            )
        file_index = len(self._files)
        self._files.append(pf)
        try:
            for group in range(pf.num_row_groups):
                ids = pf.read_row_group(group, columns=[id_col]).column(id_col).to_pylist()
                for row, image_id in enumerate(ids):
                    self._where[str(image_id)] = (file_index, group, row)
        except Exception as e:
            raise DataToolError(f"{path}: failed to read parquet (--images): {e}") from e

    def __len__(self) -> int:
        return len(self._json) + len(self._where)

    def get(self, image_id: str) -> Optional[Union[str, bytes]]:
        where = self._where.get(image_id)
        if where is None:
            return self._json.get(image_id)
        file_index, group, row = where
        column = self._groups.pop((file_index, group), None)
        if column is None:
            column = self._files[file_index].read_row_group(group, columns=["base64"]).column("base64")
            while len(self._groups) >= PARQUET_CACHED_ROW_GROUPS:
                self._groups.popitem(last=False)
        self._groups[(file_index, group)] = column  # most recently used last
        return column[row].as_py()


def _is_parquet(path: str) -> bool:
    require_file(path, "--images")
    with open(path, "rb") as f:
        return f.read(4) == b"PAR1"


def _parquet_id_column(schema) -> Optional[str]:
    meta = schema.metadata or {}
    if b"pandas" in meta:
        try:
            index_columns = json.loads(meta[b"pandas"]).get("index_columns", [])
        except (json.JSONDecodeError, AttributeError):
            index_columns = []
        # A RangeIndex is stored as a dict (no column): then the ids must be a real column.
        named = [c for c in index_columns if isinstance(c, str) and c in schema.names]
        if named:
            return named[0]
    for name in ("id", "image_id", "__index_level_0__"):
        if name in schema.names:
            return name
    return None


def write_images_parquet(path: str, ids: Sequence[str], base64s: Sequence[str]) -> None:
    """Write MIMIC-IT's image parquet: column `base64`, index `id` (pandas metadata included so
    `pandas.read_parquet(path).loc[image_id, "base64"]` works as in Otter)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pandas_meta = {
        "index_columns": ["id"],
        "column_indexes": [
            {"name": None, "field_name": None, "pandas_type": "unicode", "numpy_type": "object",
             "metadata": {"encoding": "UTF-8"}}
        ],
        "columns": [
            {"name": "base64", "field_name": "base64", "pandas_type": "unicode", "numpy_type": "object", "metadata": None},
            {"name": "id", "field_name": "id", "pandas_type": "unicode", "numpy_type": "object", "metadata": None},
        ],
        "creator": {"library": "pyarrow", "version": pa.__version__},
        "pandas_version": "2.2.0",
    }
    schema = pa.schema([("base64", pa.string()), ("id", pa.string())], metadata={"pandas": json.dumps(pandas_meta)})
    table = pa.table({"base64": pa.array(list(base64s), pa.string()), "id": pa.array(list(ids), pa.string())}, schema=schema)
    tmp = path + ".tmp"
    pq.write_table(table, tmp, row_group_size=4096)
    os.replace(tmp, path)


def plan_episodes(
    instructions: Dict[str, Dict], train_config: Optional[Dict[str, List[str]]], in_context: str
) -> Iterator[Tuple[str, List[str]]]:
    """Yield (episode id, [in-context ins_ids..., target ins_id]) in file order."""
    targets = train_config.keys() if train_config is not None else instructions.keys()
    for ins_id in targets:
        if in_context == "train-config":
            context = list(train_config[ins_id])
        elif in_context == "rel-ins":
            entry = instructions.get(ins_id)
            rel = entry.get("rel_ins_ids", []) if isinstance(entry, dict) else []
            context = list(rel) if isinstance(rel, list) else []
        else:
            context = []
        yield ins_id, [str(c) for c in context] + [ins_id]


class SkipEpisode(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def build_episode(
    episode_id: str, ins_ids: List[str], instructions: Dict[str, Dict], images: ImageIndex, source: str,
    video: bool = False,
) -> Tuple[Dict, Dict[str, bytes]]:
    """The record and its image members for one episode; raises SkipEpisode with a reason.
    With `video`, each turn's images are the frames of one clip (`frames`)."""
    turns, members = [], {}
    for ins_id in ins_ids:
        entry = instructions.get(ins_id)
        if entry is None:
            raise SkipEpisode(SKIP_MISSING_INSTRUCTION, f"instruction {ins_id!r} not in the instructions file")
        if not isinstance(entry, dict) or not isinstance(entry.get("instruction"), str) or not isinstance(entry.get("answer"), str):
            raise SkipEpisode(SKIP_BAD_INSTRUCTION, f"instruction {ins_id!r} lacks string 'instruction'/'answer'")
        image_ids = entry.get("image_ids", [])
        if isinstance(image_ids, str):
            image_ids = [image_ids]
        if not isinstance(image_ids, list):
            raise SkipEpisode(SKIP_NO_IMAGE_IDS, f"instruction {ins_id!r}: 'image_ids' is not a list")
        names = []
        for image_id in image_ids:
            value = images.get(str(image_id))
            if value is None:
                raise SkipEpisode(SKIP_MISSING_IMAGE, f"image {image_id!r} (instruction {ins_id!r}) not in the images file")
            try:
                data = decode_base64(value)
            except ValueError as e:
                raise SkipEpisode(SKIP_BAD_BASE64, f"image {image_id!r}: bad base64 ({e})") from None
            ext = sniff_image_ext(data)
            if ext is None:
                raise SkipEpisode(SKIP_UNKNOWN_IMAGE_FORMAT, f"image {image_id!r}: not a JPEG/PNG/GIF/WebP/BMP/TIFF")
            name = f"{len(members)}.{ext}"
            members[name] = data
            names.append(name)
        turns.append({"instruction": entry["instruction"], "answer": entry["answer"], "frames" if video else "images": names})
    record = {"id": episode_id, "source": source, "turns": turns}
    try:
        validate_episode(record, episode_id)
    except FormatError as e:
        raise SkipEpisode(SKIP_INVALID_RECORD, str(e)) from None
    return record, members


def episode_key(episode_id: str, index: int) -> str:
    """The tar key: the id, made safe; an id that had to change gets its episode index appended,
    so two ids that differ only in '.' vs '_' stay distinct (and the key depends on nothing but
    the input, which resuming needs)."""
    key = sample_key(episode_id)
    return key if key == episode_id else f"{key}~{index}"


# ----------------------------------------------------------------------------------------------
# Conversion


def _records(plan, first: int, instructions: Dict[str, Dict], images: ImageIndex, source: str, video: bool
             ) -> Iterator[Record]:
    for index, (episode_id, ins_ids) in enumerate(plan, start=first):
        try:
            record, members = build_episode(episode_id, ins_ids, instructions, images, source, video)
        except SkipEpisode as e:
            yield skipped([index + 1], e.reason, f"{episode_id}: {e.detail}")
            continue
        members["json"] = json.dumps(record, ensure_ascii=False).encode("utf-8")
        yield Record([index + 1], episode_key(episode_id, index), members)


def _default_source(instructions_path: str) -> str:
    stem = os.path.basename(instructions_path)
    for suffix in (".json", "_instructions"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
    return stem.lower() or "mimicit"


def convert_mimicit(
    instructions_path: str,
    images_paths: Sequence[str],
    out_dir: str,
    train_config_path: Optional[str] = None,
    in_context: Optional[str] = None,
    source: Optional[str] = None,
    video: bool = False,
    **run_options,
) -> ConvertResult:
    """Convert one MIMIC-IT dataset (instructions + images [+ train config]) into shards in `out_dir`.
    `run_options`: shard_samples, shard_mib, force, quiet (see `sharding.run_conversion`)."""
    if isinstance(images_paths, str):
        images_paths = [images_paths]
    if not images_paths:
        raise DataToolError("--images: no file given")
    if in_context is None:
        in_context = "train-config" if train_config_path else "none"
    if in_context not in IN_CONTEXT_MODES:
        raise DataToolError(f"--in-context {in_context!r}: expected one of {', '.join(IN_CONTEXT_MODES)}")
    if in_context == "train-config" and train_config_path is None:
        raise DataToolError("--in-context train-config needs --train-config")
    inputs = [instructions_path, *images_paths] + ([train_config_path] if train_config_path else [])
    for path, what in zip(inputs, ["--instructions"] + ["--images"] * len(images_paths) + ["--train-config"]):
        require_file(path, what)
    source = source or _default_source(instructions_path)

    def read(position: Optional[List[int]]) -> Tuple[int, Iterator[Record]]:
        # Loaded here, not above: a re-run over a complete output never reads the inputs.
        instructions = load_instructions(instructions_path)
        train_config = load_train_config(train_config_path) if train_config_path else None
        images = ImageIndex(images_paths)
        first = position[0] if position else 0
        plan = itertools.islice(plan_episodes(instructions, train_config, in_context), first, None)
        return len(train_config or instructions), _records(plan, first, instructions, images, source, video)

    params = {"inputs": [file_stamp(p) for p in inputs], "in_context": in_context, "source": source, "video": video}
    return run_conversion(out_dir, kind="mimicit", corpus="mimicit", unit="episodes", params=params, read=read,
                          **run_options)
