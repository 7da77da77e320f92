"""MMC4's published documents → interleaved-document shards (kind "interleaved", corpus "mmc4").

Input: JSON Lines, one document per line, as .jsonl, .jsonl.gz or a .zip of those (MMC4 ships
`docs_shard_N_v3.jsonl.zip`):

    {"url": ..., "text_list": [sentence, ...],
     "image_info": [{"image_name", "raw_url", "matched_text_index", "matched_sim", ["image_base64"]}, ...],
     "similarity_matrix": [[cosine per sentence] per image], ...}

An image's bytes are its inline `image_base64` (the webdataset conversions) or the file
`images_dir/<image_name>` (the downloaded images).

Which images are kept, and where (each drop counted by reason in the manifest's stats):
- bytes absent (`missing_image`), fewer than `min_image_bytes` (`small_image`; OpenFlamingo keeps
  only images over 10 KB), or not an image (`bad_image`);
- a sentence for each remaining image: `matched` takes MMC4's `matched_text_index` and
  `matched_sim` (several images may precede one sentence); `hungarian` takes the one-to-one
  assignment of maximal total similarity over `similarity_matrix` (scipy's
  `linear_sum_assignment(-sim)`, as OpenFlamingo does); an image left without a sentence is
  `unassigned`, one whose match is malformed `bad_match`;
- similarity below `sim_threshold` (`below_threshold`). The unit is raw CLIP ViT-L/14 cosine,
  about 0.2-0.35: OpenFlamingo's recipe uses 0.24 (the default here), Otter 0.32.
  OpenFlamingo's argparse default of 30 silently dropped every image, so |threshold| > 1 is refused.

Each kept image goes right before its sentence. Consecutive sentences are joined by a space into
one text part, so text parts never touch. A document left with no image is skipped (`no_image`)
unless `keep_text_only`. The record:

    {"id": "docs_shard_0_v3-12", "source": "mmc4",
     "parts": [{"text": "..."}, {"image": "0.jpg"}, {"text": "the matched sentence ..."}],
     "meta": {"url": ..., "images": [{"raw_url": ..., "sim": 0.31}, ...]}}   # images in member order

with id = input file stem + line number.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from . import DataToolError
from .inputs import BadLine, decode_base64, file_stamp, iter_jsonl, read_image_file, require_file, sniff_image_ext
from .interleaved import DocumentBuilder
from .sharding import ConvertResult, Record, run_conversion, skipped

ASSIGNMENTS = ("matched", "hungarian")
DEFAULT_SIM_THRESHOLD = 0.24  # OpenFlamingo's MMC4 recipe (scripts/run_train.sh)
DEFAULT_MIN_IMAGE_BYTES = 10 * 1024


def check_sim_threshold(sim_threshold: float) -> None:
    if not -1.0 <= sim_threshold <= 1.0:
        raise DataToolError(
            f"--sim-threshold {sim_threshold:g}: MMC4 similarities are raw CLIP cosines in [-1, 1] (typically "
            f"0.2-0.35), so this threshold would drop every image. OpenFlamingo's default of 30 silently did exactly "
            f"that; its training recipe uses 0.24 (Otter: 0.32)."
        )


def _hungarian():
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError as e:
        raise DataToolError("--assignment hungarian needs scipy (pip install scipy); or use --assignment matched, "
                            "MMC4's own matched_text_index") from e
    return linear_sum_assignment


def doc_id(where: str) -> str:
    """"docs_shard_0_v3-12" from "path/docs_shard_0_v3.jsonl.zip:docs_shard_0_v3.jsonl:12"."""
    name, line = where.rsplit(":", 1)
    base = os.path.basename(name.rsplit(":", 1)[-1])
    for suffix in (".gz", ".jsonl", ".json"):
        base = base[: -len(suffix)] if base.endswith(suffix) else base
    return f"{base}-{line}"


def _image_bytes(info: Dict, images_dir: Optional[str]) -> Tuple[Optional[bytes], str]:
    """(bytes, "") or (None, drop reason)."""
    if info.get("image_base64"):
        try:
            return decode_base64(info["image_base64"]), ""
        except ValueError:
            return None, "bad_image"
    name = info.get("image_name")
    if images_dir and isinstance(name, str) and name:
        data = read_image_file(os.path.join(images_dir, name))
        if data is not None:
            return data, ""
    return None, "missing_image"


def _similarity_rows(doc: Dict, num_images: int, num_sentences: int) -> Optional[List[List[float]]]:
    """`similarity_matrix` when it is [num_images x num_sentences] of numbers, else None."""
    rows = doc.get("similarity_matrix")
    if not isinstance(rows, list) or len(rows) != num_images:
        return None
    for row in rows:
        if not isinstance(row, list) or len(row) != num_sentences or not all(isinstance(x, (int, float)) for x in row):
            return None
    return rows


def _matches(doc: Dict, candidates: List[int], num_sentences: int, assignment: str, where: str
             ) -> Tuple[Dict[int, Tuple[int, float]], List[Tuple[str, str]]]:
    """({image index: (sentence index, similarity)}, [(drop reason, detail)]) for the candidate images."""
    infos = doc["image_info"]
    sim_rows = _similarity_rows(doc, len(infos), num_sentences)
    matches, drops = {}, []
    if assignment == "hungarian":
        if sim_rows is None:
            return {}, [("bad_match", f"{where}: similarity_matrix is not [images x sentences]")] * len(candidates)
        if candidates and num_sentences:
            import numpy as np

            rows, cols = _hungarian()(-np.asarray([sim_rows[i] for i in candidates], dtype=np.float64))
            matches = {candidates[r]: (int(c), sim_rows[candidates[r]][c]) for r, c in zip(rows, cols)}
        drops = [("unassigned", f"{where}: image {i} has no sentence left") for i in candidates if i not in matches]
        return matches, drops
    for i in candidates:
        index, sim = infos[i].get("matched_text_index"), infos[i].get("matched_sim")
        if not isinstance(index, int) or not 0 <= index < num_sentences:
            drops.append(("bad_match", f"{where}: image {i} matched_text_index {index!r} (of {num_sentences} sentences)"))
            continue
        if not isinstance(sim, (int, float)) and sim_rows is not None:
            sim = sim_rows[i][index]
        if not isinstance(sim, (int, float)) or math.isnan(sim):
            drops.append(("bad_match", f"{where}: image {i} has no similarity"))
            continue
        matches[i] = (index, sim)
    return matches, drops


def build_document(doc, where: str, position, *, images_dir: Optional[str], assignment: str,
                   sim_threshold: float, min_image_bytes: int, keep_text_only: bool, source: str) -> Record:
    if isinstance(doc, BadLine):
        return skipped(position, "bad_json", f"{where}: {doc.error}")
    sentences, infos = (doc.get("text_list"), doc.get("image_info", [])) if isinstance(doc, dict) else (None, None)
    if not isinstance(sentences, list) or not all(isinstance(s, str) for s in sentences) or \
            not isinstance(infos, list) or not all(isinstance(i, dict) for i in infos):
        return skipped(position, "bad_record", f"{where}: expected text_list [str] and image_info [object]")

    drops: List[Tuple[str, str]] = []
    data: Dict[int, Tuple[bytes, str]] = {}  # image index -> (bytes, extension)
    for i, info in enumerate(infos):
        raw, reason = _image_bytes(info, images_dir)
        if raw is not None and len(raw) < min_image_bytes:
            raw, reason = None, "small_image"
        ext = sniff_image_ext(raw) if raw is not None else None
        if raw is not None and ext is None:
            reason = "bad_image"
        if ext is None:
            drops.append((reason, f"{where}: image {i} ({info.get('image_name') or info.get('raw_url')})"))
        else:
            data[i] = (raw, ext)
    matches, match_drops = _matches(doc, sorted(data), len(sentences), assignment, where)
    drops += match_drops
    before: Dict[int, List[int]] = defaultdict(list)  # sentence index -> images placed right before it
    for i, (sentence, sim) in sorted(matches.items()):
        if sim < sim_threshold:
            drops.append(("below_threshold", f"{where}: image {i} similarity {sim:.3f} < {sim_threshold:g}"))
        else:
            before[sentence].append(i)
    doc_builder, meta_images = DocumentBuilder(separator=" "), []
    for j, sentence in enumerate(sentences):
        for i in before.get(j, []):
            doc_builder.image(*data[i])
            meta_images.append({"raw_url": infos[i].get("raw_url"), "sim": matches[i][1]})
        doc_builder.text(sentence)
    return doc_builder.record(position, doc_id(where), where, source=source, keep_text_only=keep_text_only,
                              meta={"url": doc.get("url"), "images": meta_images}, dropped_images=drops)


def convert_mmc4(
    inputs: Sequence[str],
    out_dir: str,
    *,
    images_dir: Optional[str] = None,
    assignment: str = "matched",
    sim_threshold: float = DEFAULT_SIM_THRESHOLD,
    min_image_bytes: int = DEFAULT_MIN_IMAGE_BYTES,
    keep_text_only: bool = False,
    source: str = "mmc4",
    **run_options,
) -> ConvertResult:
    """Convert MMC4 JSON Lines files into shards in `out_dir` (see the module docstring).
    `run_options`: shard_samples, shard_mib, force, quiet (see `sharding.run_conversion`)."""
    check_sim_threshold(sim_threshold)
    if assignment not in ASSIGNMENTS:
        raise DataToolError(f"--assignment {assignment!r}: expected one of {', '.join(ASSIGNMENTS)}")
    if assignment == "hungarian":
        _hungarian()  # fail before reading anything
    if images_dir is not None and not os.path.isdir(images_dir):
        raise DataToolError(f"{images_dir}: no such directory (--images-dir)")
    if min_image_bytes < 0:
        raise DataToolError(f"--min-image-bytes {min_image_bytes}: must be >= 0 (0 keeps every size)")
    options = dict(images_dir=images_dir, assignment=assignment, sim_threshold=sim_threshold,
                   min_image_bytes=min_image_bytes, keep_text_only=keep_text_only, source=source)
    if not inputs:
        raise DataToolError("convert mmc4: no input file given")
    for path in inputs:
        require_file(path, "MMC4 documents")

    def read(position) -> Tuple[None, Iterator[Record]]:
        def records():
            for pos, where, doc in iter_jsonl(inputs, position, "MMC4 documents"):
                yield build_document(doc, where, pos, **options)

        return None, records()

    params = {"inputs": [file_stamp(p) for p in inputs],
              **{k: (os.path.abspath(v) if k == "images_dir" and v else v) for k, v in options.items()}}
    return run_conversion(out_dir, kind="interleaved", corpus="mmc4", unit="documents", params=params, read=read,
                          **run_options)
