"""Rotary position embeddings from transformers' rotary modules, with fp32 inverse frequencies."""

from __future__ import annotations

from typing import Tuple

import torch
from torch import nn


def rotary_embeddings(rotary: nn.Module, hidden: torch.Tensor, position_ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) of `rotary` (a transformers *RotaryEmbedding) for `position_ids`.

    A bf16 model (`.bfloat16()`, or DeepSpeed zero.Init creating every float tensor in bf16) has
    RoPE's inverse frequencies rounded to bf16, which shifts rotary angles by whole radians at long
    positions. They are recomputed in fp32 once (they are non-persistent buffers).
    """
    if rotary.inv_freq.dtype != torch.float32:
        inv_freq, _ = rotary.compute_default_rope_parameters(rotary.config)
        rotary.inv_freq = inv_freq.to(rotary.inv_freq.device)
        rotary.original_inv_freq = rotary.inv_freq.clone()
    return rotary(hidden, position_ids)
