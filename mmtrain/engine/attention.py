"""Which attention kernels the model runs: chosen at start-up from the recipe, the model, the data
and the machine, and logged (docs/performance.md has the measured differences).

Two choices: the decoder's self-attention (`model.attention`, the config field
`decoder.attn_implementation`) and, for models with one, the text-to-image cross-attention
(`model.cross_attention`, the config field `cross_attn_implementation`). FlexAttention is the
block-sparse form (mmtrain.models.flex) of what SDPA would need a dense mask or bias for: packed
rows, cross-attention's one-image-per-token rule, MPT's ALiBi. torch has no CPU backward for it,
so it is CUDA only.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any, Dict, Mapping

import torch

from mmtrain.config.schema import ConfigError
from mmtrain.models.flex import FLEX, flex_available
from mmtrain.models.registry import ModelSpec

CHOICES = ("auto", "sdpa", "eager", "flash_attention_2", FLEX)
CROSS_CHOICES = ("auto", "sdpa", FLEX)


@dataclass
class AttentionChoice:
    overrides: Dict[str, Any]
    """The model overrides with the chosen kernels set in them."""
    decoder: str
    decoder_why: str
    cross: str
    """"" for a model without cross-attention."""
    cross_why: str

    def describe(self) -> str:
        text = f"{self.decoder} ({self.decoder_why})"
        if self.cross:
            text += f"; cross-attention: {self.cross} ({self.cross_why})"
        return text


def _as_dict(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _as_dict(v) for k, v in value.items()}
    return value


def _flex_usable(key: str, device: torch.device) -> None:
    if device.type != "cuda":
        raise ConfigError(key, "flex_attention trains on CUDA only (torch has no CPU backward for it); use sdpa")
    if not flex_available():
        raise ConfigError(key, f"flex_attention needs torch >= 2.5, this is {torch.__version__}")


def _explicit(key: str, requested: str, supported, spec: ModelSpec, device: torch.device):
    if requested not in supported:
        raise ConfigError(key, f"{spec.name} supports {', '.join(supported)}, not {requested!r}")
    if requested == FLEX:
        _flex_usable(key, device)
    return requested, f"set by {key}"


def _decoder_kernel(requested: str, spec: ModelSpec, device: torch.device, dtype: torch.dtype, packing: bool):
    supported = spec.attention_implementations
    if requested != "auto":
        return _explicit("model.attention", requested, supported, spec, device)
    cuda = device.type == "cuda"
    if "sdpa" not in supported:
        return supported[0], f"the only kernel {spec.name}'s decoder has"
    if cuda and dtype == torch.bfloat16 and "flash_attention_2" in supported and importlib.util.find_spec("flash_attn"):
        return "flash_attention_2", "flash-attn is installed and applies (bf16, CUDA; packed rows as varlen)"
    if cuda and FLEX in supported and flex_available():
        if packing:
            return FLEX, "packed rows: its block mask skips other documents' tiles, where SDPA would take a dense mask"
        if spec.sdpa_dense_bias:
            return FLEX, f"{spec.name}'s position bias is computed in the kernel, where SDPA would take a dense bias"
    if not cuda:
        return "sdpa", "not on CUDA; PyTorch SDPA picks its kernel"
    return "sdpa", "rows are single documents: SDPA's causal flash/cuDNN kernels, no mask"


def _cross_kernel(requested: str, spec: ModelSpec, device: torch.device, packing: bool):
    supported = spec.cross_attention_implementations
    if not supported:
        if requested != "auto":
            raise ConfigError("model.cross_attention", f"{spec.name} has no cross-attention")
        return "", ""
    if requested != "auto":
        return _explicit("model.cross_attention", requested, supported, spec, device)
    if device.type != "cuda":
        return "sdpa", "not on CUDA: a dense bool mask"
    if packing and FLEX in supported and flex_available():
        return FLEX, "packed rows: each token's one image as a block mask, no dense [B,1,T,N*L] mask"
    # Measured (docs/performance.md): with single-document rows the mask is small ([B,1,T,N*L] with
    # N*L a few hundred keys) and SDPA over it ran 2% faster than the block form on an H100.
    return "sdpa", "single-document rows: SDPA over the small dense image mask measured faster than flex"


def choose_attention(
    requested: str,
    spec: ModelSpec,
    overrides: Mapping[str, Any],
    device: torch.device,
    dtype: torch.dtype,
    packing: bool = False,
    requested_cross: str = "auto",
) -> AttentionChoice:
    """Resolve `model.attention` and `model.cross_attention` (auto or explicit) into the model's fields."""
    if requested not in CHOICES:
        raise ConfigError("model.attention", f"{requested!r} is not one of {', '.join(CHOICES)}")
    if requested_cross not in CROSS_CHOICES:
        raise ConfigError("model.cross_attention", f"{requested_cross!r} is not one of {', '.join(CROSS_CHOICES)}")
    out = _as_dict(overrides)
    decoder = out.setdefault("decoder", {})
    if "attn_implementation" in decoder:
        raise ConfigError("model.overrides.decoder.attn_implementation", "set the kernel with model.attention instead")
    if "cross_attn_implementation" in out:
        raise ConfigError("model.overrides.cross_attn_implementation", "set the kernel with model.cross_attention instead")
    kernel, why = _decoder_kernel(requested, spec, device, dtype, packing)
    decoder["attn_implementation"] = kernel
    cross, cross_why = _cross_kernel(requested_cross, spec, device, packing)
    if cross:
        out["cross_attn_implementation"] = cross
    return AttentionChoice(out, kernel, why, cross, cross_why)
