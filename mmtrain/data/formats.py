"""On-disk sample schema and shard writing: the one definition of the format (docs/formats.md).

A dataset directory holds webdataset tar shards and a `manifest.json`:

    {"format": "mmtrain-shards/1", "kind": "mimicit",
     "shards": [{"name": "shard-000000.tar", "num_samples": 1000, "sha256": "..."}, ...]}

A sample is a group of tar members sharing a key: `KEY.json` (the record) and its images
`KEY.0.jpg`, `KEY.1.jpg`, ... in the order the record refers to them.

Instruction episode (kind `mimicit`), the record in `KEY.json`:

    {"id": "VQA_INS_00042", "source": "shapes",
     "turns": [{"instruction": "...", "answer": "...", "images": ["0.jpg"]}, ...]}

Turns are in-context examples first and the target turn last; each turn lists the image members
(by extension, e.g. "0.jpg") that precede its instruction. A turn may instead (or also) list
`frames`: the frames of one video, in order.

Interleaved document (kind `interleaved`, from MMC4 or OBELICS), the record in `KEY.json`:

    {"id": "mmc4-00012-3", "source": "mmc4",
     "parts": [{"text": "A sentence."}, {"image": "0.jpg"}, {"text": "The sentence the image matches."}],
     "meta": {...}}

`parts` is the document in reading order; each part is exactly one text or one image member.

Image-text pair (kind `pairs`): img2dataset's layout, read as it is: `KEY.jpg` (or png/webp) and
`KEY.txt` (the caption), optionally `KEY.json` (metadata, ignored).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

FORMAT_VERSION = "mmtrain-shards/1"
MANIFEST_NAME = "manifest.json"
KINDS = ("mimicit", "interleaved", "pairs")
# Image member extensions of a pair, in order of preference.
PAIR_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# Fixed member metadata so the same samples always give byte-identical shards (stable sha256).
_MEMBER_MTIME = 0


class FormatError(ValueError):
    """A sample or manifest does not follow the schema; the message says where."""


class BadSample(Exception):
    """One sample cannot be used. The loader counts it under `reason` and skips it; never fatal.

    Reasons used by mmtrain.data: bad_shard, truncated, missing_json, bad_json, bad_record,
    missing_image, bad_image, image_too_large, too_long, too_many_images, no_image, empty_text,
    missing_caption, bad_caption, unsupported, image_count_mismatch, special_token_in_text.
    """

    def __init__(self, reason: str, detail: str = ""):
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


def validate_episode(record: Dict, where: str) -> None:
    """Check one instruction-episode record; raise FormatError naming `where` (shard and key)."""
    if not isinstance(record, dict):
        raise FormatError(f"{where}: record is {type(record).__name__}, expected an object")
    turns = record.get("turns")
    if not isinstance(turns, list) or not turns:
        raise FormatError(f"{where}: 'turns' must be a non-empty list")
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise FormatError(f"{where}: turns[{i}] is not an object")
        for name in ("instruction", "answer"):
            if not isinstance(turn.get(name), str):
                raise FormatError(f"{where}: turns[{i}].{name} must be a string")
        for name in ("images", "frames"):
            members = turn.get(name, [])
            if not isinstance(members, list) or not all(isinstance(x, str) for x in members):
                raise FormatError(f"{where}: turns[{i}].{name} must be a list of member names")


def validate_document(record: Dict, where: str) -> None:
    """Check one interleaved-document record; raise FormatError naming `where` (shard and key)."""
    if not isinstance(record, dict):
        raise FormatError(f"{where}: record is {type(record).__name__}, expected an object")
    parts = record.get("parts")
    if not isinstance(parts, list) or not parts:
        raise FormatError(f"{where}: 'parts' must be a non-empty list")
    for i, part in enumerate(parts):
        if not isinstance(part, dict) or len(part) != 1 or not isinstance(next(iter(part.values())), str):
            raise FormatError(f"{where}: parts[{i}] must be {{\"text\": str}} or {{\"image\": member}}, got {part!r}")
        if next(iter(part)) not in ("text", "image"):
            raise FormatError(f"{where}: parts[{i}] has key {next(iter(part))!r}; expected 'text' or 'image'")


VALIDATORS = {"mimicit": validate_episode, "interleaved": validate_document}


@dataclass
class ShardInfo:
    name: str
    num_samples: int
    sha256: str


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ShardWriter:
    """Writes samples into `shard-NNNNNN.tar` files, then `manifest.json`.

    A shard is closed as soon as it holds `max_samples` samples or `max_bytes` bytes of member data
    (a target size: the sample that reaches it stays in). Closing right after a write, never on
    the next one, lets a converter record "this shard ends after input record X" and resume there.
    Shards are written under `NAME.tmp` and renamed when complete. `shards` lists shards already
    complete (a resumed conversion); numbering continues after them.

    Usage:
        with ShardWriter(out_dir, kind="mimicit") as w:
            w.write(key, {"json": record_bytes, "0.jpg": jpeg_bytes})
    """

    def __init__(self, out_dir: str, kind: str, max_samples: Optional[int] = 1000, max_bytes: int = 256 << 20,
                 shards: Sequence[ShardInfo] = ()):
        if kind not in KINDS:
            raise FormatError(f"unknown sample kind {kind!r}; known: {', '.join(KINDS)}")
        self.out_dir, self.kind = out_dir, kind
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self.shards: List[ShardInfo] = list(shards)
        self._tar: Optional[tarfile.TarFile] = None
        self._count = 0
        self._bytes = 0
        os.makedirs(out_dir, exist_ok=True)

    def _open(self) -> None:
        self._tmp_path = os.path.join(self.out_dir, shard_name(len(self.shards))) + ".tmp"
        self._tar = tarfile.open(self._tmp_path, "w", format=tarfile.USTAR_FORMAT)
        self._count = self._bytes = 0

    def close_shard(self) -> Optional[ShardInfo]:
        """Finish the open shard (if any) and return its entry."""
        if self._tar is None:
            return None
        self._tar.close()
        self._tar = None
        final = self._tmp_path[: -len(".tmp")]
        os.replace(self._tmp_path, final)
        self.shards.append(ShardInfo(os.path.basename(final), self._count, sha256_file(final)))
        return self.shards[-1]

    def write(self, key: str, members: Dict[str, bytes]) -> Optional[ShardInfo]:
        """Add one sample (`members` maps extension, e.g. "json" or "0.jpg", to bytes); returns the
        shard's entry when this sample completed it."""
        if "." in key or "/" in key or not key:
            raise FormatError(f"sample key {key!r} must be non-empty with no '.' or '/'")
        if self._tar is None:
            self._open()
        for ext in sorted(members, key=lambda e: (e != "json", e)):
            data = members[ext]
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), _MEMBER_MTIME, 0o644
            self._tar.addfile(info, io.BytesIO(data))
        self._count += 1
        self._bytes += sum(len(v) for v in members.values())
        if (self.max_samples and self._count >= self.max_samples) or self._bytes >= self.max_bytes:
            return self.close_shard()
        return None

    def abort(self) -> None:
        """Drop the open shard (its .tmp file); complete shards stay."""
        if self._tar is not None:
            self._tar.close()
            self._tar = None
            os.remove(self._tmp_path)

    def close(self, corpus: Optional[str] = None, stats: Optional[Dict] = None) -> List[ShardInfo]:
        self.close_shard()
        write_manifest(self.out_dir, self.kind, self.shards, corpus=corpus, stats=stats)
        return self.shards

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def write_manifest(out_dir: str, kind: str, shards: Sequence[ShardInfo], corpus: Optional[str] = None,
                   stats: Optional[Dict] = None) -> str:
    """Write `manifest.json` atomically. `corpus` (mmc4, obelics, mimicit, pairs, ...) and `stats`
    (what a converter read, wrote and dropped, by reason) are optional: older manifests lack them.
    Shard names are paths relative to `out_dir` (`../laion/00000.tar` is fine)."""
    path = os.path.join(out_dir, MANIFEST_NAME)
    body = {"format": FORMAT_VERSION, "kind": kind}
    if corpus is not None:
        body["corpus"] = corpus
    body["num_samples"] = sum(s.num_samples for s in shards)
    if stats is not None:
        body["stats"] = stats
    body["shards"] = [{"name": s.name, "num_samples": s.num_samples, "sha256": s.sha256} for s in shards]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(body, f, indent=1)
    os.replace(tmp, path)
    return path


def read_manifest(data_dir: str) -> Dict:
    """Load and check a dataset directory's manifest; errors name the file and what is wrong."""
    path = os.path.join(data_dir, MANIFEST_NAME)
    if not os.path.isfile(path):
        raise FormatError(f"{path}: no manifest; convert the data with `mmtrain-data convert` first")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except json.JSONDecodeError as e:
        raise FormatError(f"{path}: not valid JSON ({e})") from e
    if manifest.get("format") != FORMAT_VERSION:
        raise FormatError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT_VERSION!r}")
    if manifest.get("kind") not in KINDS:
        raise FormatError(f"{path}: unknown kind {manifest.get('kind')!r}")
    for name, kind in (("corpus", str), ("stats", dict)):  # optional: older manifests lack them
        if name in manifest and not isinstance(manifest[name], kind):
            raise FormatError(f"{path}: '{name}' must be a {kind.__name__}, got {type(manifest[name]).__name__}")
    for shard in manifest.get("shards", []):
        # Names are relative to the manifest's directory (pairs manifests may list ../other/00000.tar).
        shard_path = os.path.join(data_dir, shard["name"])
        if not os.path.isfile(shard_path):
            raise FormatError(f"{path}: lists {shard['name']}, which is missing ({os.path.normpath(shard_path)})")
    if not manifest.get("shards"):
        raise FormatError(f"{path}: lists no shards")
    return manifest
