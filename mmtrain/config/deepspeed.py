"""The DeepSpeed JSON, generated from the schema: the only place DeepSpeed settings come from.

Never hand DeepSpeed a second config with "auto" fields: the batch sizes here are derived once by
`derive_batch`, and the JSON is dumped to the run directory exactly as given to DeepSpeed.
"""

from __future__ import annotations

import copy
from typing import Any, Dict

from mmtrain.config.schema import RunConfig, derive_batch


def _deep_merge(base: Dict[str, Any], extra: Dict[str, Any]) -> Dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def deepspeed_json(cfg: RunConfig, world_size: int) -> Dict[str, Any]:
    batch = derive_batch(cfg, world_size)
    ds = cfg.deepspeed
    zero: Dict[str, Any] = {
        "stage": ds.zero_stage,
        "overlap_comm": ds.overlap_comm,
        "contiguous_gradients": True,
        "reduce_bucket_size": ds.reduce_bucket_elements,
    }
    if ds.zero_stage == 3:
        zero.update(
            {
                "stage3_prefetch_bucket_size": ds.prefetch_bucket_elements,
                "stage3_param_persistence_threshold": ds.param_persistence_threshold_elements,
                # Export reads the fp32 master partitions from the checkpoint, so no 16-bit
                # gather at save time (it would materialise the whole model on rank 0).
                "stage3_gather_16bit_weights_on_model_save": False,
            }
        )
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    out: Dict[str, Any] = {
        "train_batch_size": batch["global_batch_size"],
        "train_micro_batch_size_per_gpu": batch["micro_batch_size"],
        "gradient_accumulation_steps": batch["grad_accum_steps"],
        "gradient_clipping": cfg.optim.grad_clip_norm,
        "bf16": {"enabled": cfg.train.precision == "bf16"},
        "zero_optimization": zero,
        # mmtrain builds its own AdamW with per-group weight decay; DeepSpeed must not swap it.
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
        # mmtrain logs every step itself; DeepSpeed's own prints would duplicate them.
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    return _deep_merge(out, ds.extra)
