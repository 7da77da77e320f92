"""img2dataset image-text pairs, read as they are: a manifest over existing tars (kind "pairs").

`convert pairs SRC...`: SRC are tar files or directories holding them (their `*.tar`, not
recursive), in img2dataset's webdataset layout: `KEY.jpg` (or jpeg/png/webp) + `KEY.txt` (the
caption) [+ `KEY.json`]. Each tar is read once, as a stream: its sha256 and its samples are counted
in the same pass. A sample with an image and a caption counts; one lacking either is counted by
reason (`missing_image`, `missing_caption`; the loader skips it too). An unreadable tar is left
out of the manifest and counted (`bad_tar`).

Nothing is copied or rewritten: `manifest.json` goes to `out_dir` (default: the sources'
directory, when they share one and it is writable) and names each tar by its path relative to
that directory (`../laion/00000.tar`), which is how `read_manifest` and the loader resolve names.
Progress is journaled per tar (`data_tools.sharding.Journal`): an interrupted run resumes at the
next tar, and a re-run over unchanged tars is a no-op.
"""

from __future__ import annotations

import glob
import hashlib
import io
import os
import tarfile
from typing import List, Optional, Sequence, Tuple

from mmtrain.data.formats import PAIR_IMAGE_EXTENSIONS, ShardInfo, write_manifest

from . import DataToolError
from .inputs import file_stamp
from .sharding import JOURNAL_VERSION, ConvertResult, Journal, Stats, logger, progress
from .tars import iter_tar_groups


class _HashingReader(io.RawIOBase):
    """A file reader that hashes every byte read through it (sha256 and tar parsing in one pass)."""

    def __init__(self, f):
        self.f, self.digest = f, hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self.f.readinto(buffer)
        self.digest.update(memoryview(buffer)[:n])
        return n


def scan_pairs_tar(path: str) -> Tuple[int, str, Stats]:
    """(complete pairs, sha256 of the file, counts by reason of the incomplete samples)."""
    num_pairs, stats = 0, Stats()
    with open(path, "rb") as f:
        reader = _HashingReader(f)
        with tarfile.open(fileobj=reader, mode="r|") as tar:
            for key, members in iter_tar_groups(tar):
                stats.num_read += 1
                if not any(ext in members for ext in PAIR_IMAGE_EXTENSIONS):
                    stats.skip("missing_image", f"{path}: {key}")
                elif "txt" not in members:
                    stats.skip("missing_caption", f"{path}: {key}")
                else:
                    num_pairs += 1
        while reader.read(1 << 20):  # the end-of-archive padding tarfile does not read
            pass
    stats.num_written += num_pairs
    return num_pairs, reader.digest.hexdigest(), stats


def _find_tars(sources: Sequence[str]) -> List[str]:
    tars = []
    for src in sources:
        if os.path.isdir(src):
            found = sorted(glob.glob(os.path.join(glob.escape(src), "*.tar")))
            if not found:
                raise DataToolError(f"{src}: no *.tar in this directory")
            tars += found
        elif os.path.isfile(src):
            tars.append(src)
        else:
            raise DataToolError(f"{src}: no such file or directory (convert pairs)")
    return tars


def index_pairs(sources: Sequence[str], out_dir: Optional[str] = None, *, force: bool = False,
                quiet: bool = False) -> ConvertResult:
    """Write a pairs manifest over the tars of `sources` (see the module docstring)."""
    tars = _find_tars(sources)
    if out_dir is None:
        folders = {os.path.dirname(os.path.abspath(t)) for t in tars}
        if len(folders) != 1 or not os.access(next(iter(folders)), os.W_OK):
            raise DataToolError("convert pairs: the tars are not in one writable directory; give --out DIR")
        out_dir = folders.pop()
    os.makedirs(out_dir, exist_ok=True)
    log = logger(quiet)
    params = {"version": JOURNAL_VERSION, "corpus": "pairs", "kind": "pairs", "inputs": [file_stamp(t) for t in tars]}
    journal = Journal(out_dir, params, owns_shards=False, force=force, log=log)
    if journal.complete:
        return ConvertResult(out_dir, "pairs", journal.shards, journal.stats, up_to_date=True, action="listed")
    stats, first = journal.stats, (journal.position or [0])[0]
    shards = list(journal.shards)
    with progress(len(tars), first, "tars", quiet) as bar:
        for index in range(first, len(tars)):
            path = tars[index]
            try:
                num_pairs, sha256, tar_stats = scan_pairs_tar(path)
            except (tarfile.TarError, OSError, EOFError) as e:
                stats.skip("bad_tar", f"{path}: {type(e).__name__}: {e}")
                log(f"{path}: unreadable tar, left out of the manifest ({e})")
            else:
                stats.merge(tar_stats)
                shards.append(ShardInfo(os.path.relpath(path, out_dir), num_pairs, sha256))
                journal.add(shards[-1], [index + 1], stats)
            bar.update(1)
    if stats.num_written == 0:
        raise DataToolError(f"convert pairs: no image+caption pair in {len(tars)} tars\n{stats.describe('samples')}")
    write_manifest(out_dir, "pairs", shards, corpus="pairs", stats=stats.to_json())
    journal.finish([len(tars)], stats)
    return ConvertResult(out_dir, "pairs", shards, stats, resumed_shards=len(journal.shards), action="listed")
