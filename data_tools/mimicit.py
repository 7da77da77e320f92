"""MIMIC-IT's published layout → mmtrain instruction-episode shards (kind "mimicit").

Input (as released with Otter, see docs/formats.md):

- `X_instructions.json`: {"meta": {...}, "data": {ins_id: {"instruction", "answer", "image_ids", "rel_ins_ids"}}}
- `X.parquet`: one row per image, indexed by image id, column `base64` (or the legacy `X.json`:
  {image_id: base64})
- optional `X_train.json`: {ins_id: [in-context ins_ids]}; when given its keys are the episodes.

Output: `shard-NNNNNN.tar` + `manifest.json` written by `mmtrain.data.formats.ShardWriter`, plus
`convert_info.json` (inputs, options and the skip counts) which makes a re-run over a complete
output a no-op.

A broken episode (unknown instruction or image id, bad base64, bytes that are not an image) is
skipped and counted by reason; a missing or malformed input *file* is an error naming the file.
"""

from __future__ import annotations

import base64
import binascii
import collections
import json
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

from mmtrain.data.formats import MANIFEST_NAME, FormatError, ShardWriter, read_manifest, validate_episode

from . import DataToolError

CONVERT_INFO_NAME = "convert_info.json"
CONVERT_INFO_VERSION = 1
IN_CONTEXT_MODES = ("train-config", "rel-ins", "none")

# Skip reasons, in the order the summary prints them.
SKIP_MISSING_INSTRUCTION = "missing_instruction"
SKIP_BAD_INSTRUCTION = "bad_instruction"
SKIP_NO_IMAGE_IDS = "bad_image_ids"
SKIP_MISSING_IMAGE = "missing_image"
SKIP_BAD_BASE64 = "bad_base64"
SKIP_UNKNOWN_IMAGE_FORMAT = "unknown_image_format"
SKIP_INVALID_RECORD = "invalid_record"


# ----------------------------------------------------------------------------------------------
# Input files


def require_file(path: str, what: str) -> None:
    if not path:
        raise DataToolError(f"{what}: no file given")
    if not os.path.exists(path):
        raise DataToolError(f"{path}: no such file ({what})")
    if not os.path.isfile(path):
        raise DataToolError(f"{path}: not a regular file ({what})")


def load_json(path: str, what: str):
    require_file(path, what)
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataToolError(f"{path}: not valid JSON ({what}): {e}") from e


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
    """id → base64 lookup over one or more image files (parquet or legacy JSON).

    Parquet columns stay in Arrow memory (memory-mapped file, no per-image Python objects); only
    the id → (chunk, row) map is a Python dict. Decoding happens per episode, at write time.
    """

    def __init__(self, paths: Sequence[str]):
        self._json: Dict[str, Union[str, bytes]] = {}
        self._cols: List = []  # pyarrow ChunkedArrays of base64 values, one per parquet file
        self._where: Dict[str, Tuple[int, int, int]] = {}  # id -> (file, chunk, row)
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
        import pyarrow.parquet as pq

        try:
            schema = pq.read_schema(path)
        except Exception as e:  # pyarrow raises several types for a damaged file
            raise DataToolError(f"{path}: not a readable parquet file (--images): {e}") from e
        if "base64" not in schema.names:
            raise DataToolError(f"{path}: no 'base64' column (columns: {', '.join(schema.names)})")
        id_col = _parquet_id_column(schema)
        if id_col is None:
            raise DataToolError(
                f"{path}: cannot find the image-id column: expected a pandas index, an 'id' column or "
                f"'__index_level_0__' (columns: {', '.join(schema.names)})"
            )
        try:
            table = pq.read_table(path, columns=[id_col, "base64"], memory_map=True)
        except Exception as e:
            raise DataToolError(f"{path}: failed to read parquet (--images): {e}") from e
        file_index = len(self._cols)
        self._cols.append(table.column("base64"))
        for chunk_index, chunk in enumerate(table.column(id_col).chunks):
            for row, image_id in enumerate(chunk.to_pylist()):
                self._where[str(image_id)] = (file_index, chunk_index, row)

    def __len__(self) -> int:
        return len(self._json) + len(self._where)

    def get(self, image_id: str) -> Optional[Union[str, bytes]]:
        where = self._where.get(image_id)
        if where is not None:
            file_index, chunk_index, row = where
            return self._cols[file_index].chunk(chunk_index)[row].as_py()
        return self._json.get(image_id)


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


# ----------------------------------------------------------------------------------------------
# Images


_DATA_URI = re.compile(r"^data:[\w/+.-]+;base64,")


def decode_base64(value: Union[str, bytes]) -> bytes:
    """Strict base64 decode (whitespace and a `data:...;base64,` prefix tolerated); ValueError if bad."""
    if isinstance(value, bytes):
        value = value.decode("ascii", errors="strict")
    if not isinstance(value, str):
        raise ValueError(f"expected a base64 string, got {type(value).__name__}")
    value = _DATA_URI.sub("", value.strip(), count=1)
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        try:
            return base64.b64decode("".join(value.split()), validate=True)
        except (binascii.Error, ValueError) as e:
            raise ValueError(str(e)) from e


def sniff_image_ext(data: bytes) -> Optional[str]:
    """File extension from the magic bytes, or None when not a known image format."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:2] == b"BM":
        return "bmp"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    return None


# ----------------------------------------------------------------------------------------------
# Episodes


def plan_episodes(
    instructions: Dict[str, Dict], train_config: Optional[Dict[str, List[str]]], in_context: str
) -> Iterator[Tuple[str, List[str]]]:
    """Yield (episode id, [in-context ins_ids..., target ins_id]) in file order."""
    if in_context not in IN_CONTEXT_MODES:
        raise DataToolError(f"--in-context {in_context!r}: expected one of {', '.join(IN_CONTEXT_MODES)}")
    if in_context == "train-config" and train_config is None:
        raise DataToolError("--in-context train-config needs --train-config")
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
    episode_id: str, ins_ids: List[str], instructions: Dict[str, Dict], images: ImageIndex, source: str
) -> Tuple[Dict, Dict[str, bytes]]:
    """The record and its image members for one episode; raises SkipEpisode with a reason."""
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
        turns.append({"instruction": entry["instruction"], "answer": entry["answer"], "images": names})
    record = {"id": episode_id, "source": source, "turns": turns}
    try:
        validate_episode(record, episode_id)
    except FormatError as e:
        raise SkipEpisode(SKIP_INVALID_RECORD, str(e)) from None
    return record, members


def sample_key(episode_id: str) -> str:
    """A tar key for the episode: '.' and '/' would break webdataset's grouping by key."""
    key = re.sub(r"[./\\\s]", "_", episode_id)
    return key or "_"


# ----------------------------------------------------------------------------------------------
# Conversion


@dataclass
class ConvertResult:
    out_dir: str
    num_episodes: int
    num_shards: int
    skipped: Dict[str, int] = field(default_factory=dict)
    skipped_examples: Dict[str, str] = field(default_factory=dict)
    up_to_date: bool = False  # True when the existing output matched and nothing was written

    def summary(self) -> str:
        if self.up_to_date:
            head = f"{self.out_dir}: up to date ({self.num_episodes} episodes in {self.num_shards} shards); nothing to do"
        else:
            head = f"{self.out_dir}: wrote {self.num_episodes} episodes in {self.num_shards} shards"
        total = sum(self.skipped.values())
        if not total:
            return head + "; skipped 0"
        lines = [head + f"; skipped {total}:"]
        for reason, count in self.skipped.items():
            lines.append(f"  {reason}: {count} (e.g. {self.skipped_examples.get(reason, '')})")
        return "\n".join(lines)


def _file_stamp(path: str) -> Dict:
    st = os.stat(path)
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _default_source(instructions_path: str) -> str:
    stem = os.path.basename(instructions_path)
    for suffix in (".json", "_instructions"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
    return stem.lower() or "mimicit"


def _existing_output_matches(out_dir: str, params: Dict) -> Optional[Dict]:
    """The stored convert info when `out_dir` holds a complete conversion with the same inputs and
    options and untouched shards (size and mtime as written); else None."""
    info_path = os.path.join(out_dir, CONVERT_INFO_NAME)
    if not (os.path.isfile(info_path) and os.path.isfile(os.path.join(out_dir, MANIFEST_NAME))):
        return None
    try:
        with open(info_path) as f:
            info = json.load(f)
        manifest = read_manifest(out_dir)
    except (OSError, json.JSONDecodeError, FormatError):
        return None
    if info.get("params") != params:
        return None
    stats = info.get("shards", {})
    if [s["name"] for s in manifest["shards"]] != sorted(stats):
        return None
    for shard in manifest["shards"]:
        st = os.stat(os.path.join(out_dir, shard["name"]))
        if [st.st_size, st.st_mtime_ns] != stats[shard["name"]]:
            return None
    return info


def convert_mimicit(
    instructions_path: str,
    images_paths: Sequence[str],
    out_dir: str,
    train_config_path: Optional[str] = None,
    in_context: Optional[str] = None,
    shard_samples: int = 1000,
    shard_max_mib: int = 256,
    source: Optional[str] = None,
    force: bool = False,
    log=None,
) -> ConvertResult:
    """Convert one MIMIC-IT dataset (instructions + images [+ train config]) into shards in `out_dir`."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    if isinstance(images_paths, str):
        images_paths = [images_paths]
    if not images_paths:
        raise DataToolError("--images: no file given")
    if shard_samples < 1:
        raise DataToolError(f"--shard-samples {shard_samples}: must be at least 1")
    if in_context is None:
        in_context = "train-config" if train_config_path else "none"
    inputs = [instructions_path, *images_paths] + ([train_config_path] if train_config_path else [])
    for path, what in zip(inputs, ["--instructions"] + ["--images"] * len(images_paths) + ["--train-config"]):
        require_file(path, what)
    source = source or _default_source(instructions_path)
    params = {
        "version": CONVERT_INFO_VERSION,
        "inputs": [_file_stamp(p) for p in inputs],
        "in_context": in_context,
        "shard_samples": shard_samples,
        "shard_max_mib": shard_max_mib,
        "source": source,
    }

    if not force:
        info = _existing_output_matches(out_dir, params)
        if info is not None:
            return ConvertResult(out_dir, info["num_episodes"], len(info["shards"]), info.get("skipped", {}),
                                 info.get("skipped_examples", {}), up_to_date=True)

    instructions = load_instructions(instructions_path)
    train_config = load_train_config(train_config_path) if train_config_path else None
    plan = plan_episodes(instructions, train_config, in_context)  # checks in_context before any I/O below
    images = ImageIndex(images_paths)
    log(f"{instructions_path}: {len(instructions)} instructions; {len(images)} images; in-context from {in_context}")

    # Invalidate any previous output first, so an interrupted run never looks complete.
    os.makedirs(out_dir, exist_ok=True)
    for name in (CONVERT_INFO_NAME, MANIFEST_NAME):
        if os.path.exists(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))

    skipped: Dict[str, int] = collections.Counter()
    examples: Dict[str, str] = {}
    written = 0
    seen_keys = set()
    writer = ShardWriter(out_dir, kind="mimicit", max_samples=shard_samples, max_bytes=shard_max_mib << 20)
    try:
        for episode_id, ins_ids in _progress(plan, total=len(train_config or instructions)):
            try:
                record, members = build_episode(episode_id, ins_ids, instructions, images, source)
            except SkipEpisode as e:
                skipped[e.reason] += 1
                examples.setdefault(e.reason, f"{episode_id}: {e.detail}")
                continue
            key = sample_key(episode_id)
            if key in seen_keys:  # only possible when sanitising '.'/'/' made two ids equal
                key = f"{key}_{written}"
            seen_keys.add(key)
            members["json"] = json.dumps(record, ensure_ascii=False).encode("utf-8")
            writer.write(key, members)
            written += 1
    except BaseException:
        writer.__exit__(*sys.exc_info())  # removes the partial shard
        raise
    if written == 0:
        # Nothing was written, so no shard is open; closing would write a manifest with no shards.
        raise DataToolError(
            f"{instructions_path}: no episode could be converted; skipped {dict(skipped)} "
            f"(e.g. {next(iter(examples.values()), 'n/a')})"
        )
    shards = writer.close()

    # Remove shards of an earlier, larger conversion that the new manifest does not list.
    listed = {s.name for s in shards}
    for name in os.listdir(out_dir):
        if re.fullmatch(r"shard-\d{6}\.tar(\.tmp)?", name) and name not in listed:
            os.remove(os.path.join(out_dir, name))

    ordered_skips = {k: skipped[k] for k in sorted(skipped, key=_reason_order)}
    info = {
        "params": params,
        "num_episodes": written,
        "skipped": ordered_skips,
        "skipped_examples": {k: examples[k] for k in ordered_skips},
        "shards": {s.name: [os.stat(os.path.join(out_dir, s.name)).st_size,
                            os.stat(os.path.join(out_dir, s.name)).st_mtime_ns] for s in shards},
    }
    tmp = os.path.join(out_dir, CONVERT_INFO_NAME + ".tmp")
    with open(tmp, "w") as f:
        json.dump(info, f, indent=1)
    os.replace(tmp, os.path.join(out_dir, CONVERT_INFO_NAME))
    return ConvertResult(out_dir, written, len(shards), ordered_skips, info["skipped_examples"])


_REASONS = [SKIP_MISSING_INSTRUCTION, SKIP_BAD_INSTRUCTION, SKIP_NO_IMAGE_IDS, SKIP_MISSING_IMAGE,
            SKIP_BAD_BASE64, SKIP_UNKNOWN_IMAGE_FORMAT, SKIP_INVALID_RECORD]


def _reason_order(reason: str) -> int:
    return _REASONS.index(reason) if reason in _REASONS else len(_REASONS)


def _progress(iterable: Iterable, total: int) -> Iterable:
    if not sys.stderr.isatty():
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, unit="ep", desc="convert", mininterval=1.0)
