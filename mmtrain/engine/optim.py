"""Freeze policy, AdamW parameter groups and the learning-rate schedule."""

from __future__ import annotations

import difflib
import math
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from mmtrain.config.schema import ConfigError, OptimConfig
from mmtrain.models.registry import get_spec


def check_model_section(
    model_name: str, trainable: Optional[Sequence[str]], group_lr: Optional[Mapping[str, float]] = None
) -> Tuple[Tuple[str, ...], List[str]]:
    """Fail before anything is built when the recipe names an unknown flavour or parameter group,
    or gives a learning rate to a group that does not train. Returns the flavour's parameter groups
    and the groups that train (the flavour's default when `trainable` is None)."""
    try:
        spec = get_spec(model_name)
    except KeyError as e:
        raise ConfigError("model.name", e.args[0]) from None
    groups = spec.param_groups
    if trainable is None:
        trainable = list(spec.default_trainable if spec.default_trainable is not None else groups)
    for i, name in enumerate(trainable):
        if name not in groups:
            near = difflib.get_close_matches(name, list(groups), n=1)
            hint = f"; did you mean {near[0]}?" if near else ""
            raise ConfigError(f"model.trainable[{i}]", f"unknown group {name!r}{hint} Groups of {model_name}: {', '.join(groups)}")
    for name, lr in (group_lr or {}).items():
        if name not in trainable:
            raise ConfigError(f"optim.group_lr.{name}", f"group {name!r} does not train (model.trainable: {list(trainable)})")
        if lr <= 0:
            raise ConfigError(f"optim.group_lr.{name}", f"must be > 0, got {lr}")
    return groups, list(trainable)


def apply_freeze_policy(model: torch.nn.Module, trainable: Sequence[str]) -> Dict[str, Dict[str, int]]:
    """Set requires_grad from the recipe's trainable groups; return a table of groups.

    A trainable group without parameters is an error (naming the recipe key): the run would not
    train what the recipe says. Group names were checked by check_model_section.
    Call it once, on a freshly built model: parameters that the model built frozen (a fixed
    sin-cos position table, say) stay frozen whatever the recipe says.
    """
    built_frozen = {id(p) for p in model.parameters() if not p.requires_grad}
    groups = model.param_groups()
    _check_groups_cover(model, groups)
    table = {}
    for name, params in groups.items():
        train = name in trainable
        for _, p in params:
            p.requires_grad_(train and id(p) not in built_frozen)
        table[name] = {"trainable": int(train), "num_params": sum(_numel(p) for _, p in params),
                       "num_trainable": sum(_numel(p) for _, p in params if p.requires_grad)}
        if train and table[name]["num_params"] == 0:
            raise ConfigError("model.trainable", f"group {name!r} has no parameters in this model")
        if train and table[name]["num_trainable"] == 0:
            raise ConfigError("model.trainable", f"group {name!r} holds only parameters the model keeps frozen")
    return table


def _check_groups_cover(model: torch.nn.Module, groups: Mapping[str, Sequence[Tuple[str, torch.nn.Parameter]]]) -> None:
    """Every parameter in exactly one group: one left out would silently never train (or never
    freeze), one in two groups would get two learning rates. A model bug, so not a ConfigError."""
    seen: Dict[int, str] = {}
    for group, params in groups.items():
        for name, p in params:
            if id(p) in seen:
                raise RuntimeError(f"parameter {name} is in groups {seen[id(p)]!r} and {group!r}")
            seen[id(p)] = group
    missing = [name for name, p in model.named_parameters() if id(p) not in seen]
    if missing:
        raise RuntimeError(f"{len(missing)} parameters are in no group: {missing[:5]}")


def group_table_text(table: Mapping[str, Mapping[str, int]], lrs: Mapping[str, float]) -> str:
    """The start-up table: one line per group with its parameter counts and peak learning rate."""
    lines = [f"{'group':<12} {'params':>15} {'trainable':>15} {'peak lr':>9}"]
    for name, row in table.items():
        lr = f"{lrs[name]:.3g}" if row["trainable"] else "-"
        lines.append(f"{name:<12} {row['num_params']:>15,} {row['num_trainable']:>15,} {lr:>9}")
    total = sum(r["num_params"] for r in table.values())
    trained = sum(r["num_trainable"] for r in table.values())
    lines.append(f"{'total':<12} {total:>15,} {trained:>15,}")
    return "\n".join(lines)


def group_lrs(model: torch.nn.Module, cfg: OptimConfig) -> Dict[str, float]:
    return {name: float(cfg.group_lr.get(name, cfg.lr)) for name in model.param_groups()}


def _numel(p: torch.nn.Parameter) -> int:
    # Under ZeRO-3 a partitioned parameter's numel() is 0; ds_numel is its full size.
    return int(getattr(p, "ds_numel", p.numel()))


def adamw_param_groups(model: torch.nn.Module, cfg: OptimConfig) -> List[dict]:
    """One AdamW group per (parameter group, decay or not) that has trainable parameters, with the
    group's peak learning rate (the schedule multiplies every group's alike)."""
    lrs = group_lrs(model, cfg)
    out = []
    for group, params in model.param_groups().items():
        decay = [p for name, p in params if p.requires_grad and not model.no_weight_decay(name)]
        no_decay = [p for name, p in params if p.requires_grad and model.no_weight_decay(name)]
        for suffix, members, wd in (("", decay, cfg.weight_decay), (".no_decay", no_decay, 0.0)):
            if members:
                out.append({"params": members, "weight_decay": wd, "lr": lrs[group], "name": group + suffix})
    return out


def optimizer_kind(device: torch.device, offload_optimizer: bool, offload_adam: str) -> str:
    """Which AdamW implementation a run uses:

    * "fused": torch's single-kernel AdamW, on the device that holds the fp32 partitions ZeRO hands
      it: about twice as fast as the per-tensor loop on a GPU. Under optimizer offload
      (`deepspeed.offload_adam: torch_fused`) it runs on the host, where ZeRO-3's gradient clip is
      folded into it (mmtrain.engine.offload).
    * "cpu_adam": DeepSpeed's vectorised CPU AdamW, under offload with `deepspeed.offload_adam:
      deepspeed_cpu_adam`. Built by DeepSpeed's op builder on first use (a C++ compiler and ninja).
    * "torch": torch's AdamW; CPU runs without offload.
    """
    if offload_optimizer:
        return "cpu_adam" if offload_adam == "deepspeed_cpu_adam" else "fused"
    return "fused" if device.type == "cuda" else "torch"


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, kind: str = "torch") -> torch.optim.Optimizer:
    """AdamW over the trainable groups (per-group lr and weight decay), of `optimizer_kind`'s kind.
    Its states load from a checkpoint of any of the kinds (the step counts are converted)."""
    groups = adamw_param_groups(model, cfg)
    if kind == "cpu_adam":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                     weight_decay=cfg.weight_decay, adamw_mode=True)
    elif kind in ("torch", "fused"):
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                      weight_decay=cfg.weight_decay, fused=(kind == "fused") or None)
    else:
        raise ValueError(f"optimizer kind {kind!r} is not one of torch, fused, cpu_adam")
    optimizer.register_load_state_dict_pre_hook(_steps_as_kept_by)
    return optimizer


def _counts_steps_in_python(optimizer: torch.optim.Optimizer) -> bool:
    """DeepSpeed's CPU Adam keeps each parameter's step as a Python int and hands it to its C++
    kernel, which takes no tensor; torch's AdamW keeps a float32 tensor (fused: one it reads on device)."""
    return type(optimizer).__name__ == "DeepSpeedCPUAdam"


def adam_step_count(optimizer: torch.optim.Optimizer, group: dict, step: float, param: torch.Tensor):
    """A parameter's step count as `optimizer` keeps it in its state (what it would create lazily)."""
    if _counts_steps_in_python(optimizer):
        return int(step)
    device = param.device if group.get("fused") or group.get("capturable") else torch.device("cpu")
    return torch.tensor(float(step), dtype=torch.float32, device=device)


# How an AdamW computes, not what: always the running optimizer's, never the checkpoint's.
_IMPLEMENTATION_KEYS = ("fused", "foreach", "capturable", "differentiable")


def _steps_as_kept_by(optimizer: torch.optim.Optimizer, state_dict: dict) -> dict:
    """load_state_dict pre-hook: a checkpoint written by one AdamW kind resumes under another (a run
    that switches deepspeed.offload_adam, or turns offload on or off). The step counts take this
    optimizer's form (torch moves a tensor step to the parameter's device itself). Each group keeps
    the saved hyperparameters this optimizer knows and this optimizer's own keys for the rest: torch
    would otherwise restore the saved groups whole, so a fused AdamW that loads DeepSpeed's groups
    would run unfused, and DeepSpeed's CPU Adam would miss its `bias_correction`."""
    as_int = _counts_steps_in_python(optimizer)
    states = {}
    for index, state in state_dict["state"].items():
        step = state.get("step")
        if step is not None:
            step = int(step) if as_int else (step if torch.is_tensor(step) else torch.tensor(float(step)))
            state = {**state, "step": step}
        states[index] = state
    groups = state_dict["param_groups"]
    if len(groups) == len(optimizer.param_groups):  # else torch's own load raises its error
        groups = []
        for saved, current in zip(state_dict["param_groups"], optimizer.param_groups):
            group = {k: v for k, v in saved.items() if k in current and k not in _IMPLEMENTATION_KEYS}
            group.update({k: v for k, v in current.items() if k not in group and k != "params"})
            groups.append({**group, "params": saved["params"]})
    return {**state_dict, "state": states, "param_groups": groups}


def lr_multiplier(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Linear warmup to 1, then cosine / linear decay to min_lr_ratio, or constant. `step` counts
    completed optimizer steps, so the first update uses lr_multiplier(0)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))
    if cfg.schedule == "linear":
        shape = 1.0 - progress
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, cfg, max_steps))
