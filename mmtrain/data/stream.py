"""Streaming, mixed, exactly resumable training batches from shard directories.

Per (rank, worker) — a *global worker* gw = rank * num_workers + worker, out of G = world_size *
max(num_workers, 1) — and per source, an epoch is:

1. the source's shards in a permutation seeded by (seed, epoch, source index);
2. this worker's share: shards perm[gw::G] when the source has >= G shards, else every shard read in
   that order keeping the samples whose running index % G == gw (so 1 shard still feeds 2 ranks);
3. a shuffle buffer seeded by (seed, epoch, gw, source index).

Tar files are scanned header by header (member offsets and sizes, no data read) into *refs*; the
shuffle buffer holds refs, and a sample's bytes are read only when it leaves the buffer. A worker
draws the source of each next sample from a counter-based RNG (seed, gw, draw index) by weight,
takes that source's next ref, reads, parses, tokenizes and decodes it, and skips it (counted by
reason) when it is broken. Each source loops over epochs forever, so every rank yields forever.

The cursor of a worker is (draws made, per source: epoch and refs consumed in that epoch, skip
counts). Restoring it re-scans the headers from the epoch start and replays the shuffle buffer
without reading or decoding any sample, so the stream continues exactly where it stopped.

With num_workers > 0 batches are made inside torch DataLoader workers (batch_size=None), which the
DataLoader visits round-robin; the loader remembers how many batches it handed out and rotates the
worker ids of a resumed DataLoader so the round-robin continues with the right worker.
"""

from __future__ import annotations

import copy
import json
import logging
import mmap
import os
import tarfile
import zlib
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from mmtrain.data.batching import Layout, Packer, packing_stats
from mmtrain.data.device_decode import IMAGE_DECODE_CHOICES, decode_jpegs, jpeg_for_device
from mmtrain.data.documents import build_document, build_pair
from mmtrain.data.episodes import TEMPLATES, Sample, build_prompt, build_sample
from mmtrain.data.formats import KINDS, BadSample, FormatError, read_manifest
from mmtrain.data.images import ImageSpec, decode_image, jpeg_decoder
from mmtrain.data.patches import PatchSpec, image_to_patches, place_patches
from mmtrain.data.tokenizer import TokenIds

log = logging.getLogger("mmtrain.data")

STATE_FORMAT = "mmtrain-loader/1"
SUPPORTED_KINDS = KINDS

# Distinct RNG streams; the numbers only need to differ.
_TAG_SHARDS, _TAG_BUFFER, _TAG_MIX = 1, 2, 3
_MIX_BLOCK = 4096


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) % (1 << 63) for k in key])


# --------------------------------------------------------------------------------------------- tar


@dataclass(frozen=True)
class _Ref:
    """A sample located in a shard; nothing read yet. `error` marks a sample that is broken on sight."""

    shard: str
    key: str
    members: Tuple[Tuple[str, int, int], ...]  # (extension, data offset, size)
    error: str = ""


def _split_member_name(name: str) -> Tuple[str, str]:
    """webdataset grouping: the key is the path up to the first '.' of the base name."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1 :]


def scan_shard(path: str) -> Iterator[_Ref]:
    """Yield one ref per sample of a tar shard from its headers alone (data is seeked over, not read).

    A member whose data runs past the end of the file, or a header error mid-file, marks the sample
    in progress `truncated` and ends the shard; a file that is not a tar yields one `bad_shard` ref.
    The result depends only on the file's bytes, so a replay scans exactly what the first pass did.

    Plain ustar headers (what ShardWriter, webdataset and GNU tar write for short names) are parsed
    here from an mmap, at less than half tarfile's cost; at the first header of any other kind (pax, GNU long names,
    a bad checksum, a truncated block) the shard is handed to tarfile, which re-scans it and skips
    the refs already yielded, so every shard gets exactly tarfile's reading.
    """
    yielded = 0
    try:
        for ref in _scan_plain_ustar(path):
            yield ref
            yielded += 1
        return
    except _NotPlainUstar:
        pass
    for i, ref in enumerate(_scan_with_tarfile(path)):
        if i >= yielded:
            yield ref


class _NotPlainUstar(Exception):
    """A header the plain-ustar scanner leaves to tarfile."""


_TAR_BLOCK = 512
# mode, uid, gid, mtime, devmajor, devminor: parsed by tarfile for every header, so checked here too.
_TAR_CHECKED_NUMBERS = ((100, 108), (108, 116), (116, 124), (136, 148), (329, 337), (337, 345))
_TAR_SUM_SPANS = ((0, 148), (156, 334), (334, 512))  # the header less its checksum field, <= 256 bytes each
_TAR_FILE_TYPES = (b"0", b"\0")  # regular files; everything else but directories goes to tarfile
_TAR_DIR_TYPE = b"5"


def _tar_number(field: bytes) -> int:
    """tarfile's nti() for the octal form; base-256 and malformed fields go to tarfile."""
    if field[:1] in (b"\x80", b"\xff"):
        raise _NotPlainUstar("base-256 number")
    try:
        return int(field.split(b"\0", 1)[0].decode("ascii").strip() or "0", 8)
    except (UnicodeDecodeError, ValueError):
        raise _NotPlainUstar("malformed number") from None


def _tar_checksum(block: bytes) -> int:
    """The unsigned header checksum: the byte sum with the checksum field (148:156) as 8 spaces.

    adler32's low 16 bits are 1 + the byte sum mod 65521, exact for <= 256 bytes (<= 65280), so
    three C calls replace a 10x slower Python sum over 504 bytes.
    """
    return sum(zlib.adler32(block[start:end]) & 0xFFFF for start, end in _TAR_SUM_SPANS) - len(_TAR_SUM_SPANS) + 8 * 32


def _scan_plain_ustar(path: str) -> Iterator[_Ref]:
    """scan_shard for archives of plain ustar headers; raises _NotPlainUstar where tarfile must decide.

    What it reproduces of tarfile's reading (TarInfo.frombuf, TarFile.next): a header is a 512-byte
    block whose checksum field is the byte sum with that field read as spaces and whose number
    fields are octal; an all-zero block, or the end of the file where a header would start, ends
    the archive; data occupy their size rounded up to 512 bytes. Names are ASCII here.
    """
    try:
        with open(path, "rb") as f:
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError):  # unreadable or empty (mmap refuses 0 bytes): tarfile names the error
        raise _NotPlainUstar("cannot map") from None
    with data:
        file_size, offset = len(data), 0
        key: Optional[str] = None
        members: List[Tuple[str, int, int]] = []
        error = ""
        while True:
            if offset >= file_size:
                if offset > file_size or offset == 0:  # padding cut off, or an empty file
                    raise _NotPlainUstar("end of data")
                break
            block = data[offset: offset + _TAR_BLOCK]
            if len(block) < _TAR_BLOCK:
                raise _NotPlainUstar("truncated header")
            if block.count(0) == _TAR_BLOCK:
                break
            if _tar_number(block[148:156]) != _tar_checksum(block):
                raise _NotPlainUstar("checksum")
            kind = block[156:157]
            name = block[:100].split(b"\0", 1)[0]
            # block[345]: a name prefix (tarfile >= 3.11 applies any, whatever the magic)
            # A file name ending in "/" (V7's directories) goes to tarfile too; directories do end so.
            if (kind not in _TAR_FILE_TYPES and kind != _TAR_DIR_TYPE) or not name.isascii() or block[345] != 0 \
                    or (kind != _TAR_DIR_TYPE and name.endswith(b"/")):
                raise _NotPlainUstar("header kind")
            for start, end in _TAR_CHECKED_NUMBERS:  # tarfile rejects the header when any is malformed
                _tar_number(block[start:end])
            size = _tar_number(block[124:136])
            offset_data = offset + _TAR_BLOCK
            offset = offset_data + (-(-size // _TAR_BLOCK) * _TAR_BLOCK if kind != _TAR_DIR_TYPE else 0)
            if kind == _TAR_DIR_TYPE:
                continue
            k, ext = _split_member_name(name.decode("ascii"))
            if k != key:
                if key is not None:
                    yield _Ref(path, key, tuple(members))
                key, members = k, []
            members.append((ext, offset_data, size))
            if offset_data + size > file_size:
                error = "truncated"
                break
        if key is not None:
            yield _Ref(path, key, tuple(members), error)


def _scan_with_tarfile(path: str) -> Iterator[_Ref]:
    """scan_shard through tarfile: every header kind tarfile reads."""
    try:
        file_size = os.path.getsize(path)
        tar = tarfile.open(path, mode="r:")
    except (OSError, tarfile.TarError) as e:
        log.warning("cannot open shard %s: %s", path, e)
        yield _Ref(path, os.path.basename(path), (), "bad_shard")
        return
    key: Optional[str] = None
    members: List[Tuple[str, int, int]] = []
    error = ""
    with tar:
        while True:
            try:
                info = tar.next()
            except (tarfile.TarError, OSError, EOFError) as e:
                log.warning("shard %s: unreadable tar header after key %r: %s", path, key, e)
                error = "truncated"
                break
            if info is None:
                break
            if not info.isfile():
                continue
            k, ext = _split_member_name(info.name)
            if k != key:
                if key is not None:
                    yield _Ref(path, key, tuple(members))
                key, members = k, []
            members.append((ext, info.offset_data, info.size))
            if info.offset_data + info.size > file_size:
                error = "truncated"
                break
            # tarfile keeps every header it saw; a shard of 10^5 members need not live in memory.
            tar.members = []
    if key is not None:
        yield _Ref(path, key, tuple(members), error)


class _FileCache:
    """A few open shard files (refs leave the shuffle buffer from several shards at once)."""

    def __init__(self, size: int = 8):
        self.size = size
        self.files: "OrderedDict[str, Any]" = OrderedDict()

    def read(self, ref: _Ref) -> Dict[str, bytes]:
        f = self.files.pop(ref.shard, None)
        if f is None:
            f = open(ref.shard, "rb", buffering=0)  # one pread per member: no seek, no buffer copy
            while len(self.files) >= self.size:
                self.files.popitem(last=False)[1].close()
        self.files[ref.shard] = f
        out: Dict[str, bytes] = {}
        fd = f.fileno()
        for ext, offset, size in ref.members:
            data = os.pread(fd, size, offset)
            if len(data) != size:
                raise BadSample("truncated", f"{ref.shard}:{ref.key}.{ext} has {len(data)} of {size} bytes")
            out[ext] = data
        return out

    def close(self) -> None:
        for f in self.files.values():
            f.close()
        self.files.clear()


def iter_shard_samples(path: str) -> Iterator[Tuple[str, Dict[str, bytes], str]]:
    """(key, members ext -> bytes, error) for every sample of one shard, in tar order; error is '' when fine."""
    cache = _FileCache(1)
    try:
        for ref in scan_shard(path):
            if ref.error:
                yield ref.key, {}, ref.error
                continue
            try:
                yield ref.key, cache.read(ref), ""
            except (BadSample, OSError) as e:
                yield ref.key, {}, getattr(e, "reason", "truncated")
    finally:
        cache.close()


# ------------------------------------------------------------------------------------------ sources


@dataclass(frozen=True)
class SourceSpec:
    """A training source resolved against its manifest: name, weight and absolute shard paths."""

    name: str
    path: str
    kind: str
    weight: float
    shards: Tuple[str, ...]
    num_samples: int


def resolve_sources(sources: Sequence[Any]) -> List[SourceSpec]:
    """Accept config DataSource objects, dicts (name, path, kind, weight) or plain paths."""
    out: List[SourceSpec] = []
    for i, src in enumerate(sources):
        if isinstance(src, (str, os.PathLike)):
            src = {"name": os.path.basename(os.path.normpath(str(src))), "path": str(src)}
        get = src.get if isinstance(src, Mapping) else lambda k, d=None, s=src: getattr(s, k, d)
        name, path = get("name"), get("path")
        kind, weight = get("kind", "mimicit") or "mimicit", float(get("weight", 1.0))
        if not name or not path:
            raise ValueError(f"data.sources[{i}]: needs a name and a path, got {src!r}")
        if kind not in SUPPORTED_KINDS:
            raise ValueError(f"data.sources[{i}].kind: {kind!r} is not supported; supported: {', '.join(SUPPORTED_KINDS)}")
        if weight <= 0:
            raise ValueError(f"data.sources[{i}].weight: must be > 0, got {weight}")
        manifest = read_manifest(str(path))
        if manifest["kind"] != kind:
            raise FormatError(f"data.sources[{i}]: {path} holds kind {manifest['kind']!r}, the source says {kind!r}")
        shards = tuple(os.path.join(str(path), s["name"]) for s in manifest["shards"])
        num = int(manifest.get("num_samples", sum(int(s.get("num_samples", 0)) for s in manifest["shards"])))
        out.append(SourceSpec(str(name), str(path), kind, weight, shards, num))
    if not out:
        raise ValueError("data.sources: at least one source is needed")
    names = [s.name for s in out]
    if len(set(names)) != len(names):
        raise ValueError(f"data.sources: names must be unique, got {names}")
    return out


class _SourceStream:
    """One source as seen by one global worker: refs in epoch order, resumable by (epoch, consumed)."""

    def __init__(self, spec: SourceSpec, index: int, seed: int, gw: int, num_global: int, buffer: int, epoch: int, consumed: int):
        self.spec, self.index, self.seed = spec, index, seed
        self.gw, self.num_global, self.buffer = gw, num_global, max(1, buffer)
        self.epoch, self.consumed = epoch, consumed
        self._it: Optional[Iterator[_Ref]] = None

    def _worker_refs(self, epoch: int) -> Iterator[_Ref]:
        shards = self.spec.shards
        order = _rng(self.seed, _TAG_SHARDS, epoch, self.index).permutation(len(shards))
        if len(shards) >= self.num_global:
            for j in order[self.gw :: self.num_global]:
                yield from scan_shard(shards[j])
        else:
            index = 0
            for j in order:
                for ref in scan_shard(shards[j]):
                    if index % self.num_global == self.gw:
                        yield ref
                    index += 1

    def _shuffled(self, epoch: int) -> Iterator[_Ref]:
        rng = _rng(self.seed, _TAG_BUFFER, epoch, self.gw, self.index)
        buf: List[_Ref] = []
        for ref in self._worker_refs(epoch):
            if len(buf) < self.buffer:
                buf.append(ref)
                continue
            j = int(rng.integers(len(buf)))
            out, buf[j] = buf[j], ref
            yield out
        while buf:
            j = int(rng.integers(len(buf)))
            out, buf[j] = buf[j], buf[-1]
            buf.pop()
            yield out

    def next_ref(self) -> _Ref:
        while True:
            if self._it is None:
                self._it = self._shuffled(self.epoch)
                # Resume: replay the epoch up to the cursor; refs only, nothing read or decoded.
                for n in range(self.consumed):
                    if next(self._it, None) is None:
                        raise ValueError(
                            f"source {self.spec.name!r}: the cursor says {self.consumed} samples of epoch {self.epoch} "
                            f"were consumed by global worker {self.gw}, but that share has only {n}; did the shards change?"
                        )
            ref = next(self._it, None)
            if ref is not None:
                self.consumed += 1
                return ref
            if self.consumed == 0:
                raise RuntimeError(
                    f"source {self.spec.name!r} ({self.spec.path}): global worker {self.gw} of {self.num_global} got no "
                    f"samples in epoch {self.epoch}; the source has {self.spec.num_samples} samples in "
                    f"{len(self.spec.shards)} shards. Use fewer workers or ranks, or more data."
                )
            self.epoch, self.consumed, self._it = self.epoch + 1, 0, None


class _Mixer:
    """Source choice of draw i = f(seed, gw, i): a counter-based stream, so the cursor is one integer."""

    def __init__(self, seed: int, gw: int, weights: Sequence[float], draws: int):
        w = np.asarray(weights, dtype=np.float64)
        self.cum = np.cumsum(w / w.sum())
        self.seed, self.gw, self.draws = seed, gw, draws
        self._block_index, self._block = -1, None

    def next(self) -> int:
        block, i = divmod(self.draws, _MIX_BLOCK)
        self.draws += 1
        if len(self.cum) == 1:
            return 0
        if block != self._block_index:
            self._block = _rng(self.seed, _TAG_MIX, self.gw, block).random(_MIX_BLOCK)
            self._block_index = block
        return min(int(np.searchsorted(self.cum, self._block[i], side="right")), len(self.cum) - 1)


# ------------------------------------------------------------------------------------------ batches


@dataclass
class _StreamConfig:
    sources: List[SourceSpec]
    tokenizer: Any
    token_ids: TokenIds
    image_spec: Union[ImageSpec, PatchSpec]
    template: str
    max_seq_tokens: int
    max_images: int
    micro_batch_size: int
    seed: int
    rank: int
    world_size: int
    num_workers: int
    shuffle_buffer_samples: int
    packing: bool = False
    max_doc_images: int = 64
    max_frames: int = 8
    image_decode: str = "workers"  # or "device": JPEGs pass through undecoded (mmtrain.data.device_decode)

    @property
    def layout(self) -> Layout:
        spec = self.image_spec
        if isinstance(spec, PatchSpec):
            return Layout(self.max_seq_tokens, self.max_images, self.token_ids.pad, patch_dim=spec.patch_dim,
                          image_token_id=self.token_ids.image)
        return Layout(self.max_seq_tokens, self.max_images, self.token_ids.pad, image_size_px=spec.size_px)

    @property
    def workers_per_rank(self) -> int:
        return max(1, self.num_workers)

    @property
    def num_global_workers(self) -> int:
        return self.world_size * self.workers_per_rank


def _fresh_cursor(cfg: _StreamConfig, worker: int) -> Dict[str, Any]:
    return {
        "worker": worker,
        "batches": 0,
        "mix_draws": 0,
        "sources": {s.name: {"epoch": 0, "consumed": 0} for s in cfg.sources},
        "skipped": {},
        "pending": [],
    }


class _WorkerStream:
    """Batches of one global worker, from a cursor."""

    def __init__(self, cfg: _StreamConfig, worker: int, cursor: Mapping[str, Any]):
        self.cfg, self.worker = cfg, worker
        self.gw = cfg.rank * cfg.workers_per_rank + worker
        self.batches = int(cursor["batches"])
        self.skipped = Counter({k: int(v) for k, v in cursor["skipped"].items()})
        self.sources = [
            _SourceStream(
                spec, i, cfg.seed, self.gw, cfg.num_global_workers, cfg.shuffle_buffer_samples,
                int(cursor["sources"][spec.name]["epoch"]), int(cursor["sources"][spec.name]["consumed"]),
            )
            for i, spec in enumerate(cfg.sources)
        ]
        self.mixer = _Mixer(cfg.seed, self.gw, [s.weight for s in cfg.sources], int(cursor["mix_draws"]))
        self.files = _FileCache()
        self._broken_streak = [0] * len(cfg.sources)
        self._warned: set = set()
        # Samples drawn but not yet in a batch (packing: the one that closed the last batch), kept
        # in the cursor as refs so a resumed stream rebuilds them first.
        self.pending: List[Tuple[int, _Ref]] = [
            (int(p["source"]), _Ref(p["shard"], p["key"], tuple(tuple(m) for m in p["members"])))
            for p in cursor.get("pending", [])
        ]

    def cursor(self) -> Dict[str, Any]:
        return {
            "worker": self.worker,
            "batches": self.batches,
            "mix_draws": self.mixer.draws,
            "sources": {s.spec.name: {"epoch": s.epoch, "consumed": s.consumed} for s in self.sources},
            "skipped": dict(sorted(self.skipped.items())),
            "pending": [{"source": i, "shard": r.shard, "key": r.key, "members": [list(m) for m in r.members]}
                        for i, r in self.pending],
        }

    def _make(self, ref: _Ref, source: SourceSpec) -> Sample:
        if ref.error:
            raise BadSample(ref.error, f"{ref.shard}:{ref.key}")
        members = self.files.read(ref)
        cfg = self.cfg
        where = f"{ref.shard}:{ref.key}"
        common = dict(template=cfg.template, max_seq_tokens=cfg.max_seq_tokens)
        if source.kind == "pairs":
            sample = build_pair(members, cfg.tokenizer, cfg.token_ids, sample_id=ref.key, source=source.name, **common)
        else:
            record = _parse_record(members, where)
            sample_id = str(record.get("id") or ref.key) if isinstance(record, dict) else ref.key
            if source.kind == "interleaved":
                sample = build_document(record, cfg.tokenizer, cfg.token_ids, max_images=cfg.max_images,
                                        max_doc_images=cfg.max_doc_images, members=members, sample_id=sample_id,
                                        source=source.name, **common)
            else:
                sample = build_sample(record, cfg.tokenizer, cfg.token_ids, max_images=cfg.max_images,
                                      max_frames=cfg.max_frames, members=members, sample_id=sample_id,
                                      source=source.name, **common)
        if isinstance(cfg.image_spec, PatchSpec):
            grids = [image_to_patches(data, cfg.image_spec) for data in sample.images]
            return place_patches(sample, grids, cfg.token_ids, cfg.max_seq_tokens)
        defer = cfg.image_decode == "device"
        sample.images = [data if defer and jpeg_for_device(data) else decode_image(data, cfg.image_spec)
                         for data in sample.images]
        return sample

    def next_sample(self) -> Sample:
        if self.pending:
            s, ref = self.pending.pop(0)
            sample = self._make(ref, self.sources[s].spec)  # built fine before: same bytes, same sample
            sample.ref = (s, ref)
            return sample
        while True:
            s = self.mixer.next()
            stream = self.sources[s]
            ref = stream.next_ref()
            try:
                sample = self._make(ref, stream.spec)
            except BadSample as e:
                self.skipped[e.reason] += 1
                level = logging.DEBUG if e.reason in self._warned else logging.WARNING
                self._warned.add(e.reason)
                log.log(level, "skipping sample %s/%s (%s); further %s samples are logged at debug level",
                        stream.spec.name, ref.key, e, e.reason)
                self._broken_streak[s] += 1
                if self._broken_streak[s] > stream.spec.num_samples + 1:
                    raise RuntimeError(
                        f"source {stream.spec.name!r} ({stream.spec.path}): {self._broken_streak[s]} broken samples in a "
                        f"row, more than it holds; skip counts {dict(self.skipped)}"
                    ) from e
                continue
            self._broken_streak[s] = 0
            sample.ref = (s, ref)
            return sample

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        cfg = self.cfg
        try:
            while True:
                packer = Packer(cfg.micro_batch_size, cfg.layout, cfg.packing)
                samples: List[Sample] = []
                while not packer.full:
                    sample = self.next_sample()
                    if not packer.offer(sample):
                        self.pending.append(sample.ref)
                        break
                    samples.append(sample)
                batch = packer.batch()
                self.batches += 1
                batch["meta"] = {
                    "sample_ids": [s.sample_id for s in samples],
                    "sources": [s.source for s in samples],
                    "worker_cursor": self.cursor(),
                    **packing_stats(batch, len(samples)),
                }
                yield batch
        finally:
            self.files.close()


def _parse_record(members: Dict[str, bytes], where: str) -> Any:
    raw = members.pop("json", None)
    if raw is None:
        raise BadSample("missing_json", f"{where} has members {sorted(members)}")
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadSample("bad_json", f"{where}: {e}") from None


class _WorkerDataset(torch.utils.data.IterableDataset):
    """What each DataLoader worker runs. Physical worker p plays logical worker (p + offset) % W."""

    def __init__(self, cfg: _StreamConfig, cursors: List[Dict[str, Any]], offset: int):
        super().__init__()
        self.cfg, self.cursors, self.offset = cfg, cursors, offset

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        physical = info.id if info is not None else 0
        worker = (physical + self.offset) % self.cfg.workers_per_rank
        return iter(_WorkerStream(self.cfg, worker, self.cursors[worker]))


class TrainLoader:
    """Infinite iterable of training batches for one data-parallel rank, with exact resume.

    `state_dict()` is the position after the last batch handed out; `load_state_dict()` before
    iterating continues from it. Iterating again continues from the current position too.
    """

    def __init__(self, cfg: _StreamConfig, pin_memory: bool = False, prefetch_factor: int = 2,
                 decode_device: Optional[torch.device] = None):
        self.cfg, self.pin_memory, self.prefetch_factor = cfg, pin_memory, prefetch_factor
        # Where the JPEGs the workers passed on are decoded (image_decode="device").
        self.decode_device = decode_device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self._device_share_logged = False
        self._state = self._fresh_state()
        self._gen: Optional[Iterator[Dict[str, Any]]] = None

    def _fresh_state(self) -> Dict[str, Any]:
        cfg = self.cfg
        return {
            "format": STATE_FORMAT,
            "seed": cfg.seed,
            "rank": cfg.rank,
            "world_size": cfg.world_size,
            "num_workers": cfg.num_workers,
            "sources": [s.name for s in cfg.sources],
            "batches": 0,
            "workers": [_fresh_cursor(cfg, w) for w in range(cfg.workers_per_rank)],
            # Skip counts of this process: images the device could not decode, by reason.
            "device_skipped": {},
        }

    def state_dict(self) -> Dict[str, Any]:
        return copy.deepcopy(self._state)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        expected = self._fresh_state()
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"data loader state has format {state.get('format')!r}, expected {STATE_FORMAT!r}")
        for key in ("seed", "rank", "world_size", "num_workers", "sources"):
            if state.get(key) != expected[key]:
                raise ValueError(
                    f"data loader state was saved with {key}={state.get(key)!r} but this run has {expected[key]!r}; "
                    "exact resume needs the same seed, ranks, workers per rank and sources"
                )
        if len(state["workers"]) != len(expected["workers"]):
            raise ValueError(f"data loader state has {len(state['workers'])} worker cursors, expected {len(expected['workers'])}")
        self.close()
        self._state = copy.deepcopy(dict(state))
        self._state.setdefault("device_skipped", {})  # states saved before device decoding existed

    @property
    def skipped(self) -> Dict[str, int]:
        """Broken samples skipped so far on this rank (cumulative over resumes), by reason."""
        total: Counter = Counter(self._state["device_skipped"])
        for cursor in self._state["workers"]:
            total.update(cursor["skipped"])
        return dict(sorted(total.items()))

    def close(self) -> None:
        """Stop the current iteration (and its worker processes)."""
        if self._gen is not None:
            self._gen.close()
            self._gen = None

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        self.close()
        self._gen = self._generate()
        return self._gen

    def __next__(self) -> Dict[str, Any]:
        if self._gen is None:
            iter(self)
        return next(self._gen)

    def _hand_out(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        if self.cfg.image_decode == "device":
            self._decode_on_device(batch)
        meta = batch["meta"]
        cursor = meta["worker_cursor"]
        self._state["workers"][cursor["worker"]] = cursor
        self._state["batches"] += 1
        meta["cursor"] = self.state_dict()
        meta["skipped"] = self.skipped
        return batch

    def _decode_on_device(self, batch: Dict[str, Any]) -> None:
        """The JPEGs the workers passed on, decoded into `images`, which are on the device after."""
        jpegs = batch.pop("jpegs", None)
        images = batch["images"] = batch["images"].to(self.decode_device, non_blocking=True)
        deferred = 0 if jpegs is None else len(jpegs["slots"])
        if not self._device_share_logged:  # says whether the option does anything for this data
            self._device_share_logged = True
            log.info("data: %d of the first batch's %d images decoded on %s", deferred,
                     int(batch["num_images"].sum()), self.decode_device)
        if jpegs is None:
            return
        failed = decode_jpegs(images, jpegs, self.cfg.image_spec)
        if failed:
            counts = Counter(self._state["device_skipped"])
            counts.update(failed)
            self._state["device_skipped"] = dict(sorted(counts.items()))

    def _generate(self) -> Iterator[Dict[str, Any]]:
        cfg = self.cfg
        cursors = copy.deepcopy(self._state["workers"])
        if cfg.num_workers == 0:
            for batch in _WorkerStream(cfg, 0, cursors[0]):
                yield self._hand_out(batch)
            return
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # forked workers + Rust thread pool
        dataset = _WorkerDataset(cfg, cursors, offset=self._state["batches"] % cfg.num_workers)
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=None,
            num_workers=cfg.num_workers,
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor,
            persistent_workers=False,
        )
        it = iter(loader)
        try:
            for batch in it:
                yield self._hand_out(batch)
        finally:
            shutdown = getattr(it, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()


def coerce_image_spec(spec: Union[ImageSpec, PatchSpec, Mapping[str, Any]], min_px: int = 448, max_px: int = 1024):
    """The model's image contract (`ModelSpec.image_spec`): a square ImageSpec, or a PatchSpec when
    its `layout` is "patches" (Fuyu), whose resolution bounds come from the recipe."""
    if isinstance(spec, (ImageSpec, PatchSpec)):
        return spec
    if spec.get("layout") == "patches":
        return PatchSpec(patch_px=int(spec["patch_px"]), min_px=min_px, max_px=max_px)
    return ImageSpec.coerce(spec)


def build_train_loader(
    sources: Sequence[Any],
    tokenizer,
    token_ids: TokenIds,
    image_spec: Union[ImageSpec, Mapping[str, Any]],
    *,
    template: str = "simple",
    max_seq_tokens: int,
    max_images: int,
    micro_batch_size: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    shuffle_buffer_samples: int = 256,
    packing: bool = False,
    max_doc_images: int = 64,
    max_frames: int = 8,
    image_min_px: int = 448,
    image_max_px: int = 1024,
    pin_memory: bool = False,
    prefetch_factor: int = 2,
    image_decode: str = "workers",
    decode_device: Optional[torch.device] = None,
) -> TrainLoader:
    """The training loader of one rank (see the module docstring); manifests are read and checked here.

    `image_decode="device"` leaves JPEGs to `decode_device` (default: CUDA when there is one), which
    decodes each batch's in the training process as the batch is handed out (data.image_decode).
    """
    if template not in TEMPLATES:
        raise ValueError(f"data.template: {template!r} is not one of {', '.join(TEMPLATES)}")
    if image_decode not in IMAGE_DECODE_CHOICES:
        raise ValueError(f"data.image_decode: {image_decode!r} is not one of {', '.join(IMAGE_DECODE_CHOICES)}")
    for name, value in (("max_seq_tokens", max_seq_tokens), ("max_images", max_images), ("micro_batch_size", micro_batch_size),
                        ("world_size", world_size), ("shuffle_buffer_samples", shuffle_buffer_samples)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    cfg = _StreamConfig(
        sources=resolve_sources(sources), tokenizer=tokenizer, token_ids=token_ids,
        image_spec=coerce_image_spec(image_spec, image_min_px, image_max_px),
        template=template, max_seq_tokens=max_seq_tokens, max_images=max_images, micro_batch_size=micro_batch_size,
        seed=seed, rank=rank, world_size=world_size, num_workers=num_workers, shuffle_buffer_samples=shuffle_buffer_samples,
        packing=packing, max_doc_images=max_doc_images, max_frames=max_frames, image_decode=image_decode,
    )
    if image_decode == "device" and isinstance(cfg.image_spec, PatchSpec):
        raise ValueError("data.image_decode: 'device' decodes square images for a vision encoder; this model's "
                         "variable-resolution patches (Fuyu) are cut in the workers, so use 'workers'")
    loader = TrainLoader(cfg, pin_memory=pin_memory, prefetch_factor=prefetch_factor, decode_device=decode_device)
    if isinstance(cfg.image_spec, ImageSpec):  # simplejpeg is optional: say which decoder runs
        library = "nvJPEG" if loader.decode_device.type == "cuda" else "libjpeg"
        where = f"on {loader.decode_device} ({library} through torchvision), the rest in" if image_decode == "device" else "in"
        log.info("data: JPEG decoding %s the workers with %s", where, jpeg_decoder())
    return loader


# --------------------------------------------------------------------------------------------- eval


def iter_eval_prompts(
    path: str,
    tokenizer,
    token_ids: TokenIds,
    image_spec: Union[ImageSpec, Mapping[str, Any]],
    template: str = "simple",
    max_seq_tokens: int = 2048,
    max_images: int = 5,
    max_samples: Optional[int] = None,
    max_frames: int = 8,
) -> Iterator[Tuple[str, torch.Tensor, torch.Tensor, str]]:
    """(sample_id, prompt_ids [1, T] long, images [1, N>=1, 3, H, W], reference answer) in manifest order.

    The same on every rank. Broken samples are skipped (logged, with counts at the end).
    """
    spec = ImageSpec.coerce(image_spec)
    manifest = read_manifest(path)
    skipped: Counter = Counter()
    produced = 0
    try:
        for shard in manifest["shards"]:
            for key, members, error in iter_shard_samples(os.path.join(path, shard["name"])):
                if max_samples is not None and produced >= max_samples:
                    return
                try:
                    if error:
                        raise BadSample(error, key)
                    raw = members.pop("json", None)
                    if raw is None:
                        raise BadSample("missing_json", key)
                    try:
                        record = json.loads(raw.decode("utf-8"))
                    except (UnicodeDecodeError, json.JSONDecodeError) as e:
                        raise BadSample("bad_json", f"{key}: {e}") from None
                    sid = str(record.get("id") or key) if isinstance(record, dict) else key
                    prompt = build_prompt(
                        record, tokenizer, token_ids, template=template, max_seq_tokens=max_seq_tokens,
                        max_images=max_images, max_frames=max_frames, members=members, sample_id=sid,
                    )
                    images = [decode_image(data, spec) for data in prompt.images]
                except BadSample as e:
                    skipped[e.reason] += 1
                    log.warning("eval: skipping %s in %s (%s)", key, shard["name"], e)
                    continue
                pixels = torch.stack(images) if images else spec.blank(1)
                produced += 1
                yield sid, torch.tensor([prompt.input_ids], dtype=torch.long), pixels.unsqueeze(0), prompt.answer
    finally:
        if skipped:
            log.warning("eval: skipped %d broken samples of %s: %s", sum(skipped.values()), path, dict(skipped))
