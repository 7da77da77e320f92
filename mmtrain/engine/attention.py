"""Which attention kernel the decoder runs: chosen at start-up from the recipe, the model and the
machine, and logged (docs/performance.md will carry the measured differences)."""

from __future__ import annotations

import importlib.util
from typing import Any, Dict, Mapping, Tuple

import torch

from mmtrain.config.schema import ConfigError
from mmtrain.models.registry import ModelSpec

CHOICES = ("auto", "sdpa", "eager", "flash_attention_2")


def _as_dict(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _as_dict(v) for k, v in value.items()}
    return value


def choose_attention(
    requested: str, spec: ModelSpec, overrides: Mapping[str, Any], device: torch.device, dtype: torch.dtype
) -> Tuple[Dict[str, Any], str, str]:
    """(model overrides with `decoder.attn_implementation` set, the kernel, why it was chosen)."""
    if requested not in CHOICES:
        raise ConfigError("model.attention", f"{requested!r} is not one of {', '.join(CHOICES)}")
    out = _as_dict(overrides)
    decoder = out.setdefault("decoder", {})
    if "attn_implementation" in decoder:
        raise ConfigError("model.overrides.decoder.attn_implementation", "set the kernel with model.attention instead")
    supported = spec.attention_implementations
    if requested != "auto":
        if requested not in supported:
            raise ConfigError("model.attention", f"{spec.name} supports {', '.join(supported)}, not {requested!r}")
        choice, why = requested, "set by model.attention"
    elif "sdpa" not in supported:
        choice, why = supported[0], f"the only kernel {spec.name}'s decoder has"
    elif "flash_attention_2" not in supported:
        choice, why = "sdpa", f"{spec.name} has no flash-attn path; PyTorch SDPA picks its kernel"
    elif device.type != "cuda" or dtype != torch.bfloat16:
        choice, why = "sdpa", "flash-attn needs bf16 on CUDA; PyTorch SDPA picks its kernel"
    elif importlib.util.find_spec("flash_attn") is None:
        choice, why = "sdpa", "flash-attn is not installed; PyTorch SDPA picks its kernel (cuDNN on H100)"
    else:
        choice, why = "flash_attention_2", "flash-attn is installed and applies (bf16, CUDA)"
    decoder["attn_implementation"] = choice
    return out, choice, why
