"""The vision tower: open_clip's VisionTransformer, built from the config (nothing downloaded).

Media features follow OpenFlamingo's contract: the patch tokens of `forward` with
`output_tokens=True` (CLS dropped, after `ln_post`). The pooled projection `proj` is removed:
Flamingo never uses it, and a parameter that never gets a gradient would sit in the optimizer
whenever the tower trains. Other parameter names are open_clip's `visual.*` ones, so its
checkpoints load without renaming once `visual.proj` is dropped.
"""

from __future__ import annotations

import torch
from open_clip.transformer import QuickGELU, VisionTransformer
from torch import nn

from mmtrain.models.flamingo.config import VisionConfig


def build_vision_encoder(config: VisionConfig) -> VisionTransformer:
    encoder = VisionTransformer(
        image_size=config.image_size_px,
        patch_size=config.patch_size_px,
        width=config.width,
        layers=config.num_layers,
        heads=config.num_heads,
        mlp_ratio=config.mlp_ratio,
        output_dim=config.width,
        pos_embed_type=config.pos_embed_type,
        act_layer=QuickGELU if config.quick_gelu else nn.GELU,
        output_tokens=True,
    )
    encoder.proj = None  # open_clip skips the projection when it is None
    return encoder


def patch_features(encoder: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """[B, N, 3, H, W] pixels → [B, N, P, width] patch tokens.

    A frozen tower runs under no_grad: its activations would otherwise be kept for a backward
    that never reaches it.
    """
    batch, num_images = images.shape[:2]
    pixels = images.flatten(0, 1).to(encoder.conv1.weight.dtype)
    trainable = any(p.requires_grad for p in encoder.parameters())
    with torch.set_grad_enabled(trainable and torch.is_grad_enabled()):
        _, tokens = encoder(pixels)
    return tokens.reshape(batch, num_images, *tokens.shape[1:])
