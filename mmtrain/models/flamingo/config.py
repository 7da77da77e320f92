"""Configuration of the Flamingo family (Otter, OpenFlamingo, IDEFICS) and its flavours.

Plain dataclasses without torch, so a config can be read, overridden and checked on its own.

The sections mirror the model's parameter groups: `vision` (open_clip ViT), `perceiver`,
the `cross_attn_*` fields (gated cross-attention blocks) and `decoder` (a transformers LLaMA,
field names as in `LlamaConfig`). The vocabulary sizes are left empty in a flavour and filled
from the tokenizer's token ids at build time (:func:`bind_token_ids`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

FAMILY = "flamingo"

# The model's parameter groups (what a recipe's `model.trainable` lists), in build order.
PARAM_GROUPS = ("vision", "perceiver", "cross_attn", "decoder", "new_tokens")

# CLIP's pixel statistics (open_clip.constants.OPENAI_DATASET_MEAN / OPENAI_DATASET_STD), written
# out so this module needs no open_clip import; a unit test checks they still match open_clip.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Where a gated cross-attention block runs, relative to decoder layer i and the interval n:
# OpenFlamingo/Otter put it before layer i when (i+1) % n == 0 (layers 3, 7, ... for n=4),
# IDEFICS before layer i when i % n == 0 (layers 0, 4, ...).
CROSS_ATTN_PLACEMENTS = ("before_(i+1)%n", "before_i%n")

# Keys the model reads from the tokenizer's TokenIds (mmtrain.data.tokenizer); others are stored as given.
REQUIRED_TOKEN_IDS = ("image", "base_vocab_size", "num_added_tokens")


@dataclass
class VisionConfig:
    """open_clip VisionTransformer; its patch tokens (CLS dropped, after ln_post) are the media features."""

    image_size_px: int = 224
    patch_size_px: int = 14
    width: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    pos_embed_type: str = "learnable"
    """open_clip position embedding: learnable (CLIP) or sin_cos_2d (fixed, full strength: a random
    frozen tower then still tells positions apart, which tiny flavours need)."""
    quick_gelu: bool = True
    """OpenAI-trained CLIP towers use QuickGELU; LAION-trained ones plain GELU."""
    mean: List[float] = field(default_factory=lambda: list(CLIP_MEAN))
    std: List[float] = field(default_factory=lambda: list(CLIP_STD))

    @property
    def num_patches(self) -> int:
        return (self.image_size_px // self.patch_size_px) ** 2


@dataclass
class PerceiverConfig:
    """Perceiver resampler: `num_latents` learned queries per image, width = vision width."""

    num_latents: int = 64
    depth: int = 6
    num_heads: int = 8
    head_dim: int = 64
    ff_mult: int = 4


@dataclass
class DecoderConfig:
    """transformers LlamaConfig fields of the language decoder (vocab size comes from the token ids)."""

    hidden_size: int = 4096
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    intermediate_size: int = 11008
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    initializer_range: float = 0.02
    attn_implementation: str = "sdpa"


@dataclass
class FlamingoConfig:
    """A whole Flamingo model: vision tower, perceiver, gated cross-attention blocks, decoder."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    perceiver: PerceiverConfig = field(default_factory=PerceiverConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    cross_attn_every_n_layers: int = 4
    cross_attn_placement: str = "before_(i+1)%n"
    """One of CROSS_ATTN_PLACEMENTS."""
    cross_attn_num_heads: int = 8
    cross_attn_head_dim: int = 64
    cross_attn_ff_mult: int = 4
    base_vocab_size: Optional[int] = None
    """Rows of the base embedding table and lm_head; None in a flavour, filled from the token ids."""
    num_added_tokens: Optional[int] = None
    """Rows of the decoupled (always trainable) tables for added tokens; filled from the token ids."""

    def cross_attn_layer_indices(self) -> List[int]:
        """Decoder layers that a gated cross-attention block runs before."""
        n = self.cross_attn_every_n_layers
        layers = range(self.decoder.num_hidden_layers)
        if self.cross_attn_placement == "before_(i+1)%n":
            return [i for i in layers if (i + 1) % n == 0]
        if self.cross_attn_placement == "before_i%n":
            return [i for i in layers if i % n == 0]
        raise ValueError(
            f"cross_attn_placement: {self.cross_attn_placement!r} is not one of {list(CROSS_ATTN_PLACEMENTS)}"
        )

    def check(self) -> None:
        """Raise ValueError naming the field when the configuration cannot build a model."""
        if self.cross_attn_every_n_layers < 1:
            raise ValueError(f"cross_attn_every_n_layers: must be >= 1, got {self.cross_attn_every_n_layers}")
        if not self.cross_attn_layer_indices():
            raise ValueError(
                f"cross_attn_every_n_layers: {self.cross_attn_every_n_layers} places no cross-attention block "
                f"in {self.decoder.num_hidden_layers} decoder layers with {self.cross_attn_placement!r}"
            )
        if self.vision.image_size_px % self.vision.patch_size_px:
            raise ValueError(
                f"vision.image_size_px: {self.vision.image_size_px} is not a multiple of "
                f"vision.patch_size_px {self.vision.patch_size_px}"
            )
        if self.decoder.num_attention_heads % self.decoder.num_key_value_heads:
            raise ValueError("decoder.num_key_value_heads: must divide decoder.num_attention_heads")
        for name in ("base_vocab_size", "num_added_tokens"):
            value = getattr(self, name)
            if value is None or value < 1:
                raise ValueError(f"{name}: must be a positive int (filled from the token ids), got {value!r}")


def bind_token_ids(config: FlamingoConfig, token_ids: Mapping[str, Any]) -> FlamingoConfig:
    """Return `config` with its vocabulary sizes taken from the tokenizer's token ids.

    A config that already holds sizes (one reloaded from a saved model) must agree with the
    tokenizer: a mismatch means the checkpoint and the tokenizer do not belong together.
    """
    missing = [key for key in REQUIRED_TOKEN_IDS if key not in token_ids]
    if missing:
        raise ValueError(f"token_ids: missing {missing}; expected the fields of mmtrain.data.tokenizer.TokenIds")
    sizes = {key: int(token_ids[key]) for key in ("base_vocab_size", "num_added_tokens")}
    for key, value in sizes.items():
        stored = getattr(config, key)
        if stored is not None and stored != value:
            raise ValueError(f"{key}: the model config says {stored} but the token ids say {value}")
    vocab_size = sizes["base_vocab_size"] + sizes["num_added_tokens"]
    if not 0 <= int(token_ids["image"]) < vocab_size:
        raise ValueError(f"token_ids.image: {token_ids['image']} is outside the vocabulary of {vocab_size} ids")
    return dataclasses.replace(config, **sizes)


def image_spec(config: FlamingoConfig) -> Dict[str, Any]:
    """What the data pipeline must resize (square, pixels) and normalise images to."""
    return {"size_px": config.vision.image_size_px, "mean": list(config.vision.mean), "std": list(config.vision.std)}


OTTER_TINY = FlamingoConfig(
    vision=VisionConfig(
        image_size_px=32, patch_size_px=4, width=64, num_layers=2, num_heads=4, pos_embed_type="sin_cos_2d", quick_gelu=False
    ),
    perceiver=PerceiverConfig(num_latents=8, depth=1, num_heads=4, head_dim=16, ff_mult=4),
    decoder=DecoderConfig(
        hidden_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=256,
        rms_norm_eps=1e-6,
        max_position_embeddings=2048,
    ),
    cross_attn_every_n_layers=2,
    cross_attn_placement="before_(i+1)%n",
    cross_attn_num_heads=4,
    cross_attn_head_dim=16,
    cross_attn_ff_mult=4,
)
