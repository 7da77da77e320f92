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
(by extension, e.g. "0.jpg") that precede its instruction.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass
from typing import Dict, List, Optional

FORMAT_VERSION = "mmtrain-shards/1"
MANIFEST_NAME = "manifest.json"
KINDS = ("mimicit",)
# Fixed member metadata so the same samples always give byte-identical shards (stable sha256).
_MEMBER_MTIME = 0


class FormatError(ValueError):
    """A sample or manifest does not follow the schema; the message says where."""


class BadSample(Exception):
    """One sample cannot be used. The loader counts it under `reason` and skips it; never fatal.

    Reasons used by mmtrain.data: bad_shard, truncated, missing_json, bad_json, bad_record,
    missing_image, bad_image, too_long, too_many_images, special_token_in_text.
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
        images = turn.get("images", [])
        if not isinstance(images, list) or not all(isinstance(x, str) for x in images):
            raise FormatError(f"{where}: turns[{i}].images must be a list of member names")


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
    """Writes samples into `shard-NNNNNN.tar` files of at most `max_samples` / `max_bytes` each,
    then `manifest.json`. Shards are written under a temporary name and renamed when complete.

    Usage:
        with ShardWriter(out_dir, kind="mimicit") as w:
            w.write(key, {"json": record_bytes, "0.jpg": jpeg_bytes})
    """

    def __init__(self, out_dir: str, kind: str, max_samples: int = 1000, max_bytes: int = 256 << 20):
        if kind not in KINDS:
            raise FormatError(f"unknown sample kind {kind!r}; known: {', '.join(KINDS)}")
        self.out_dir, self.kind = out_dir, kind
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self.shards: List[ShardInfo] = []
        self._tar: Optional[tarfile.TarFile] = None
        self._count = 0
        self._bytes = 0
        os.makedirs(out_dir, exist_ok=True)

    def _shard_path(self, index: int) -> str:
        return os.path.join(self.out_dir, f"shard-{index:06d}.tar")

    def _open(self) -> None:
        self._tmp_path = self._shard_path(len(self.shards)) + ".tmp"
        self._tar = tarfile.open(self._tmp_path, "w", format=tarfile.USTAR_FORMAT)
        self._count = self._bytes = 0

    def _close_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        final = self._tmp_path[: -len(".tmp")]
        os.replace(self._tmp_path, final)
        self.shards.append(ShardInfo(os.path.basename(final), self._count, sha256_file(final)))
        self._tar = None

    def write(self, key: str, members: Dict[str, bytes]) -> None:
        """Add one sample: `members` maps extension (e.g. "json", "0.jpg") to bytes."""
        if "." in key or "/" in key or not key:
            raise FormatError(f"sample key {key!r} must be non-empty with no '.' or '/'")
        size = sum(len(v) for v in members.values())
        if self._tar is not None and (self._count >= self.max_samples or self._bytes + size > self.max_bytes):
            self._close_shard()
        if self._tar is None:
            self._open()
        for ext in sorted(members, key=lambda e: (e != "json", e)):
            data = members[ext]
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), _MEMBER_MTIME, 0o644
            self._tar.addfile(info, io.BytesIO(data))
        self._count += 1
        self._bytes += size

    def close(self) -> List[ShardInfo]:
        self._close_shard()
        write_manifest(self.out_dir, self.kind, self.shards)
        return self.shards

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._tar is not None:
            self._tar.close()
            os.remove(self._tmp_path)


def write_manifest(out_dir: str, kind: str, shards: List[ShardInfo]) -> str:
    path = os.path.join(out_dir, MANIFEST_NAME)
    body = {
        "format": FORMAT_VERSION,
        "kind": kind,
        "num_samples": sum(s.num_samples for s in shards),
        "shards": [{"name": s.name, "num_samples": s.num_samples, "sha256": s.sha256} for s in shards],
    }
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
    for shard in manifest.get("shards", []):
        if not os.path.isfile(os.path.join(data_dir, shard["name"])):
            raise FormatError(f"{path}: lists {shard['name']}, which is missing from {data_dir}")
    if not manifest.get("shards"):
        raise FormatError(f"{path}: lists no shards")
    return manifest
