"""Configuration of the Flamingo family (Otter, OpenFlamingo, IDEFICS) and its flavours.

Plain dataclasses without torch, so a config can be read, overridden and checked on its own.

The sections mirror the model's parameter groups: `vision` (ViT), `perceiver`, the `cross_attn_*`
fields (gated cross-attention blocks) and `decoder` (transformers' LLaMA or MPT, `decoder.kind`;
field names as in `LlamaConfig`). The vocabulary sizes are left empty in a flavour and filled from
the tokenizer's token ids at build time (:func:`bind_token_ids`).

What tells the flavours apart is a field each, never the flavour's name:

  field                  OpenFlamingo / Otter (default)          IDEFICS
  cross_attn_placement   before_(i+1)%n                          before_i%n
  cross_attn_style       openflamingo: LayerNorm-pre, to_q/to_kv, idefics: RMSNorm-pre, q/k/v/o_proj,
                         GELU FF of dim*ff_mult, attn/ff_gate    SwiGLU MLP of the decoder's size,
                                                                 alpha_cross_attn/alpha_dense
  cross_attn_qk_norms    False                                   True: RMSNorm(head_dim) on q and k
  perceiver.style        openflamingo                            idefics (`ln, fc, c_proj` ReLU MLP)
  perceiver.qk_norms     False                                   True: LayerNorm(head_dim) on q and k
  vision.tower           open_clip: patch tokens, CLS dropped     idefics_clip: IdeficsVisionTransformer's
                         (Otter: hf_clip, HF CLIPVisionModel's    last_hidden_state (CLS kept, no post-LN)
                         last_hidden_state[:, 1:])
  param_layout           mmtrain                                 idefics: the published checkpoints'
                                                                 parameter names (see model.py)

and, among the OpenFlamingo / Otter releases, `decoder.kind` (llama: LLaMA-7B, rotary positions,
separate LM head; mpt: MPT-7B, ALiBi, LayerNorm without biases, LM head tied to the embedding).

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
VISION_TOWERS = ("open_clip", "idefics_clip", "hf_clip")

# Language decoders (transformers' LlamaModel / MptModel; see decoders.py).
DECODER_KINDS = ("llama", "mpt")
# Self-attention kernels per decoder kind (transformers' names). LLaMA: transformers' own; MPT:
# transformers' eager, or mmtrain's SDPA / FlexAttention forward over the same weights (decoders.py).
DECODER_KERNELS = {
    "llama": ("sdpa", "eager", "flash_attention_2", "flex_attention"),
    "mpt": ("eager", "sdpa", "flex_attention"),
}
CROSS_ATTN_KERNELS = ("sdpa", "flex_attention")

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
    """One of VISION_TOWERS. open_clip: open_clip's VisionTransformer, its patch tokens (CLS dropped),
    as OpenFlamingo. idefics_clip: transformers' IdeficsVisionTransformer (HF CLIP layout), its
    last_hidden_state (CLS kept, no post-LayerNorm: 257 tokens at 224/14), as IDEFICS. hf_clip:
    transformers' CLIPVisionModel, last_hidden_state[:, 1:] (CLS dropped, no post-LayerNorm: 256
    tokens at 224/14), as Otter."""

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
    final_ln_after_pool: bool = False
    """open_clip tower only (open_clip's own switch): True leaves the patch tokens without `ln_post`
    (it normalises the pooled CLS token only). The open_clip releases OpenFlamingo trained with
    (2.16-2.2x) did exactly that, so its released perceivers expect un-normalised tokens; today's
    open_clip default (False) normalises every token. True gives the same tokens as Otter's
    HF-CLIP `last_hidden_state[:, 1:]`."""
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
    """The language decoder (vocab size comes from the token ids). Field names as in transformers'
    LlamaConfig; for `kind: mpt` they become MptConfig's d_model, n_heads, n_layers and max_seq_len."""

    kind: str = "llama"
    """One of DECODER_KINDS: llama (LlamaModel: RMSNorm, rotary positions) or mpt (MptModel: MPT-7B's
    bias-free LayerNorms, ALiBi, GELU MLP of 4 x hidden_size; eager is transformers' MPT attention,
    sdpa and flex_attention are mmtrain's, with the same weights: decoders.py)."""
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
    layer_norm_eps: float = 1e-5
    """mpt: epsilon of its LayerNorms (llama uses rms_norm_eps)."""
    alibi_bias_max: int = 8
    """mpt: ALiBi slopes are 2^(-alibi_bias_max * h / heads)."""
    tie_word_embeddings: bool = False
    """The LM head is the token embedding (MPT): logits = hidden @ [base table; added-token table]^T,
    as OpenFlamingo's resized, tied MPT embedding. No `lm_head` parameters then."""


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
    cross_attn_implementation: str = "sdpa"
    """Kernel of the gated cross-attention, one of CROSS_ATTN_KERNELS: sdpa with a dense bool mask
    [B, 1, T, N*L], or flex_attention with a BlockMask (CUDA only for training; mmtrain.models.flex).
    The engine sets it from the recipe's `model.cross_attention`."""
    param_layout: str = "mmtrain"
    """One of PARAM_LAYOUTS: the parameter names."""
    base_vocab_size: Optional[int] = None
    """Rows of the base embedding table and lm_head; None in a flavour, filled from the token ids."""
    num_added_tokens: Optional[int] = None
    """Rows of the decoupled (always trainable) tables for added tokens; filled from the token ids."""
    published_vocab_size: Optional[int] = None
    """Informational: len() of the published checkpoint's tokenizer (base + added tokens), i.e. the
    vocabulary the model gets when built for it; what a parameter count without a tokenizer should
    use. Never used to build."""

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
            ("decoder.kind", self.decoder.kind, DECODER_KINDS),
            ("vision.tower", self.vision.tower, VISION_TOWERS),
            ("perceiver.style", self.perceiver.style, PERCEIVER_STYLES),
            ("cross_attn_style", self.cross_attn_style, CROSS_ATTN_STYLES),
            ("cross_attn_implementation", self.cross_attn_implementation, CROSS_ATTN_KERNELS),
            ("decoder.attn_implementation", self.decoder.attn_implementation, DECODER_KERNELS.get(self.decoder.kind, ())),
            ("param_layout", self.param_layout, tuple(PARAM_LAYOUTS)),
        )
        for name, value, allowed in choices:
            if value not in allowed:
                raise ValueError(f"{name}: {value!r} is not one of {list(allowed)}")
        if self.vision.tower != "open_clip" and self.vision.pos_embed_type != "learnable":
            raise ValueError(
                f"vision.pos_embed_type: the {self.vision.tower} tower has learnable position embeddings only"
            )
        if self.vision.tower != "open_clip" and self.vision.final_ln_after_pool:
            raise ValueError(f"vision.final_ln_after_pool: an open_clip switch; the {self.vision.tower} tower has none")
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
        dec = self.decoder
        if dec.num_attention_heads % dec.num_key_value_heads:
            raise ValueError("decoder.num_key_value_heads: must divide decoder.num_attention_heads")
        if dec.kind == "mpt":
            if dec.num_key_value_heads != dec.num_attention_heads:
                raise ValueError(
                    "decoder.num_key_value_heads: MPT has no grouped-query attention; set it to num_attention_heads"
                )
            if dec.intermediate_size != 4 * dec.hidden_size:
                raise ValueError(
                    f"decoder.intermediate_size: transformers' MPT MLP is 4 x hidden_size = {4 * dec.hidden_size}, "
                    f"got {dec.intermediate_size}"
                )
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


def _idefics(
    decoder: DecoderConfig,
    vision: VisionConfig,
    perceiver: PerceiverConfig,
    every_n: int,
    published_vocab_size: Optional[int] = None,
) -> FlamingoConfig:
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
        published_vocab_size=published_vocab_size,
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
    published_vocab_size=32002,  # LLaMA's 32000 + <fake_token_around_image>, <image>
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
    published_vocab_size=32002,
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


# --- OpenFlamingo and Otter releases -------------------------------------------------------------
# Every one: CLIP ViT-L/14 (OpenAI weights: QuickGELU, 256 patch tokens at 224 px, no CLS), a perceiver
# of depth 6 with 64 latents (8 heads x 64), gated blocks of 8 heads x 64 with a 4x GELU FF before
# decoder layers 3, 7, ..., 31 (OpenFlamingo's `(i+1) % 4 == 0`), 7B decoder. The defaults of the
# dataclasses above are these sizes; what differs is the decoder kind, the tower and the vocabulary.

# OpenFlamingo: open_clip's ViT-L-14 `visual` (`openai` weights), tokens as the open_clip releases it
# trained with gave them (before ln_post; see VisionConfig.final_ln_after_pool).
_OPENFLAMINGO_VISION = VisionConfig(tower="open_clip", final_ln_after_pool=True)
# Otter: transformers' CLIPVisionModel (openai/clip-vit-large-patch14), last_hidden_state[:, 1:] — the
# same tokens as above computed by another library, so Otter's checkpoints load by renaming alone.
_OTTER_VISION = VisionConfig(tower="hf_clip")

# mosaicml/mpt-7b config.json: d_model 4096, n_heads 32, n_layers 32, expansion_ratio 4, max_seq_len 2048,
# ALiBi (alibi_bias_max 8), no_bias (no biases, LayerNorms without bias, eps 1e-5), tied embeddings,
# vocab_size 50432 (the GPT-NeoX tokenizer's 50277 tokens, padded).
_MPT_7B = DecoderConfig(
    kind="mpt", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
    intermediate_size=16384, max_position_embeddings=2048, layer_norm_eps=1e-5, alibi_bias_max=8,
    tie_word_embeddings=True,
)
# LLaMA-7B (HF conversion): the DecoderConfig defaults.
_LLAMA_7B = DecoderConfig()

# openflamingo/OpenFlamingo-9B-vitl-mpt7b (v2): `create_model_and_transforms("ViT-L-14", "openai",
# "anas-awadalla/mpt-7b", ..., cross_attn_every_n_layers=4)`; the embedding is resized to the
# tokenizer: 50277 + <|endofchunk|>, <image>, <PAD> = 50280 rows.
OPENFLAMINGO_9B = FlamingoConfig(
    vision=_OPENFLAMINGO_VISION, decoder=_MPT_7B, cross_attn_every_n_layers=4, published_vocab_size=50280
)
# openflamingo/OpenFlamingo-9B-deprecated (v1): the same with LLaMA-7B; 32000 + 3 added tokens.
# One behaviour differs from v1's code (open-flamingo 0.0.2): unless trained with media placement
# augmentation, v1 let text after an image attend to the *next* image (`attend_previous=False`);
# this flavour uses v2's rule (the latest preceding image), as Otter forces for the same weights.
OPENFLAMINGO_9B_LLAMA = FlamingoConfig(
    vision=copy.deepcopy(_OPENFLAMINGO_VISION), decoder=_LLAMA_7B, cross_attn_every_n_layers=4,
    published_vocab_size=32003,
)
# luodian/OTTER-9B-LA-InContext (and the other OTTER-9B releases): LLaMA-7B initialised from
# OpenFlamingo-9B v1, HF CLIP tower; 32000 + <|endofchunk|>, <image>, <answer>, <PAD> = 32004 rows.
OTTER_9B = FlamingoConfig(
    vision=_OTTER_VISION, decoder=copy.deepcopy(_LLAMA_7B), cross_attn_every_n_layers=4, published_vocab_size=32004
)
# luodian/OTTER-Image-MPT7B: MPT-7B, HF CLIP tower. Otter does not resize MPT's embedding: its table
# keeps 50432 rows, of which the tokenizer uses 50277 + 4 added = 50281 (the model gets those).
OTTER_9B_MPT = FlamingoConfig(
    vision=copy.deepcopy(_OTTER_VISION), decoder=copy.deepcopy(_MPT_7B), cross_attn_every_n_layers=4,
    published_vocab_size=50281,
)

# OpenFlamingo-9B's layout (MPT, open_clip tokens before ln_post) at toy size.
OPENFLAMINGO_TINY_MPT = FlamingoConfig(
    vision=VisionConfig(
        image_size_px=32, patch_size_px=4, width=64, num_layers=2, num_heads=4, pos_embed_type="sin_cos_2d",
        quick_gelu=False, final_ln_after_pool=True,
    ),
    perceiver=PerceiverConfig(num_latents=8, depth=1, num_heads=4, head_dim=16, ff_mult=4),
    decoder=DecoderConfig(
        kind="mpt", hidden_size=96, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
        intermediate_size=384, max_position_embeddings=2048, tie_word_embeddings=True,
    ),
    cross_attn_every_n_layers=2,
    cross_attn_num_heads=4,
    cross_attn_head_dim=16,
    cross_attn_ff_mult=4,
)
