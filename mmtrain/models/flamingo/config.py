"""Configuration of the Flamingo family (Otter, OpenFlamingo, IDEFICS) and its flavours.

Plain dataclasses without torch, so a config can be read, overridden and checked on its own.

The sections mirror the model's parameter groups: `vision` (ViT), `perceiver`, the `cross_attn_*`
fields (gated cross-attention blocks) and `decoder` (a transformers LLaMA, field names as in
`LlamaConfig`). The vocabulary sizes are left empty in a flavour and filled from the tokenizer's
token ids at build time (:func:`bind_token_ids`).

What tells the flavours apart is a field each, never the flavour's name:

  field                  OpenFlamingo / Otter (default)          IDEFICS
  cross_attn_placement   before_(i+1)%n                          before_i%n
  cross_attn_style       openflamingo: LayerNorm-pre, to_q/to_kv, idefics: RMSNorm-pre, q/k/v/o_proj,
                         GELU FF of dim*ff_mult, attn/ff_gate    SwiGLU MLP of the decoder's size,
                                                                 alpha_cross_attn/alpha_dense
  cross_attn_qk_norms    False                                   True: RMSNorm(head_dim) on q and k
  perceiver.style        openflamingo                            idefics (`ln, fc, c_proj` ReLU MLP)
  perceiver.qk_norms     False                                   True: LayerNorm(head_dim) on q and k
  vision.tower           open_clip: patch tokens, CLS dropped,   idefics_clip: IdeficsVisionTransformer's
                         after ln_post                           last_hidden_state (CLS kept, no post-LN)
  param_layout           mmtrain                                 idefics: the published checkpoints'
                                                                 parameter names (see model.py)

The IDEFICS pieces are transformers' own IDEFICS modules; the decoupled embedding / LM head for
added tokens is the same in every flavour.
"""

from __future__ import annotations

import copy
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

# Gated cross-attention blocks and perceivers: OpenFlamingo's (mmtrain.models.flamingo.blocks) or
# IDEFICS' (transformers' IdeficsGatedCrossAttentionLayer / IdeficsPerceiverResampler).
CROSS_ATTN_STYLES = ("openflamingo", "idefics")
PERCEIVER_STYLES = ("openflamingo", "idefics")

# Vision towers and the features each gives (see VisionConfig.tower).
VISION_TOWERS = ("open_clip", "idefics_clip")

# Where each part of the model sits in the module tree (its parameter-name prefix), per layout.
# `idefics` is the layout of the published IDEFICS checkpoints (HuggingFaceM4/idefics-9b, -80b and
# transformers' IdeficsForVisionText2Text): their weights load by name, without renaming.
# The LM head is `lm_head` in every layout.
PARAM_LAYOUTS: Dict[str, Dict[str, str]] = {
    "mmtrain": {
        "decoder": "decoder",
        "vision_encoder": "vision_encoder",
        "perceiver": "perceiver",
        "gated_cross_attn_layers": "gated_cross_attn_layers",
    },
    "idefics": {
        "decoder": "model",
        "vision_encoder": "model.vision_model",
        "perceiver": "model.perceiver_resampler",
        "gated_cross_attn_layers": "model.gated_cross_attn_layers",
    },
}

# Keys the model reads from the tokenizer's TokenIds (mmtrain.data.tokenizer); others are stored as given.
REQUIRED_TOKEN_IDS = ("image", "base_vocab_size", "num_added_tokens")


@dataclass
class VisionConfig:
    """The ViT whose tokens are the media features (`tower` says which ViT and which tokens)."""

    tower: str = "open_clip"
    """One of VISION_TOWERS. open_clip: open_clip's VisionTransformer, its patch tokens (CLS dropped,
    after ln_post), as OpenFlamingo. idefics_clip: transformers' IdeficsVisionTransformer (HF CLIP
    layout), its last_hidden_state (CLS kept, no post-LayerNorm: 257 tokens at 224/14), as IDEFICS."""

    image_size_px: int = 224
    patch_size_px: int = 14
    width: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    pos_embed_type: str = "learnable"
    """open_clip position embedding: learnable (CLIP) or sin_cos_2d (fixed, full strength: a random
    frozen tower then still tells positions apart, which tiny flavours need). idefics_clip: learnable."""
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
    """Feed-forward width / vision width (IDEFICS' perceiver fixes it at 4)."""
    style: str = "openflamingo"
    """One of PERCEIVER_STYLES."""
    qk_norms: bool = False
    """LayerNorm(head_dim) on the per-head queries and keys (idefics style only)."""


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
    cross_attn_style: str = "openflamingo"
    """One of CROSS_ATTN_STYLES. idefics: heads x head_dim must equal decoder.hidden_size, and the
    block's SwiGLU MLP is decoder-sized (decoder.intermediate_size; cross_attn_ff_mult is unused)."""
    cross_attn_qk_norms: bool = False
    """RMSNorm(head_dim) on the per-head queries and keys of cross-attention (idefics style only)."""
    cross_attn_num_heads: int = 8
    cross_attn_head_dim: int = 64
    cross_attn_ff_mult: int = 4
    param_layout: str = "mmtrain"
    """One of PARAM_LAYOUTS: the parameter names."""
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
        choices = (
            ("vision.tower", self.vision.tower, VISION_TOWERS),
            ("perceiver.style", self.perceiver.style, PERCEIVER_STYLES),
            ("cross_attn_style", self.cross_attn_style, CROSS_ATTN_STYLES),
            ("param_layout", self.param_layout, tuple(PARAM_LAYOUTS)),
        )
        for name, value, allowed in choices:
            if value not in allowed:
                raise ValueError(f"{name}: {value!r} is not one of {list(allowed)}")
        if self.vision.tower == "idefics_clip" and self.vision.pos_embed_type != "learnable":
            raise ValueError("vision.pos_embed_type: the idefics_clip tower has learnable position embeddings only")
        if self.perceiver.qk_norms and self.perceiver.style != "idefics":
            raise ValueError("perceiver.qk_norms: only the idefics perceiver style has q/k norms")
        if self.perceiver.style == "idefics" and self.perceiver.ff_mult != 4:
            raise ValueError(f"perceiver.ff_mult: the idefics perceiver's MLP is 4x wide, got {self.perceiver.ff_mult}")
        if self.cross_attn_qk_norms and self.cross_attn_style != "idefics":
            raise ValueError("cross_attn_qk_norms: only the idefics cross-attention style has q/k norms")
        if self.cross_attn_style == "idefics" and (
            self.cross_attn_num_heads * self.cross_attn_head_dim != self.decoder.hidden_size
        ):
            raise ValueError(
                f"cross_attn_num_heads x cross_attn_head_dim: the idefics style needs {self.cross_attn_num_heads} x "
                f"{self.cross_attn_head_dim} == decoder.hidden_size {self.decoder.hidden_size}"
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


def _idefics(decoder: DecoderConfig, vision: VisionConfig, perceiver: PerceiverConfig, every_n: int) -> FlamingoConfig:
    """An IDEFICS architecture: every IDEFICS-specific field set, sizes from the arguments."""
    heads = decoder.num_attention_heads
    return FlamingoConfig(
        vision=copy.deepcopy(vision),
        perceiver=copy.deepcopy(perceiver),
        decoder=decoder,
        cross_attn_every_n_layers=every_n,
        cross_attn_placement="before_i%n",
        cross_attn_style="idefics",
        cross_attn_qk_norms=True,
        cross_attn_num_heads=heads,
        cross_attn_head_dim=decoder.hidden_size // heads,
        param_layout="idefics",
    )


# IDEFICS' vision tower and perceiver (HuggingFaceM4/idefics-9b and -80b config.json): the ViT-H/14 of
# laion/CLIP-ViT-H-14-laion2B-s32B-b79K (GELU), 64 latents from a 6-deep perceiver with q/k norms.
_IDEFICS_VISION = VisionConfig(
    tower="idefics_clip", image_size_px=224, patch_size_px=14, width=1280, num_layers=32, num_heads=16, quick_gelu=False
)
_IDEFICS_PERCEIVER = PerceiverConfig(num_latents=64, depth=6, num_heads=16, head_dim=96, style="idefics", qk_norms=True)

# HuggingFaceM4/idefics-9b: LLaMA-7B, a gated block before every 4th layer (0, 4, ..., 28).
IDEFICS_9B = _idefics(
    DecoderConfig(
        hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
        intermediate_size=11008, rms_norm_eps=1e-6,
    ),
    _IDEFICS_VISION,
    _IDEFICS_PERCEIVER,
    every_n=4,
)

# HuggingFaceM4/idefics-80b: LLaMA-65B, same tower and perceiver.
IDEFICS_80B = _idefics(
    DecoderConfig(
        hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=64,
        intermediate_size=22016, rms_norm_eps=1e-5,
    ),
    _IDEFICS_VISION,
    _IDEFICS_PERCEIVER,
    every_n=4,
)

IDEFICS_TINY = _idefics(
    DecoderConfig(
        hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
        intermediate_size=128, rms_norm_eps=1e-6,
    ),
    VisionConfig(tower="idefics_clip", image_size_px=30, patch_size_px=10, width=32, num_layers=2, num_heads=4, quick_gelu=False),
    PerceiverConfig(num_latents=4, depth=2, num_heads=2, head_dim=16, style="idefics", qk_norms=True),
    every_n=2,
)
