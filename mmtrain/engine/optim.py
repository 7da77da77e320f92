"""Freeze policy, AdamW parameter groups and the learning-rate schedule."""

from __future__ import annotations

import difflib
import math
from typing import Dict, List, Sequence, Tuple

import torch

from mmtrain.config.schema import ConfigError, OptimConfig
from mmtrain.models.registry import get_spec


def check_model_section(model_name: str, trainable: Sequence[str]) -> Tuple[str, ...]:
    """Fail before anything is built when the recipe names an unknown flavour or parameter group.

    Returns the flavour's parameter groups."""
    try:
        spec = get_spec(model_name)
    except KeyError as e:
        raise ConfigError("model.name", e.args[0]) from None
    groups = spec.param_groups
    for i, name in enumerate(trainable):
        if name not in groups:
            near = difflib.get_close_matches(name, list(groups), n=1)
            hint = f"; did you mean {near[0]}?" if near else ""
            raise ConfigError(f"model.trainable[{i}]", f"unknown group {name!r}{hint} Groups of {model_name}: {', '.join(groups)}")
    return groups


def apply_freeze_policy(model: torch.nn.Module, trainable: Sequence[str]) -> Dict[str, Dict[str, int]]:
    """Set requires_grad from the recipe's trainable groups; return a table of groups.

    A trainable group without parameters is an error (naming the recipe key): the run would not
    train what the recipe says. Group names were checked by check_model_section.
    Call it once, on a freshly built model: parameters that the model built frozen (a fixed
    sin-cos position table, say) stay frozen whatever the recipe says.
    """
    built_frozen = {id(p) for p in model.parameters() if not p.requires_grad}
    table = {}
    for name, params in model.param_groups().items():
        train = name in trainable
        for _, p in params:
            p.requires_grad_(train and id(p) not in built_frozen)
        table[name] = {"trainable": int(train), "num_params": sum(_numel(p) for _, p in params)}
        if train and table[name]["num_params"] == 0:
            raise ConfigError("model.trainable", f"group {name!r} has no parameters in this model")
    return table


def _numel(p: torch.nn.Parameter) -> int:
    # Under ZeRO-3 a partitioned parameter's numel() is 0; ds_numel is its full size.
    return int(getattr(p, "ds_numel", p.numel()))


def adamw_param_groups(model: torch.nn.Module, cfg: OptimConfig) -> List[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if model.no_weight_decay(name) else decay).append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": cfg.weight_decay, "name": "decay"})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "name": "no_decay"})
    return groups


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        adamw_param_groups(model, cfg), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay
    )


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
