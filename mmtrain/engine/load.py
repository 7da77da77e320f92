"""Stream a published checkpoint (HF safetensors, sharded or not) into a model, also a ZeRO-3
partitioned one, without any rank ever holding the whole model (`model.init_from`).

    load_published(model, "/ckpts/idefics-9b", log=log)     # after zero.Init built it and deferred init ran

Under ZeRO-3, parameter by parameter: `deepspeed.zero.GatheredParameters([p], modifier_rank=0)`
gathers the full parameter on every rank; rank 0 reads that one tensor from the file (into a
buffer of its own, see `weights.SafetensorsCheckpoint`) and copies it in, converting to the
parameter's dtype; on exit DeepSpeed broadcasts rank 0's values and re-partitions. So a rank holds
at most one full parameter beside its partitions (rank 0: plus the one tensor read from the file).

Only rank 0 reads the checkpoint: the others need no access to it (no shared file system for a
multi-node run), the file is read once instead of once per rank (8 ranks on a node would read it
8 times, through one page cache or over a network file system), and host memory on the other ranks
grows by the gathered parameter only. Rank 0 matches the file to the model first (names through the
family's layout, shapes, padded rows) and sends the plan, or the error, to every rank, so a
mismatch stops all ranks with the same message instead of leaving the others waiting in a gather.

Without ZeRO-3 (a plain model: one process, or ZeRO 0-2 where every rank holds every parameter)
each rank reads the file itself, one tensor at a time.

On resume (:func:`load_init_from`) the run's own checkpoint replaces every weight it holds, so
init_from reads only the parameters it does not hold (:func:`weights_in_checkpoint`). mmtrain's
ZeRO-3 checkpoints hold all of them: the trainable ones as the optimizer's fp32 partitions, the
frozen ones as the 16-bit fragments DeepSpeed writes beside the module states (unless
`save_checkpoint(exclude_frozen_parameters=True)`, which mmtrain does not pass; its ZeRO-3 module
state dict holds only empty partitions). So a resumed run reads none of init_from, and its files
may be gone; from a checkpoint without the frozen fragments, the frozen weights still come from it.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Collection, List, Optional, Sequence, Set, Tuple, Union

import torch
from torch import nn

from mmtrain.models.weights import (
    TRIM_AFTER_BYTES,
    LoadPlan,
    PublishedLayout,
    format_keys,
    full_shape,
    layout_of,
    open_checkpoint,
    plan_load_sources,
    read_entry,
    read_entry_into,
    release_freed_memory,
)

Sources = Union[str, Path, Sequence[Union[str, Path]]]

_LOG = logging.getLogger("mmtrain")


def _world() -> Tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _numel(shape) -> int:
    n = 1
    for dim in shape:
        n *= dim
    return n


def _is_partitioned(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")


def _broadcast_object(obj: Any, world_size: int) -> Any:
    if world_size == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def source_paths(path: Sources) -> List[str]:
    """`model.init_from` as a list of paths (one path, or several applied in order)."""
    paths = [str(path)] if isinstance(path, (str, Path)) else [str(p) for p in path]
    if not paths:
        raise ValueError("model.init_from: an empty list of sources")
    return paths


def _open_all(paths: Sequence[str]) -> list:
    checkpoints = []
    try:
        for path in paths:
            checkpoints.append(open_checkpoint(path))
    except BaseException:
        for checkpoint in checkpoints:
            checkpoint.close()
        raise
    return checkpoints


def _plan(model: nn.Module, paths: Sequence[str], layout: PublishedLayout) -> Tuple[Optional[LoadPlan], Optional[str]]:
    params = [(name, full_shape(p)) for name, p in model.named_parameters()]
    try:
        checkpoints = _open_all(paths)
        try:
            plan = plan_load_sources(params, [c.shapes() for c in checkpoints], layout, paths)
        finally:
            for checkpoint in checkpoints:
                checkpoint.close()
        return plan, None
    except (OSError, ValueError) as error:  # WeightsMismatchError is a ValueError
        return None, f"{type(error).__name__}: {error}"


def load_published(
    model: nn.Module,
    path: Sources,
    layout: Optional[PublishedLayout] = None,
    log: Optional[logging.Logger] = None,
    only: Optional[Collection[str]] = None,
) -> LoadPlan:
    """Copy the checkpoint at `path` into `model`'s parameters, one at a time (collective under ZeRO-3:
    every rank calls it). Returns the plan (entries, padded rows, skipped buffer keys) of what was read.

    `path` may be a list of checkpoints applied in order (a later one's parameter replaces an
    earlier one's), which together must give every parameter: OpenFlamingo's release is its base
    LM, the open_clip tower and `checkpoint.pt` with the trained parts. Each is HF safetensors or a
    torch state dict (`weights.open_checkpoint`). `only`: read just these parameters (the same on
    every rank); the files are still matched against the whole model."""
    import deepspeed

    log = log or _LOG
    paths = source_paths(path)
    path = ", ".join(paths)
    layout = layout or layout_of(model)
    rank, world_size = _world()
    named = list(model.named_parameters())
    partitioned = any(_is_partitioned(p) for _, p in named)
    start = time.perf_counter()
    if partitioned:
        plan, error = _plan(model, paths, layout) if rank == 0 else (None, None)
        plan, error = _broadcast_object((plan, error), world_size)
    else:
        plan, error = _plan(model, paths, layout)
    if error is not None:
        raise ValueError(f"model.init_from: {error}")
    if only is not None:
        wanted = set(only)
        plan = LoadPlan(entries=[entry for entry in plan.entries if entry.name in wanted], ignored=plan.ignored)
    params = dict(named)
    reads = rank == 0 or not partitioned
    read_bytes = 0
    checkpoints = _open_all(paths) if reads else None
    try:
        for entry in plan.entries:
            param = params[entry.name]
            checkpoint = checkpoints[entry.source] if reads else None
            if _is_partitioned(param):
                with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                    if rank == 0:
                        read_bytes += read_entry_into(checkpoint, entry, param.data)
            elif partitioned:
                # A parameter that zero.Init did not partition (built outside it): rank 0's copy goes to all.
                if rank == 0:
                    read_bytes += read_entry_into(checkpoint, entry, param.data)
                if world_size > 1:
                    torch.distributed.broadcast(param.data, src=0)
            else:
                read_bytes += read_entry_into(checkpoint, entry, param.data)
            # The gathered parameter (and rank 0's file tensor) are freed now; hand their pages back.
            if _numel(entry.shape) * param.element_size() >= TRIM_AFTER_BYTES:
                release_freed_memory()
    finally:
        for checkpoint in checkpoints or []:
            checkpoint.close()
    seconds = time.perf_counter() - start
    how = "rank 0 read, gathered and re-partitioned one parameter at a time" if partitioned else "read by each rank"
    if rank == 0 or not partitioned:
        log.info("init_from %s: %d tensors, %.1f MB (%s layout) in %.1fs (%s)", path, len(plan.entries),
                 read_bytes / 1e6, layout.name, seconds, how)
        for line in plan.describe_padding():
            log.info("init_from: %s", line)
        if plan.ignored:
            log.info("init_from: skipped %d buffer keys the model computes itself: %s", len(plan.ignored),
                     format_keys(plan.ignored))
    return plan


def weights_in_checkpoint(ckpt_dir: str) -> Set[str]:
    """Names of the parameters whose weights resuming from the run checkpoint `ckpt_dir` restores,
    from DeepSpeed's model-state file of rank 0 (memory-mapped; no tensor data is read).

    ZeRO-3: the optimizer's parameters (`param_shapes`: restored from their fp32 partitions), the
    parameters with saved 16-bit fragments (`frozen_param_fragments`) and aliases of either
    (`shared_params`). ZeRO 0-2: the keys of the module state dict (whole tensors)."""
    from deepspeed.checkpoint.constants import FROZEN_PARAM_FRAGMENTS, PARAM_SHAPES

    zero3 = os.path.join(ckpt_dir, "zero_pp_rank_0_mp_rank_00_model_states.pt")
    whole = os.path.join(ckpt_dir, "mp_rank_00_model_states.pt")
    if not os.path.isfile(zero3) and not os.path.isfile(whole):
        raise FileNotFoundError(f"{ckpt_dir}: no DeepSpeed model-state file ({os.path.basename(zero3)} or "
                                f"{os.path.basename(whole)})")
    state = torch.load(zero3 if os.path.isfile(zero3) else whole, map_location="cpu", mmap=True, weights_only=False)
    if not os.path.isfile(zero3):
        return set(state.get("module") or {})
    names = {name for group in state.get(PARAM_SHAPES) or [] for name in group}
    names |= set(state.get(FROZEN_PARAM_FRAGMENTS) or {})
    names |= {alias for alias, target in (state.get("shared_params") or {}).items() if target in names}
    return names


def _held_by(ckpt_dir: str) -> Tuple[Optional[Set[str]], Optional[int], Optional[str]]:
    from mmtrain.engine.checkpoint import read_trainer_state

    try:
        return weights_in_checkpoint(ckpt_dir), int(read_trainer_state(ckpt_dir)["step"]), None
    except Exception as error:  # noqa: BLE001 -- sent to every rank, raised there
        return None, None, f"{type(error).__name__}: {error}"


def load_init_from(
    model: nn.Module,
    path: Sources,
    resume_from: Optional[str] = None,
    log: Optional[logging.Logger] = None,
) -> Optional[LoadPlan]:
    """`model.init_from` of a run (collective under ZeRO-3). Starting fresh: every parameter from
    `path`. Resuming from the run checkpoint `resume_from`: only the parameters it does not hold
    (none for mmtrain's checkpoints, so `path` is not opened and None is returned), since the resume
    replaces the others; rank 0 reads which it holds and every rank takes its answer."""
    log = log or _LOG
    if resume_from is None:
        return load_published(model, path, log=log)
    rank, world_size = _world()
    held, step, error = _broadcast_object(_held_by(resume_from) if rank == 0 else (None, None, None), world_size)
    if error is not None:
        raise ValueError(f"resume from {resume_from}: cannot tell which weights it holds ({error})")
    names = [name for name, _ in model.named_parameters()]
    needed = [name for name in names if name not in held]
    if not needed:
        if rank == 0:
            log.info("init_from skipped: the checkpoint at step %d (%s) holds every weight, trainable and frozen",
                     step, resume_from)
        return None
    if rank == 0:
        log.info("init_from: the checkpoint at step %d (%s) holds %d of %d parameters; reading the other %d from "
                 "init_from: %s", step, resume_from, len(names) - len(needed), len(names), len(needed),
                 format_keys(needed))
    return load_published(model, path, log=log, only=needed)


def verify_loaded(model: nn.Module, path: Sources, layout: Optional[PublishedLayout] = None) -> List[str]:
    """Names of the parameters whose (gathered) values differ from the checkpoint's, cast to the
    parameter's dtype; rows past a shorter table are not compared. Collective under ZeRO-3; every
    rank gets rank 0's answer. One parameter gathered at a time, as in loading."""
    import deepspeed

    paths = source_paths(path)
    layout = layout or layout_of(model)
    rank, world_size = _world()
    named = list(model.named_parameters())
    partitioned = any(_is_partitioned(p) for _, p in named)
    reads = rank == 0 or not partitioned
    differing: List[str] = []
    checkpoints = _open_all(paths) if reads else None
    try:
        plan = (plan_load_sources([(n, full_shape(p)) for n, p in named], [c.shapes() for c in checkpoints], layout,
                                  paths) if reads else None)
        plan = _broadcast_object(plan, world_size) if partitioned else plan
        params = dict(named)
        for entry in plan.entries:
            param = params[entry.name]
            with deepspeed.zero.GatheredParameters([param], enabled=_is_partitioned(param)):
                if reads:
                    expected = read_entry(checkpoints[entry.source], entry).to(param.dtype)
                    got = param.data if entry.file_rows is None else param.data[: entry.file_rows]
                    if not torch.equal(got.reshape(expected.shape), expected):
                        differing.append(entry.name)
                    del expected, got
            if _numel(entry.shape) * param.element_size() >= TRIM_AFTER_BYTES:
                release_freed_memory()
    finally:
        for checkpoint in checkpoints or []:
            checkpoint.close()
    return _broadcast_object(differing, world_size) if partitioned else differing
