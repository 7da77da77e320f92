"""The model of a run, built the way the Trainer builds it: attention kernel chosen, parameters
partitioned as they are created (ZeRO-3), deferred initialisation on gathered weights, then
published or exported weights streamed in. The Trainer and the benchmarks in bench/ share it, so
a benchmark measures the model a run trains."""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from mmtrain.config import RunConfig
from mmtrain.engine.attention import choose_attention
from mmtrain.models.registry import build_model, get_spec


def build_run_model(cfg: RunConfig, ds_config: Dict[str, Any], token_ids: Mapping[str, int],
                    device: torch.device, dtype: torch.dtype, rank: int, log: logging.Logger,
                    resume_from: Optional[str] = None) -> torch.nn.Module:
    """`resume_from`: the run checkpoint the caller will restore next; init_from then reads only the
    weights it lacks (see mmtrain.engine.load.load_init_from)."""
    import deepspeed

    # Under ZeRO-3 each parameter is partitioned as soon as its module is built, so no rank
    # ever holds the whole model.
    # NOTE: no dtype argument: zero.Init then takes it from the config (bf16 or fp32). Given
    # explicitly, DeepSpeed 0.19 ignores it on accelerators without fp16 (an operator-precedence
    # slip in Init._set_dtype) and builds bf16 parameters on CPU even for an fp32 run.
    attention = choose_attention(cfg.model.attention, get_spec(cfg.model.name), cfg.model.overrides, device, dtype,
                                 packing=cfg.data.packing, requested_cross=cfg.model.cross_attention)
    overrides = attention.overrides
    log.info("attention: %s", attention.describe())
    zero3 = cfg.deepspeed.zero_stage == 3
    with deepspeed.zero.Init(config_dict_or_path=ds_config, enabled=zero3):
        model = build_model(cfg.model.name, overrides, dict(token_ids), init_deferred=not zero3)
    if not zero3:
        model = model.to(dtype)
    elif cfg.deepspeed.leaf_blocks:
        from deepspeed.utils import set_z3_leaf_module

        blocks = model.zero3_leaf_blocks()
        for block in blocks:
            set_z3_leaf_module(block, True)
        log.info("ZeRO-3 gathers %d blocks as units (deepspeed.leaf_blocks)", len(blocks))
    if cfg.model.pretrained:
        load_exported(model, cfg.model.pretrained, rank)
    elif zero3:
        run_deferred_init(model, rank)
    fused = cfg.model.fused_kernels
    if fused or (fused is None and device.type == "cuda"):
        from mmtrain.models import kernels

        log.info("fused kernels (model.fused_kernels=%s): %s", cfg.model.fused_kernels, kernels.install(model))
    if cfg.model.init_from:
        # Published weights over the initialised model (rows a shorter file lacks keep their init),
        # one parameter at a time, none that the resumed checkpoint holds: see mmtrain.engine.load.
        from mmtrain.engine.load import load_init_from

        init_from = cfg.model.init_from
        load_init_from(model, init_from if isinstance(init_from, str) else [str(p) for p in init_from],
                       resume_from=resume_from, log=log)
    return model


def build_run_engine(model: torch.nn.Module, cfg: RunConfig, ds_config: Dict[str, Any], device: torch.device,
                     local_world_size: int, log: logging.Logger) -> Tuple[Any, Any]:
    """The AdamW of the run's kind, its learning-rate schedule and the DeepSpeed engine around the
    model (freeze policy applied), with the offload tuning (mmtrain.engine.offload). Returns
    (engine, scheduler)."""
    import deepspeed

    from mmtrain.engine.offload import tune_offload
    from mmtrain.engine.optim import build_optimizer, build_scheduler, optimizer_kind

    kind = optimizer_kind(device, cfg.deepspeed.offload_optimizer, cfg.deepspeed.offload_adam)
    log.info("optimizer: AdamW (%s)", kind)
    optimizer = build_optimizer(model, cfg.optim, kind)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.max_steps)
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                   config=ds_config)
    tuned = tune_offload(engine, cfg.deepspeed, device, local_world_size)
    if tuned["host_threads"]:
        log.info("optimizer offload: host AdamW on %d threads (deepspeed.offload_host_threads)", tuned["host_threads"])
    if tuned["folded_clip"]:
        log.info("optimizer offload: gradient clip folded into the host AdamW (deepspeed.offload_adam=torch_fused)")
    if tuned["pinned_upload"]:
        log.info("optimizer offload: fp32 master weights pinned, updates rounded to bf16 on the GPU "
                 "(deepspeed.offload_pinned_upload)")
    return engine, scheduler


def run_deferred_init(model: torch.nn.Module, rank: int) -> None:
    """The model's deferred initialisation on partitioned weights: rank 0 runs it on each module's
    gathered weights, one module at a time, and they are broadcast back. Rank 0's random stream is
    where a plain build's would be, so the weights equal a plain build's for the same seed."""
    import deepspeed

    for module, init_fn in model.deferred_init():
        params = list(module.parameters(recurse=False))
        if not params:
            continue
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            if rank == 0:
                with torch.no_grad():
                    init_fn(module)


def load_exported(model: torch.nn.Module, path: str, rank: int) -> None:
    """Copy weights from an export directory one parameter at a time (gathered, then re-partitioned)."""
    import deepspeed
    from safetensors import safe_open

    file = os.path.join(path, "model.safetensors")
    with safe_open(file, framework="pt") as f:
        names = set(f.keys())
        expected = {n for n, _ in model.named_parameters()}
        missing, unexpected = sorted(expected - names), sorted(names - expected)
        if missing or unexpected:
            raise ValueError(f"{file}: missing keys {missing[:10]}, unexpected keys {unexpected[:10]} (model.pretrained)")
        for name, param in model.named_parameters():
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0, enabled=hasattr(param, "ds_id")):
                if rank == 0 or not hasattr(param, "ds_id"):
                    param.data.copy_(f.get_tensor(name).to(param.dtype))
