"""The vision tower, built from the config (nothing downloaded), and the media features it gives.

`vision.tower` picks the tower and with it the feature contract:

open_clip (OpenFlamingo): open_clip's VisionTransformer; the features are the patch tokens of
`forward` with `output_tokens=True` (CLS dropped; after `ln_post` unless `final_ln_after_pool`,
which the OpenFlamingo releases need, see VisionConfig). The pooled projection
`proj` is removed: Flamingo never uses it, and a parameter that never gets a gradient would sit in
the optimizer whenever the tower trains. Other parameter names are open_clip's `visual.*` ones, so
its checkpoints load without renaming once `visual.proj` is dropped.

idefics_clip (IDEFICS): transformers' IdeficsVisionTransformer (HF CLIP's layout: `embeddings`,
`pre_layrnorm`, `encoder.layers.N`, `post_layernorm`), exactly as IdeficsModel builds it; the
features are its `last_hidden_state`: CLS kept, no post-LayerNorm (257 tokens at 224 px / 14).
`post_layernorm` is kept so that published checkpoints load as they are; it only normalises the
pooled CLS output, which nothing uses, so it never gets a gradient.

hf_clip (Otter): transformers' CLIPVisionModel, as Otter builds it; the features are
`last_hidden_state[:, 1:]`: CLS dropped, no post-LayerNorm (256 tokens at 224 px / 14), the same
tokens as the open_clip tower with `final_ln_after_pool` for the same weights. A PreTrainedModel:
built without its initialisation, which the model's `deferred_init` runs (as for the decoder).
Its names are Otter's `vision_encoder.vision_model.*` without `vision_model.`.
"""

from __future__ import annotations

import torch
from open_clip.transformer import QuickGELU, VisionTransformer
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel
from transformers.initialization import no_init_weights
from transformers.models.idefics.configuration_idefics import IdeficsVisionConfig
from transformers.models.idefics.vision import IdeficsVisionTransformer

from mmtrain.models.flamingo.config import VisionConfig


def vision_kernel(decoder_kernel: str) -> str:
    """The tower's attention kernel for the decoder's: the same, except SDPA for flex_attention
    (the tower's attention is unmasked, which SDPA's flash and cuDNN kernels serve best)."""
    return "sdpa" if decoder_kernel == "flex_attention" else decoder_kernel


def build_vision_encoder(config: VisionConfig, attn_implementation: str = "sdpa") -> nn.Module:
    """The tower `config.tower` names, with random weights (initialised in its constructors)."""
    if config.tower == "idefics_clip":
        return IdeficsVisionTransformer(idefics_vision_config(config, attn_implementation))
    if config.tower == "hf_clip":
        with no_init_weights():
            return CLIPVisionModel(
                CLIPVisionConfig(
                    hidden_size=config.width,
                    intermediate_size=int(config.width * config.mlp_ratio),
                    num_hidden_layers=config.num_layers,
                    num_attention_heads=config.num_heads,
                    image_size=config.image_size_px,
                    patch_size=config.patch_size_px,
                    hidden_act="quick_gelu" if config.quick_gelu else "gelu",
                    attn_implementation=attn_implementation,
                )
            )
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
        final_ln_after_pool=config.final_ln_after_pool,
        output_tokens=True,
    )
    encoder.proj = None  # open_clip skips the projection when it is None
    return encoder


def tower_layers(encoder: nn.Module) -> nn.ModuleList:
    """The tower's transformer layers, whichever implementation built it."""
    if isinstance(encoder, VisionTransformer):
        return encoder.transformer.resblocks
    return encoder.encoder.layers  # IdeficsVisionTransformer, CLIPVisionModel (transformers 5: no `vision_model`)


def idefics_vision_config(config: VisionConfig, attn_implementation: str = "sdpa") -> IdeficsVisionConfig:
    """transformers' IdeficsVisionConfig (the `vision_config` of an IdeficsConfig) for `config`."""
    vision_config = IdeficsVisionConfig(
        embed_dim=config.width,
        image_size=config.image_size_px,
        patch_size=config.patch_size_px,
        intermediate_size=int(config.width * config.mlp_ratio),
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        hidden_act="quick_gelu" if config.quick_gelu else "gelu",
    )
    # IdeficsModel sets this on its vision config too: the tower is not a PreTrainedModel.
    vision_config._attn_implementation = attn_implementation
    return vision_config


def patch_features(encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """[B, N, 3, H, W] pixels → [B, N, P, width] media tokens (the tower's feature contract, above).

    A frozen tower runs under no_grad: its activations would otherwise be kept for a backward
    that never reaches it.
    """
    batch, num_images = images.shape[:2]
    pixels = images.flatten(0, 1)
    trainable = any(p.requires_grad for p in encoder.parameters())
    with torch.set_grad_enabled(trainable and torch.is_grad_enabled()):
        if isinstance(encoder, IdeficsVisionTransformer):
            tokens = encoder(pixel_values=pixels).last_hidden_state  # casts to its own dtype
        elif isinstance(encoder, CLIPVisionModel):
            tokens = encoder(pixel_values=pixels).last_hidden_state[:, 1:]  # casts to its own dtype
        else:
            _, tokens = encoder(pixels.to(encoder.conv1.weight.dtype))
    return tokens.reshape(batch, num_images, *tokens.shape[1:])
