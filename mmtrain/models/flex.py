"""FlexAttention: the block-sparse form of the attention patterns mmtrain's models need.

Three patterns would otherwise take a dense 4-D mask (or bias) that pushes SDPA off its flash and
cuDNN kernels onto the memory-efficient one, and costs B·H·T·S memory:

* packed rows: causal attention inside each document only (the decoders get it from transformers'
  `create_causal_mask` when their config says "flex_attention");
* Flamingo cross-attention: each text token attends to the latents of one image only
  (:func:`media_block_mask`);
* MPT's ALiBi: an additive per-head bias, here a `score_mod` computed inside the kernel
  (:func:`alibi_score_mod`), so the bias costs no memory at all.

A BlockMask records, per 128x128 tile, whether it is empty, full or partial, and the kernel skips
empty tiles: a row of 8 packed documents costs about 1/8 of a causal row's attention FLOPs.

Off CUDA torch runs flex attention unfused and has no backward for it on CPU, so the engine picks
it only on CUDA (mmtrain.engine.attention); the CPU tests check its forward against the dense form.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch

FLEX = "flex_attention"
"""The kernel name, as transformers' attention interface spells it."""

try:  # torch >= 2.5
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask
    from torch.nn.attention.flex_attention import flex_attention as _flex_attention
except ImportError:  # pragma: no cover - older torch: the engine never picks flex then
    BlockMask = None  # type: ignore[assignment,misc]


def flex_available() -> bool:
    """Whether this torch has FlexAttention at all."""
    return BlockMask is not None


def is_block_mask(mask: object) -> bool:
    return BlockMask is not None and isinstance(mask, BlockMask)


@functools.lru_cache(maxsize=None)
def _compiled() -> Callable:
    # One compilation per process; dynamic=False as transformers compiles it (shapes repeat per step).
    return torch.compile(_flex_attention, dynamic=False)


def flex_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    block_mask: "BlockMask",
    score_mod: Optional[Callable] = None,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """[B, H, T, D] attention output; compiled on CUDA (eager flex materialises every score)."""
    fn = _compiled() if query.device.type == "cuda" else _flex_attention
    return fn(query, key, value, score_mod=score_mod, block_mask=block_mask, scale=scale)


def media_block_mask(token_image: torch.Tensor, num_latents: int, num_images: int) -> "BlockMask":
    """Cross-attention BlockMask [B, 1, T, num_images * num_latents]: token t attends to the
    latents of image `token_image[b, t]` only, and to nothing where that is -1 (flex returns 0 for
    such rows, which the blocks zero anyway)."""
    batch, seq_len = token_image.shape

    def sees_its_image(b, h, q_idx, kv_idx):
        return token_image[b, q_idx] == kv_idx // num_latents

    return create_block_mask(
        sees_its_image, batch, None, seq_len, num_images * num_latents, device=token_image.device
    )


def alibi_score_mod(slopes: torch.Tensor) -> Callable:
    """ALiBi as a score_mod: score + slope[h] * (key - query), in the kernel's fp32 scores.

    MPT adds slope[h] * (key - T + 1) instead; inside one query's row the two differ by a constant,
    which softmax ignores. The relative form keeps the bias small near the diagonal (MPT's grows to
    slope·T there), which also lets the SDPA fallback hold it in bf16 without losing the nearby keys.
    """

    def alibi(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)

    return alibi
