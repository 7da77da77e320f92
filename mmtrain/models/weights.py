"""Published weight layouts: reading HF safetensors checkpoints one tensor at a time, matching their
keys and shapes to a model, and writing HF sharded safetensors one tensor at a time.

Nothing here imports the engine: :mod:`mmtrain.engine.load` (ZeRO-3 partitioned loading) and
:mod:`mmtrain.engine.export` (ZeRO checkpoint → published layout) build on it, and
:func:`mmtrain.models.io.load_pretrained` uses it for plain models.

Reading (:class:`SafetensorsCheckpoint`): a directory with `model.safetensors.index.json` and its
shards, a directory with one `model.safetensors`, or a `.safetensors` file. Only the headers are read
up front; `read(key)` reads one tensor's bytes with `pread` into a buffer it owns. Not
`safetensors.safe_open`: its tensors (safetensors 0.8) are views of a private mmap whose touched
pages stay resident until the handle closes, so streaming a whole checkpoint through one handle
raises the process's RSS high-water mark by the checkpoint's size (measured: 1 GB file → +1 GB
VmHWM, all of it RssFile). With `pread` the process holds one tensor; the page cache is the kernel's.

Matching (:func:`plan_load`): a model's parameter names go through its :class:`PublishedLayout`
(name mapping, aliases of other writers, rows that may be shorter in a file, buffer keys to skip);
missing, unexpected and mis-shaped keys are one error listing each kind (first 10 and the count).

Writing (:func:`write_sharded`): the header of each shard is computed from shapes and dtypes
alone, then the tensors are fetched and written one by one, so the writer never holds more than one
tensor (HF names: `model-00001-of-00003.safetensors` + `model.safetensors.index.json`; a single
shard is `model.safetensors` without an index, as transformers writes it).

What a model family provides (:class:`PublishedLayout`): its models' `published_layout()` returns
one, or None (IDEFICS: `flamingo.idefics.idefics_layout`; OpenFlamingo / Otter, load only:
`flamingo.openflamingo.openflamingo_layout`; Fuyu: `fuyu.model`); a model without one gets the
identity layout (names as they are, no transformers class to export to). A layout may split one published tensor by
rows over several parameters (`row_splits`: each part reads only its rows) and rename each file's
keys (`source_keys`) for checkpoints published in parts; :func:`plan_load_sources` matches several
files applied in order (missing keys over their union). Torch pickles (`checkpoint.pt`,
`pytorch_model.bin`) are read by :class:`TorchCheckpoint` (`torch.load(mmap=True, weights_only=True)`);
:func:`open_checkpoint` picks the reader.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, FrozenSet, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

INDEX_NAME = "model.safetensors.index.json"
WEIGHTS_NAME = "model.safetensors"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
# Errors list this many keys of each kind, then the count.
MAX_LISTED_KEYS = 10

_ST_DTYPES: Dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_ST_NAMES: Dict[torch.dtype, str] = {dtype: name for name, dtype in _ST_DTYPES.items()}

Shape = Tuple[int, ...]


class WeightsMismatchError(ValueError):
    """A checkpoint and a model do not match: missing, unexpected or mis-shaped keys (all listed)."""


def format_keys(keys: Sequence[str], limit: int = MAX_LISTED_KEYS) -> str:
    """`a, b, c` or `a, b, ... (+38 more, 40 in all)`."""
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return shown if len(keys) <= limit else f"{shown}, ... (+{len(keys) - limit} more, {len(keys)} in all)"


def parse_size(size: Union[int, str]) -> int:
    """Bytes from an int or a string like `5GB` (10^9), `500MiB` (2^20), `2e9`."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]?i?B)?\s*", str(size))
    if not match:
        raise ValueError(f"size {size!r}: expected bytes or a number with KB/MB/GB/TB (10^3) or KiB/MiB/GiB/TiB (2^10)")
    units = {None: 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}
    if match.group(2) not in units:
        raise ValueError(f"size {size!r}: unknown unit {match.group(2)!r}")
    return int(float(match.group(1)) * units[match.group(2)])


def _numel(shape: Shape) -> int:
    n = 1
    for dim in shape:
        n *= int(dim)
    return n


_MALLOC_TRIM: Any = None
# Tensors at least this large are followed by a malloc_trim (see release_freed_memory).
TRIM_AFTER_BYTES = 2**20


def release_freed_memory() -> None:
    """Give freed heap memory back to the OS (glibc's `malloc_trim(0)`; a no-op elsewhere).

    Streaming tensors of many sizes through glibc's allocator raises its dynamic mmap threshold
    to the largest size freed so far, after which big buffers come from the heap and their freed
    pages stay in the process: measured on a 209 MB checkpoint under ZeRO-3, the load's RSS grew
    by 1.17x the checkpoint without this and by 2x its largest tensor with it. Called after each
    tensor of TRIM_AFTER_BYTES or more; one call costs well under a millisecond here.
    """
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            import ctypes

            _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


def full_shape(param: torch.Tensor) -> Shape:
    """A parameter's full shape, also when ZeRO-3 has partitioned it (its `ds_shape`)."""
    return tuple(int(d) for d in getattr(param, "ds_shape", param.shape))


# ------------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class TensorInfo:
    key: str
    shape: Shape
    dtype: torch.dtype
    file: str
    offset: int
    """Absolute byte offset of the tensor's data in `file`."""
    nbytes: int


def read_safetensors_header(path: Union[str, Path]) -> Tuple[Dict[str, TensorInfo], Dict[str, str]]:
    """The tensors of one safetensors file (key → TensorInfo) and its `__metadata__`; reads the header only."""
    path = str(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (header_len,) = struct.unpack("<Q", prefix)
        size = os.fstat(f.fileno()).st_size
        if header_len > size - 8:
            raise ValueError(f"{path}: not a safetensors file (header length {header_len} exceeds the file)")
        header = json.loads(f.read(header_len))
    metadata = header.pop("__metadata__", None) or {}
    base = 8 + header_len
    infos: Dict[str, TensorInfo] = {}
    for key, entry in header.items():
        if entry["dtype"] not in _ST_DTYPES:
            raise ValueError(f"{path}: tensor {key!r} has dtype {entry['dtype']} that mmtrain does not read")
        dtype = _ST_DTYPES[entry["dtype"]]
        begin, end = entry["data_offsets"]
        shape = tuple(int(d) for d in entry["shape"])
        expected = _numel(shape) * torch.empty((), dtype=dtype).element_size()
        if end - begin != expected or base + end > size:
            raise ValueError(f"{path}: tensor {key!r} ({entry['dtype']} {list(shape)}) has a bad byte range [{begin}, {end})")
        infos[key] = TensorInfo(key, shape, dtype, path, base + begin, end - begin)
    return infos, metadata


def _index_or_weights(path: Path, index_name: str, weights_name: str) -> Path:
    """A checkpoint directory → its index (sharded) or its one weights file; a file as it is."""
    if path.is_dir():
        if (path / index_name).is_file():
            return path / index_name
        if (path / weights_name).is_file():
            return path / weights_name
        found = sorted(p.name for p in path.iterdir())[:20]
        raise FileNotFoundError(f"{path}: neither {index_name} nor {weights_name} (found {found})")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file or directory")
    return path


class _FileTensors:
    """Tensors at known byte ranges of files (`TensorInfo`), read one at a time with `pread` into a
    buffer the caller owns: the process holds no mapping of the files, so reading a whole checkpoint
    raises its RSS by one tensor, not by the files' size (the page cache is the kernel's)."""

    def __init__(self) -> None:
        self._infos: Dict[str, TensorInfo] = {}
        self._fds: Dict[str, int] = {}

    def keys(self) -> List[str]:
        return list(self._infos)

    def __contains__(self, key: str) -> bool:
        return key in self._infos

    def __len__(self) -> int:
        return len(self._infos)

    def info(self, key: str) -> TensorInfo:
        return self._infos[key]

    def shapes(self) -> Dict[str, Shape]:
        return {key: info.shape for key, info in self._infos.items()}

    @property
    def total_bytes(self) -> int:
        return sum(info.nbytes for info in self._infos.values())

    def read(self, key: str) -> torch.Tensor:
        """The tensor `key` in the file's dtype, in a buffer of its own (no mmap kept)."""
        info = self._infos[key]
        buffer = torch.empty(info.nbytes, dtype=torch.uint8)
        self._pread(info, buffer)
        return buffer.view(info.dtype).reshape(info.shape)

    def read_rows(self, key: str, first: int, rows: int) -> torch.Tensor:
        """Rows `first .. first+rows-1` of the tensor `key` (dim 0), reading only their bytes."""
        info = self._infos[key]
        row_bytes = info.nbytes // info.shape[0] if info.shape and info.shape[0] else 0
        if first < 0 or rows < 0 or first + rows > (info.shape[0] if info.shape else 0):
            raise ValueError(f"{key}: rows {first}..{first + rows - 1} outside its {list(info.shape)}")
        part = dataclasses.replace(info, shape=(rows, *info.shape[1:]), offset=info.offset + first * row_bytes,
                                   nbytes=rows * row_bytes)
        buffer = torch.empty(part.nbytes, dtype=torch.uint8)
        self._pread(part, buffer)
        return buffer.view(info.dtype).reshape(part.shape)

    def can_read_into(self, key: str, out: torch.Tensor) -> bool:
        info = self._infos[key]
        return (out.device.type == "cpu" and out.dtype == info.dtype and out.is_contiguous()
                and out.numel() == _numel(info.shape))

    def read_into(self, key: str, out: torch.Tensor) -> None:
        """Read `key` straight into `out` (CPU, contiguous, same dtype and element count): no second buffer."""
        if not self.can_read_into(key, out):
            raise ValueError(f"{key}: cannot read {self._infos[key].dtype} {list(self._infos[key].shape)} into "
                             f"{out.dtype} {list(out.shape)} on {out.device}")
        self._pread(self._infos[key], out.reshape(-1).view(torch.uint8))

    def _pread(self, info: TensorInfo, buffer: torch.Tensor) -> None:
        if not info.nbytes:
            return
        view = memoryview(buffer.numpy())
        fd = self._fd(info.file)
        done = 0
        while done < info.nbytes:
            # pread may return less than asked (Linux caps one call near 2 GiB).
            count = os.preadv(fd, [view[done:]], info.offset + done)
            if count <= 0:
                raise EOFError(f"{info.file}: truncated while reading {info.key!r}")
            done += count

    def _fd(self, file: str) -> int:
        if file not in self._fds:
            self._fds[file] = os.open(file, os.O_RDONLY)
        return self._fds[file]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SafetensorsCheckpoint(_FileTensors):
    """Lazy access to an HF safetensors checkpoint, one tensor at a time, by checkpoint key.

    `path`: a directory holding `model.safetensors.index.json` (sharded) or `model.safetensors`, or
    a `.safetensors` / `.index.json` file. Use as a context manager (or call `close`).
    """

    def __init__(self, path: Union[str, Path]):
        super().__init__()
        self.path = str(path)
        files = self._weight_files(Path(path))
        for file, keys in files.items():
            infos, _ = read_safetensors_header(file)
            if keys is None:  # a single file: everything in it
                keys = list(infos)
            absent = [key for key in keys if key not in infos]
            if absent:
                raise ValueError(f"{file}: the index maps {len(absent)} keys to this shard that it lacks: {format_keys(absent)}")
            for key in keys:
                self._infos[key] = infos[key]

    @staticmethod
    def _weight_files(path: Path) -> Dict[str, Optional[List[str]]]:
        """Shard file → the keys the index puts there (None: a single file, all its keys)."""
        path = _index_or_weights(path, INDEX_NAME, WEIGHTS_NAME)
        if path.name.endswith(".json"):
            index = json.loads(path.read_text())
            if "weight_map" not in index:
                raise ValueError(f"{path}: an index needs a weight_map (key → shard file)")
            files: Dict[str, Optional[List[str]]] = {}
            for key, shard in index["weight_map"].items():
                files.setdefault(str(path.parent / shard), []).append(key)
            return files
        return {str(path): None}


TORCH_INDEX_NAME = "pytorch_model.bin.index.json"
TORCH_WEIGHTS_NAME = "pytorch_model.bin"


def _mapped_offsets(file: str, tensors: Mapping[str, torch.Tensor]) -> Dict[str, int]:
    """Byte offset in `file` of each contiguous tensor that is a view of a mapping of `file` (its
    address against the mapping's start and file offset in /proc/self/maps); {} without /proc."""
    real = os.path.realpath(file)
    inode = os.stat(real).st_ino
    ranges = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].rstrip("\n") == real and int(fields[4]) == inode:
                    low, high = (int(address, 16) for address in fields[0].split("-"))
                    ranges.append((low, high, int(fields[2], 16)))
    except OSError:
        return {}
    offsets = {}
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if not tensor.is_contiguous():
            continue
        if not nbytes:
            offsets[key] = 0
            continue
        start = tensor.untyped_storage().data_ptr() + tensor.storage_offset() * tensor.element_size()
        for low, high, file_offset in ranges:
            if low <= start and start + nbytes <= high:
                offsets[key] = start - low + file_offset
                break
    return offsets


class TorchCheckpoint(_FileTensors):
    """A torch pickle of a state dict (`checkpoint.pt`, `pytorch_model.bin`, or a directory with
    `pytorch_model.bin.index.json` and its shards), with the same interface as SafetensorsCheckpoint.

    Opened with `torch.load(mmap=True, weights_only=True)`: no arbitrary code runs and no tensor
    data is read; it gives each tensor's key, shape and dtype, and, because a zip checkpoint stores
    each storage whole and uncompressed, where its bytes lie in the file (the view's address in the
    mapping, see `_mapped_offsets`; the first bytes are checked against the view). The mapping is then
    dropped and tensors are read with `pread`, one at a time, as safetensors ones are. Reading them
    through the mapping instead keeps every page touched resident until the mapping closes: loading a
    2.8 GB checkpoint.pt so raised rank 0's RSS by the file's size (bench/results/load_memory_cpu.json,
    `checkpoint_pt`). A tensor that cannot be located (a non-contiguous view saved as such, no /proc)
    is read from the mapping, kept open for it alone.

    A training checkpoint (`{"model_state_dict": ...}` or `{"state_dict": ...}`) is unwrapped, a DDP
    `module.` prefix dropped and non-tensor entries skipped.
    """

    # Bytes of each located tensor compared between the mapping and pread when opening.
    CHECK_BYTES = 64

    def __init__(self, path: Union[str, Path]):
        super().__init__()
        self.path = str(path)
        self._views: Dict[str, torch.Tensor] = {}
        try:
            for file in self._weight_files(Path(path)):
                self._open_file(file)
        except BaseException:
            self.close()
            raise

    def _open_file(self, file: str) -> None:
        try:
            state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
        except Exception as error:  # unpickling errors come in several types
            raise ValueError(f"{file}: not a torch state dict that loads with mmap=True, weights_only=True "
                             f"({type(error).__name__}: {error})") from error
        for wrapper in ("model_state_dict", "state_dict"):
            if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
                state = state[wrapper]
        if not isinstance(state, dict):
            raise ValueError(f"{file}: holds a {type(state).__name__}, not a state dict")
        tensors = {key[len("module."):] if key.startswith("module.") else key: value
                   for key, value in state.items() if isinstance(value, torch.Tensor)}
        offsets = _mapped_offsets(file, tensors)
        for key, tensor in tensors.items():
            info = TensorInfo(key, tuple(tensor.shape), tensor.dtype, file, offsets.get(key, -1),
                              tensor.numel() * tensor.element_size())
            self._infos[key] = info
            if info.offset < 0 or not self._same_start(info, tensor):
                self._views[key] = tensor
        # The views not kept go now, and with the last of them the file's mapping.
        del state, tensors

    def _same_start(self, info: TensorInfo, tensor: torch.Tensor) -> bool:
        count = min(info.nbytes, self.CHECK_BYTES)
        if not count:
            return True
        head = torch.empty(count, dtype=torch.uint8)
        self._pread(dataclasses.replace(info, nbytes=count), head)
        return torch.equal(head, tensor.reshape(-1).view(torch.uint8)[:count])

    @staticmethod
    def _weight_files(path: Path) -> List[str]:
        path = _index_or_weights(path, TORCH_INDEX_NAME, TORCH_WEIGHTS_NAME)
        if path.name.endswith(".json"):
            index = json.loads(path.read_text())
            return sorted({str(path.parent / shard) for shard in index["weight_map"].values()})
        return [str(path)]

    def read(self, key: str) -> torch.Tensor:
        """The tensor `key` in a buffer of its own (or, for a tensor read from the mapping, a view of
        it: copy it before changing it)."""
        view = self._views.get(key)
        return view if view is not None else super().read(key)

    def read_rows(self, key: str, first: int, rows: int) -> torch.Tensor:
        view = self._views.get(key)
        if view is None:
            return super().read_rows(key, first, rows)
        if first < 0 or rows < 0 or first + rows > view.shape[0]:
            raise ValueError(f"{key}: rows {first}..{first + rows - 1} outside its {list(view.shape)}")
        return view[first : first + rows]

    def can_read_into(self, key: str, out: torch.Tensor) -> bool:
        return key not in self._views and super().can_read_into(key, out)

    def close(self) -> None:
        self._views.clear()
        super().close()


Checkpoint = Union[SafetensorsCheckpoint, TorchCheckpoint]


def open_checkpoint(path: Union[str, Path]) -> Checkpoint:
    """A safetensors checkpoint (directory with model.safetensors[.index.json], `.safetensors` file or
    its index) or else a torch pickle one (TorchCheckpoint)."""
    p = Path(path)
    if p.is_dir():
        safetensors = (p / INDEX_NAME).is_file() or (p / WEIGHTS_NAME).is_file()
        torch_pickle = (p / TORCH_INDEX_NAME).is_file() or (p / TORCH_WEIGHTS_NAME).is_file()
        return TorchCheckpoint(p) if torch_pickle and not safetensors else SafetensorsCheckpoint(p)
    if p.name.endswith((".safetensors", ".safetensors.index.json")):
        return SafetensorsCheckpoint(p)
    if p.is_file():
        with open(p, "rb") as f:
            if f.read(2) in (b"PK", b"\x80\x02"):  # zip (torch.save) or a legacy pickle
                return TorchCheckpoint(p)
    return SafetensorsCheckpoint(p)


# ------------------------------------------------------------------------------------------------
# Layouts: how a model's parameter names and shapes relate to a published checkpoint's


def _identity(name: str) -> str:
    return name


def _no_alias(key: str) -> Optional[str]:
    return None


# Buffers that some writers saved (older transformers: RoPE inverse frequencies, CLIP position
# ids); mmtrain's models keep them non-persistent and compute them, so a file's copy is skipped.
DEFAULT_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.original_inv_freq", "embeddings.position_ids")


@dataclass(frozen=True)
class PublishedLayout:
    """How a model's parameters relate to its published checkpoint (see the module docstring)."""

    name: str
    to_published: Callable[[str], str] = _identity
    """Our parameter name → the key it has in the published checkpoint (export writes it there)."""
    aliases: Callable[[str], Optional[str]] = _no_alias
    """Another writer's key → our parameter name, or None (e.g. transformers 5's renamed Fuyu keys)."""
    resizable_rows: FrozenSet[str] = frozenset()
    """Our parameter names whose first dim may be shorter in a checkpoint: the file's rows are copied,
    the rows beyond keep the model's fresh initialisation (IDEFICS' added-token tables)."""
    ignored_suffixes: Tuple[str, ...] = DEFAULT_IGNORED_SUFFIXES
    """Checkpoint keys ending so are skipped on load, not reported as unexpected."""
    hf_config: Optional[Callable[[nn.Module], Any]] = None
    """model → the transformers config of the published class (None: no published layout to export)."""
    hf_model_class: Optional[str] = None
    """Name of the transformers class that loads the export, e.g. `IdeficsForVisionText2Text`."""
    row_splits: Mapping[str, Tuple[Tuple[str, int, int], ...]] = field(default_factory=dict)
    """Published key → ((our name, first row, rows), ...): one published tensor filling rows of several
    of our parameters (OpenFlamingo's resized token tables: our base table + added-token table). Each
    part reads only its rows of the file's tensor; rows the file lacks count as a shorter table
    (allowed for `resizable_rows`); a part with no rows there is not given by that file."""
    source_keys: Optional[Callable[[Sequence[str]], Mapping[str, Optional[str]]]] = None
    """A file's keys → {file key: published key, or None to skip it}, for layouts whose published
    checkpoint comes in parts named differently (OpenFlamingo: base LM, open_clip file, checkpoint.pt);
    None: keys as they are."""


IDENTITY_LAYOUT = PublishedLayout(name="identity")

def layout_of(model: nn.Module) -> PublishedLayout:
    """The model's `published_layout()` (the family's; None: it has none), else identity names."""
    own = getattr(model, "published_layout", None)
    layout = own() if callable(own) else None
    return layout if layout is not None else IDENTITY_LAYOUT


# ------------------------------------------------------------------------------------------------
# Matching a checkpoint to a model


@dataclass(frozen=True)
class LoadEntry:
    name: str
    """Our parameter name."""
    key: str
    """Its key in the checkpoint."""
    shape: Shape
    """Our (full) shape."""
    file_shape: Shape
    first_row: Optional[int] = None
    """For a part of a row-split tensor: its first row in the file's tensor (our rows are the next ones)."""
    source: int = 0
    """Index of the checkpoint it comes from (a load from several sources)."""

    @property
    def file_rows(self) -> Optional[int]:
        """Rows the checkpoint holds when fewer than ours (the rest keep their initialisation), else None."""
        if self.first_row is not None:
            rows = min(self.shape[0], self.file_shape[0] - self.first_row)
            return rows if rows < self.shape[0] else None
        return self.file_shape[0] if self.file_shape != self.shape else None


@dataclass
class LoadPlan:
    entries: List[LoadEntry]
    """One per model parameter, in the model's parameter order."""
    ignored: List[str] = field(default_factory=list)
    """Checkpoint keys skipped (buffers some writers save)."""

    def padded(self) -> List[LoadEntry]:
        return [entry for entry in self.entries if entry.file_rows is not None]

    def describe_padding(self) -> List[str]:
        return [
            f"{e.key}: the checkpoint has {e.file_rows} rows, the model {e.shape[0]}; rows {e.file_rows}..{e.shape[0] - 1} "
            "keep the model's fresh initialisation"
            for e in self.padded()
        ]


def plan_load(
    params: Sequence[Tuple[str, Shape]],
    file_shapes: Mapping[str, Shape],
    layout: PublishedLayout = IDENTITY_LAYOUT,
    source: str = "checkpoint",
    allow_padding: bool = True,
) -> LoadPlan:
    """Match the model's parameters (name, full shape) to a checkpoint's keys and shapes.

    Raises WeightsMismatchError listing missing keys (as the checkpoint would name them), unexpected
    keys and shape mismatches together. Buffers are not parameters, so a file never needs them.
    """
    return plan_load_sources(params, [file_shapes], layout, [source], allow_padding)


def plan_load_sources(
    params: Sequence[Tuple[str, Shape]],
    sources: Sequence[Mapping[str, Shape]],
    layout: PublishedLayout = IDENTITY_LAYOUT,
    names: Optional[Sequence[str]] = None,
    allow_padding: bool = True,
) -> LoadPlan:
    """`plan_load` over several checkpoints (key → shape each) applied in order: a parameter a later
    one gives whole replaces what earlier ones gave; every parameter must come from at least one
    (missing keys are reported over the union); unexpected and mis-shaped keys are each source's."""
    names = list(names) if names is not None else [f"checkpoint {i}" for i in range(len(sources))]
    key_of = {name: layout.to_published(name) for name, _ in params}
    shape_of = dict(params)
    name_of_key = {key: name for name, key in key_of.items()}
    per_name: Dict[str, List[LoadEntry]] = {}
    ignored: List[str] = []
    problems: List[str] = []
    for index, (file_shapes, label) in enumerate(zip(sources, names)):
        published = layout.source_keys(list(file_shapes)) if layout.source_keys is not None else None
        found: Dict[str, str] = {}
        given: Dict[str, List[LoadEntry]] = {}
        unexpected, duplicated, mismatched = [], [], []
        for file_key, file_shape in file_shapes.items():
            key = published[file_key] if published is not None else file_key
            if key is None:
                ignored.append(file_key)
                continue
            file_shape = tuple(int(d) for d in file_shape)
            if key in layout.row_splits:
                targets = [(name, first) for name, first, _ in layout.row_splits[key]]
            else:
                name = name_of_key.get(key)
                if name is None:
                    name = layout.aliases(key)
                    if name is not None and name not in shape_of:
                        name = None
                targets = [(name, None)] if name is not None else []
            if not targets:
                (ignored if key.endswith(layout.ignored_suffixes) else unexpected).append(file_key)
                continue
            for name, first in targets:
                shape = shape_of[name]
                if first is not None and file_shape[0] <= first:
                    continue  # the file's table ends before this part: not given here
                if name in found:
                    duplicated.append(f"{found[name]} and {file_key} (both {name})")
                    continue
                found[name] = file_key
                entry = LoadEntry(name=name, key=file_key, shape=shape, file_shape=file_shape, first_row=first,
                                  source=index)
                rows = shape[0] - entry.file_rows if entry.file_rows is not None else 0
                same_width = len(file_shape) == len(shape) and file_shape[1:] == shape[1:]
                if first is not None:
                    fits = same_width and (rows == 0 or (allow_padding and name in layout.resizable_rows))
                else:
                    fits = file_shape == shape or (allow_padding and name in layout.resizable_rows and same_width
                                                   and file_shape[0] <= shape[0])
                if not fits:
                    mismatched.append(f"{file_key} {list(file_shape)} vs model {list(shape)}"
                                      + (f" (rows from {first} for {name})" if first is not None else ""))
                given[name] = [entry]
        where = f" in {label}" if len(sources) > 1 else ""
        if unexpected:
            problems.append(f"unexpected {len(unexpected)} keys{where}: {format_keys(unexpected)}")
        if mismatched:
            problems.append(f"{len(mismatched)} shapes differ{where}: {format_keys(mismatched)}")
        if duplicated:
            problems.append(f"{len(duplicated)} parameters given twice{where}: {format_keys(duplicated)}")
        for name, entries in given.items():
            whole = entries[0].file_rows is None
            per_name[name] = entries if whole else per_name.get(name, []) + entries
    missing = list(dict.fromkeys(key_of[name] for name, _ in params if name not in per_name))
    if missing:
        where = f" from all of {', '.join(names)}" if len(sources) > 1 else ""
        problems.insert(0, f"missing {len(missing)} keys{where}: {format_keys(missing)}")
    if problems:
        label = names[0] if len(sources) == 1 else f"{len(sources)} sources"
        raise WeightsMismatchError(f"{label} does not match the model ({layout.name} layout): " + "; ".join(problems))
    entries = [entry for name, _ in params for entry in per_name[name]]
    return LoadPlan(entries=entries, ignored=sorted(set(ignored)))


def copy_into(target: torch.Tensor, tensor: torch.Tensor, entry: LoadEntry) -> None:
    """Copy a checkpoint tensor (or, for a row-split part, its rows) into a (full, gathered)
    parameter, converting dtype; a shorter table fills its first rows only."""
    with torch.no_grad():
        if entry.file_rows is not None:
            target[: entry.file_rows].copy_(tensor)
        else:
            target.copy_(tensor.reshape(target.shape))


def read_entry(checkpoint: "Checkpoint", entry: LoadEntry) -> torch.Tensor:
    """The checkpoint's part for `entry`: the whole tensor, or the rows of a row-split part."""
    if entry.first_row is None:
        return checkpoint.read(entry.key)
    rows = entry.file_rows if entry.file_rows is not None else entry.shape[0]
    return checkpoint.read_rows(entry.key, entry.first_row, rows)


def entry_bytes(checkpoint: "Checkpoint", entry: LoadEntry) -> int:
    info = checkpoint.info(entry.key)
    if entry.first_row is None:
        return info.nbytes
    rows = entry.file_rows if entry.file_rows is not None else entry.shape[0]
    return info.nbytes // info.shape[0] * rows


def read_entry_into(checkpoint: "Checkpoint", entry: LoadEntry, target: torch.Tensor) -> int:
    """Fill the (full, gathered) parameter `target` from the checkpoint: straight into its memory
    when dtype and layout allow, else through one buffer and a converting copy. Returns bytes read."""
    if entry.file_rows is None and entry.first_row is None and checkpoint.can_read_into(entry.key, target):
        checkpoint.read_into(entry.key, target)
    else:
        copy_into(target, read_entry(checkpoint, entry), entry)
    return entry_bytes(checkpoint, entry)


def load_weights(model: nn.Module, path: Union[str, Path], layout: Optional[PublishedLayout] = None, log=None) -> LoadPlan:
    """Load a checkpoint into a plain (not partitioned) model, one tensor at a time."""
    layout = layout or layout_of(model)
    params = dict(model.named_parameters())
    with SafetensorsCheckpoint(path) as checkpoint:
        plan = plan_load([(n, full_shape(p)) for n, p in params.items()], checkpoint.shapes(), layout, source=str(path))
        for entry in plan.entries:
            read_entry_into(checkpoint, entry, params[entry.name].data)
            if checkpoint.info(entry.key).nbytes >= TRIM_AFTER_BYTES:
                release_freed_memory()
    if log is not None:
        for line in plan.describe_padding():
            log.info("%s: %s", path, line)
    return plan


# ------------------------------------------------------------------------------------------------
# Writing


@dataclass(frozen=True)
class WriteEntry:
    key: str
    """The key written to the file."""
    source: str
    """The name `fetch` is called with."""
    shape: Shape
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return _numel(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def plan_shards(entries: Sequence[WriteEntry], max_shard_bytes: int) -> List[List[WriteEntry]]:
    """Greedy split in order (as transformers does): a new shard when the next tensor would overflow;
    a tensor larger than the limit gets a shard of its own."""
    shards: List[List[WriteEntry]] = [[]]
    size = 0
    for entry in entries:
        if shards[-1] and size + entry.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry.nbytes
    return shards


def _shard_names(count: int, weights_name: str = WEIGHTS_NAME) -> List[str]:
    if count == 1:
        return [weights_name]
    stem, ext = weights_name.rsplit(".", 1)
    return [f"{stem}-{i:05d}-of-{count:05d}.{ext}" for i in range(1, count + 1)]


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def write_safetensors(path: Union[str, Path], entries: Sequence[WriteEntry], fetch: Callable[[str], torch.Tensor],
                      metadata: Optional[Mapping[str, str]] = None) -> int:
    """Write one safetensors file, fetching and writing its tensors one at a time (converted to each
    entry's dtype); atomic (temporary name, then rename). Returns the bytes of tensor data."""
    header: Dict[str, Any] = {}
    offset = 0
    for entry in entries:
        if entry.dtype not in _ST_NAMES:
            raise ValueError(f"{entry.key}: dtype {entry.dtype} has no safetensors name")
        header[entry.key] = {"dtype": _ST_NAMES[entry.dtype], "shape": list(entry.shape),
                             "data_offsets": [offset, offset + entry.nbytes]}
        offset += entry.nbytes
    header["__metadata__"] = dict(metadata or {"format": "pt"})
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned, as safetensors writes it
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for entry in entries:
            tensor = fetch(entry.source).detach()
            if tuple(tensor.shape) != entry.shape:
                raise ValueError(f"{entry.source}: fetched shape {list(tensor.shape)}, expected {list(entry.shape)}")
            tensor = tensor.to(device="cpu", dtype=entry.dtype).contiguous()
            f.write(_tensor_bytes(tensor))
            del tensor
            if entry.nbytes >= TRIM_AFTER_BYTES:
                release_freed_memory()
    os.replace(tmp, path)
    return offset


def write_sharded(out_dir: Union[str, Path], entries: Sequence[WriteEntry], fetch: Callable[[str], torch.Tensor],
                  max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, weights_name: str = WEIGHTS_NAME) -> Dict[str, Any]:
    """HF sharded safetensors in `out_dir`, one tensor in memory at a time; returns the index
    (`{"metadata": {"total_size"}, "weight_map": {key: file}}`), written as `*.index.json` when
    there is more than one shard. Weight files of an earlier export in `out_dir` are removed first."""
    keys = [entry.key for entry in entries]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate keys to write: {format_keys(sorted({k for k in keys if keys.count(k) > 1}))}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = weights_name.rsplit(".", 1)[0]
    stale = re.compile(rf"^{re.escape(stem)}(-\d{{5}}-of-\d{{5}})?\.safetensors(\.index\.json)?(\.tmp)?$")
    for old in out_dir.iterdir():
        if stale.match(old.name):
            old.unlink()
    shards = plan_shards(entries, max_shard_bytes)
    names = _shard_names(len(shards), weights_name)
    weight_map: Dict[str, str] = {}
    total = 0
    for name, shard in zip(names, shards):
        total += write_safetensors(out_dir / name, shard, fetch)
        weight_map.update({entry.key: name for entry in shard})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    if len(shards) > 1:
        tmp = out_dir / (weights_name + ".index.json.tmp")
        tmp.write_text(json.dumps(index, indent=2) + "\n")
        os.replace(tmp, out_dir / f"{weights_name}.index.json")
    return index


# ------------------------------------------------------------------------------------------------
# A model → a model directory (published or mmtrain layout)

LAYOUTS = ("published", "mmtrain")
MMTRAIN_CONFIG_NAME = "mmtrain_model.json"


def meta_model(config_dict: Mapping[str, Any]) -> nn.Module:
    """The model that `config_dict` describes, on the meta device: names, shapes and config, no memory."""
    from mmtrain.models.registry import model_from_config_dict

    with torch.device("meta"):
        return model_from_config_dict(config_dict)


def check_against_transformers(layout: PublishedLayout, hf_config: Any, entries: Sequence[WriteEntry]) -> None:
    """Build the transformers class on the meta device from `hf_config` and require its state dict
    to be exactly what is written: same keys (through the layout's aliases) and shapes."""
    import transformers

    cls = getattr(transformers, layout.hf_model_class)
    with torch.device("meta"):
        hf_model = cls(hf_config)
    written = [(entry.source, entry.shape) for entry in entries]
    hf_shapes = {key: tuple(t.shape) for key, t in hf_model.state_dict().items()}
    # transformers 5 renames some published keys (Fuyu's); those reach our names through the
    # layout's aliases. Its state dict holds no buffers here (all non-persistent), so it must match
    # what is written one to one, added-token rows included.
    plan_load(written, hf_shapes, dataclasses.replace(layout, resizable_rows=frozenset()),
              source=f"transformers' {layout.hf_model_class}", allow_padding=False)


def export_model(
    out_dir: Union[str, Path],
    model: nn.Module,
    fetch: Callable[[str], torch.Tensor],
    layout: str = "published",
    dtype: torch.dtype = torch.float32,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Dict[str, Any]:
    """Write the weights `fetch(name)` gives for each of `model`'s parameters into `out_dir`.

    `model` supplies names, shapes and config only (the meta device is fine). `published`: the keys,
    config.json and shards that the family's transformers class loads with `from_pretrained`;
    `mmtrain`: our parameter names. Both also write mmtrain_model.json, so
    :func:`mmtrain.models.io.load_pretrained` reloads either. Float tensors are written in `dtype`.
    Returns a summary (layout, files, tensors, bytes).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is not one of {list(LAYOUTS)}")
    published = layout_of(model) if layout == "published" else IDENTITY_LAYOUT
    if layout == "published" and published.hf_config is None:
        raise ValueError(
            f"{model.config_dict()['flavour']!r} has no published layout to export to (its family gives no "
            "transformers class); export with layout 'mmtrain'"
        )
    entries = []
    for name, param in model.named_parameters():
        out_dtype = dtype if param.dtype.is_floating_point else param.dtype
        entries.append(WriteEntry(key=published.to_published(name), source=name, shape=full_shape(param), dtype=out_dtype))
    hf_config = None
    if layout == "published":
        hf_config = published.hf_config(model)
        check_against_transformers(published, hf_config, entries)
    out_dir = Path(out_dir)
    index = write_sharded(out_dir, entries, fetch, max_shard_bytes)
    if hf_config is not None:
        hf_config.dtype = dtype
        hf_config.save_pretrained(str(out_dir))
    text = json.dumps(dict(model.config_dict()), indent=2, sort_keys=True) + "\n"
    tmp = out_dir / (MMTRAIN_CONFIG_NAME + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, out_dir / MMTRAIN_CONFIG_NAME)
    return {
        "layout": layout if layout == "mmtrain" else published.name,
        "hf_model_class": published.hf_model_class if layout == "published" else None,
        "files": sorted(set(index["weight_map"].values())),
        "num_tensors": len(entries),
        "total_bytes": index["metadata"]["total_size"],
    }


def available_layouts(model: nn.Module) -> Tuple[str, ...]:
    """The export layouts `model` supports ('mmtrain' always; 'published' where its family has one)."""
    return LAYOUTS if layout_of(model).hf_config is not None else ("mmtrain",)
