"""Topology-free checkpoints: resume on another world size, or with other trainable groups.

A ZeRO-3 checkpoint holds, per rank, flat fp32 partitions of every optimizer sub-group, Adam's
moments in the same layout, and 16-bit fragments of the frozen parameters; the split depends on the
world size and on which parameters train. :func:`convert` turns one (in one process, memory-mapped,
one parameter in memory at a time) into a layout keyed by parameter name:

    step_0000200/topology_free/
        index.json                  format, saved world size, per-parameter file / trainable / group,
                                    per-group Adam step, scheduler position, engine counters
        000000.safetensors ...      one per parameter: fp32, exp_avg, exp_avg_sq (trained) or weight (frozen)
        COMPLETE

It is written once, under `topology_free.partial/` then renamed, and reused by later resumes.
:func:`load_topology_free` puts it into a live engine of any world size: each rank copies its own
partition of every tensor (no collectives but the final re-gather of persistent parameters).
Groups that train now but did not when the checkpoint was saved (unfreezing at resume) get fresh
Adam state (zero moments, step 0), and their fp32 master starts from the saved 16-bit weights;
every other group keeps its saved moments and step.

Why not DeepSpeed's universal checkpoint (`ds_to_universal` + `checkpoint.load_universal`): its
ZeRO-3 loader requires optimizer files for every trainable parameter, so it cannot unfreeze a module
at resume, and it needs an offline conversion step; this layout covers both with the same code.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Dict, List, Optional

import torch

from mmtrain.engine.checkpoint import COMPLETE, CheckpointError, agree, fsync_tree
from mmtrain.engine.optim import adam_step_count

FREE_DIR = "topology_free"
FORMAT = "mmtrain-topology-free/1"
MOMENTS = ("exp_avg", "exp_avg_sq")


def ensure_topology_free(ckpt_dir: str, rank: int) -> str:
    """Collective: rank 0 converts the checkpoint unless a complete conversion is cached; every rank
    raises CheckpointError if it failed. Returns the topology-free directory."""
    free_dir = os.path.join(ckpt_dir, FREE_DIR)
    error = None
    if rank == 0 and not os.path.isfile(os.path.join(free_dir, COMPLETE)):
        try:
            convert(ckpt_dir)
        except Exception as e:  # noqa: BLE001 -- reported to every rank
            error = f"{type(e).__name__}: {e}"
    agree(error, f"converting {ckpt_dir} to its topology-free layout")
    return free_dir


def _partition_slices(flats: List[torch.Tensor], shapes: Dict[str, torch.Size], world: int):
    """(name, full tensor) for each parameter of one sub-group, from the per-rank flat partitions:
    ZeRO-3 gives every rank ceil(numel / world) elements of each parameter, in order, the last
    rank's share padded."""
    offset = 0
    for name, shape in shapes.items():
        numel = int(torch.Size(shape).numel())
        per_rank = -(-numel // world)
        full = torch.cat([flat.narrow(0, offset, per_rank) for flat in flats]).narrow(0, 0, numel)
        yield name, full.view(shape).clone()
        offset += per_rank
    if offset != flats[0].numel():
        raise CheckpointError(f"a sub-group's partitions hold {flats[0].numel()} elements per rank, its parameters "
                              f"{offset}: not the layout DeepSpeed 0.19 writes")


def convert(ckpt_dir: str) -> str:
    """One process: the rigid ZeRO-3 shards of `ckpt_dir` → `ckpt_dir/topology_free/` (atomically)."""
    from deepspeed.checkpoint.constants import FROZEN_PARAM_FRAGMENTS, FROZEN_PARAM_SHAPES, PARAM_SHAPES
    from deepspeed.utils import zero_to_fp32
    from safetensors.torch import save_file

    model_files = zero_to_fp32.get_model_state_files(ckpt_dir)
    optim_files = zero_to_fp32.get_optim_files(ckpt_dir)
    world = len(optim_files)
    states = [torch.load(f, map_location="cpu", mmap=True, weights_only=False) for f in model_files]
    optims = [torch.load(f, map_location="cpu", mmap=True, weights_only=False)["optimizer_state_dict"]
              for f in optim_files]
    if optims[0]["zero_stage"] != 3 or len(states) != world:
        raise CheckpointError(f"{ckpt_dir}: topology-free conversion reads ZeRO-3 checkpoints with one model-state "
                              f"file per rank; found stage {optims[0]['zero_stage']}, {len(states)} model-state and "
                              f"{world} optimizer files")
    sub_group_shapes = states[0][PARAM_SHAPES]
    torch_states = [o["optimizer_state_dict"] for o in optims]
    # Optimizer state i is sub-group i: DeepSpeed lists the fp32 flats group by group, in order.
    group_of_sub = {}
    for group in torch_states[0]["param_groups"]:
        for index in group["params"]:
            group_of_sub[index] = group["name"]
    if sorted(group_of_sub) != list(range(len(sub_group_shapes))):
        raise CheckpointError(f"{ckpt_dir}: optimizer states {sorted(group_of_sub)} do not match its "
                              f"{len(sub_group_shapes)} parameter sub-groups")

    partial = os.path.join(ckpt_dir, FREE_DIR + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    params: Dict[str, Dict[str, Any]] = {}
    groups: Dict[str, Dict[str, float]] = {}

    def write(name: str, tensors: Dict[str, torch.Tensor], group: Optional[str]) -> None:
        file = f"{len(params):06d}.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(partial, file))
        params[name] = {"file": file, "trainable": group is not None, "group": group,
                        "shape": list(next(iter(tensors.values())).shape)}

    for sub, shapes in enumerate(sub_group_shapes):
        group = group_of_sub[sub]
        groups[group] = {"step": float(torch_states[0]["state"][sub]["step"])}
        per_key = {"fp32": _partition_slices([o["fp32_flat_groups"][sub] for o in optims], shapes, world)}
        for key in MOMENTS:
            per_key[key] = _partition_slices([s["state"][sub][key] for s in torch_states], shapes, world)
        for items in zip(*per_key.values()):
            write(items[0][0], {key: tensor for key, (_, tensor) in zip(per_key, items)}, group)
    for name, shape in (states[0].get(FROZEN_PARAM_SHAPES) or {}).items():
        fragments = [s[FROZEN_PARAM_FRAGMENTS][name] for s in states]
        write(name, {"weight": torch.cat(fragments).narrow(0, 0, torch.Size(shape).numel()).view(shape)}, None)
    for alias, target in states[0].get("shared_params", {}).items():
        params[alias] = params[target]

    scheduler = states[0].get("lr_scheduler") or {}
    index = {
        "format": FORMAT,
        "world_size": world,
        "params": params,
        "groups": groups,
        "lr_scheduler": {k: scheduler[k] for k in ("last_epoch", "_step_count") if k in scheduler},
        "engine": {k: states[0].get(k, 0) for k in ("global_steps", "global_samples", "skipped_steps")},
    }
    with open(os.path.join(partial, "index.json"), "w") as f:
        json.dump(index, f, indent=1)
    fsync_tree(partial)
    with open(os.path.join(partial, COMPLETE), "w") as f:
        f.write(FORMAT + "\n")
        f.flush()
        os.fsync(f.fileno())
    free_dir = os.path.join(ckpt_dir, FREE_DIR)
    shutil.rmtree(free_dir, ignore_errors=True)
    os.replace(partial, free_dir)
    return free_dir


def _copy_share(part: torch.Tensor, full: torch.Tensor, rank: int) -> None:
    """Copy this rank's share of a full tensor into its ZeRO-3 partition (`part`, ceil(numel / world)
    elements; the last ranks' shares are zero-padded). DeepSpeed's set_full_hp_param asserts the
    unpadded size and then reads past it on such ranks, so it cannot be used for odd sizes."""
    per_rank = part.numel()
    flat = full.reshape(-1).to(part.dtype)
    start = min(rank * per_rank, flat.numel())
    share = flat.narrow(0, start, min(per_rank, flat.numel() - start))
    with torch.no_grad():
        part.data.zero_()
        part.data.narrow(0, 0, share.numel()).copy_(share)


def load_topology_free(engine, free_dir: str, log=None) -> Dict[str, Any]:
    """Collective. Weights (trained and frozen), fp32 masters, Adam moments and steps, scheduler
    position and engine counters from `free_dir` into a ZeRO-3 engine of any world size. Returns
    the index (for logs and tests)."""
    from safetensors.torch import load_file

    opt = engine.optimizer
    if not hasattr(opt, "fp32_partitioned_groups_flat"):
        raise CheckpointError(f"{free_dir}: loading a topology-free checkpoint needs ZeRO stage 3 "
                              "(deepspeed.zero_stage: 3)")
    with open(os.path.join(free_dir, "index.json")) as f:
        index = json.load(f)
    if index.get("format") != FORMAT:
        raise CheckpointError(f"{free_dir}/index.json has format {index.get('format')!r}, expected {FORMAT!r}")
    opt.checkpoint_event_prologue()
    fresh_groups = set()
    for sub, flat in enumerate(opt.fp32_partitioned_groups_flat):
        group = opt.optimizer.param_groups[opt.sub_group_to_group_id[sub]]
        saved = index["groups"].get(group["name"])
        if saved is None:
            fresh_groups.add(group["name"])
        # What AdamW would create lazily for a fresh group; the saved step for a known one.
        opt.optimizer.state[flat] = {
            "step": adam_step_count(opt.optimizer, group, saved["step"] if saved else 0.0, flat),
            "exp_avg": torch.zeros_like(flat),
            "exp_avg_sq": torch.zeros_like(flat),
        }
    missing = [n for n, _ in engine.module.named_parameters() if n not in index["params"]]
    if missing:
        raise CheckpointError(f"{free_dir} has no saved tensor for {len(missing)} parameters of this model, "
                              f"e.g. {missing[:5]}: is it the same model?")
    for name, param in engine.module.named_parameters():
        entry = index["params"][name]
        tensors = load_file(os.path.join(free_dir, entry["file"]))
        if list(entry["shape"]) != list(param.ds_shape):
            raise CheckpointError(f"{free_dir}: {name} has shape {entry['shape']}, the model {list(param.ds_shape)}")
        weight = tensors["fp32"] if "fp32" in tensors else tensors["weight"]
        if param.requires_grad:
            rank = opt._get_param_partition_rank(param)
            for key in (None, *MOMENTS):
                value = weight if key is None else tensors.get(key)
                if value is not None:
                    part, _ = opt._get_fp32_opt_state_partition(param, release_swap_buffers=False, optim_state_key=key)
                    _copy_share(part, value, rank)
        else:
            _copy_share(param.ds_tensor, weight, torch.distributed.get_rank(group=param.ds_process_group))
    # The 16-bit partitions follow the fp32 masters, as after an optimizer step.
    for sub, fp32 in enumerate(opt.fp32_partitioned_groups_flat):
        opt.fp16_partitioned_groups_flat[sub].data.copy_(fp32.data)
        views = opt.unflatten(opt.fp16_partitioned_groups_flat[sub], opt.fp16_partitioned_groups[sub])
        for partitioned, view in zip(opt.fp16_partitioned_groups[sub], views):
            partitioned.data = view.data
    opt.checkpoint_event_epilogue()

    scheduler = engine.lr_scheduler
    if scheduler is not None and index["lr_scheduler"]:
        scheduler.last_epoch = int(index["lr_scheduler"]["last_epoch"])
        scheduler._step_count = int(index["lr_scheduler"].get("_step_count", scheduler.last_epoch + 1))
        # The recipe's peak rates (new groups included) at the saved position of the schedule.
        lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
        for group, lr in zip(scheduler.optimizer.param_groups, lrs):
            group["lr"] = lr
        scheduler._last_lr = lrs
    for key, value in index["engine"].items():
        setattr(engine, key, value)
    if log is not None:
        log.info("loaded topology-free checkpoint %s (saved by %d ranks); fresh optimizer state for groups %s",
                 free_dir, index["world_size"], sorted(fresh_groups) or "none")
    return index
