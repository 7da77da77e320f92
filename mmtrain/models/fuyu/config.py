"""Configuration of the Fuyu family (Fuyu-8B, OtterHD-8B) and its flavours.

Plain dataclasses without torch, so a config can be read, overridden and checked on its own.

Fuyu has no vision tower: 30x30x3 pixel patches are flattened and projected by one Linear
(`vision` group) into a Persimmon decoder (`decoder` section, field names as in transformers'
`PersimmonConfig`). The vocabulary size is fixed by a published checkpoint (262144 for Fuyu-8B);
a tiny flavour leaves it empty and takes it from the tokenizer's token ids (:func:`bind_token_ids`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

FAMILY = "fuyu"

# The model's parameter groups (what a recipe's `model.trainable` lists). OtterHD trains all three.
# `embeddings` holds the two 262144-row tables (input embedding, LM head): 2.1B of Fuyu-8B's 9.4B
# parameters, worth freezing on their own when optimizer memory is short.
PARAM_GROUPS = ("vision", "embeddings", "decoder")

# Attention kernels that honour the block-diagonal mask of packed rows (segment_ids); flex_attention
# takes it as a BlockMask (mmtrain.models.flex). Flash attention through transformers' mask interface
# would silently drop it, so it is refused here.
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention")

# Keys the model reads from the tokenizer's TokenIds (mmtrain.data.tokenizer); others are stored as given.
REQUIRED_TOKEN_IDS = ("base_vocab_size", "num_added_tokens")

# Fuyu's image processor: rescale by 1/255, then normalise with mean 0.5 and std 0.5 (to [-1, 1]).
FUYU_MEAN = (0.5, 0.5, 0.5)
FUYU_STD = (0.5, 0.5, 0.5)


@dataclass
class DecoderConfig:
    """transformers PersimmonConfig fields of the decoder; defaults are Fuyu-8B's."""

    hidden_size: int = 4096
    num_hidden_layers: int = 36
    num_attention_heads: int = 64
    intermediate_size: int = 16384
    hidden_act: str = "relu2"
    """Squared ReLU."""
    layer_norm_eps: float = 1e-5
    qk_layernorm: bool = True
    """LayerNorm(head_dim) on queries and keys, before RoPE (pretrained weights need it)."""
    rope_theta: float = 25000.0
    partial_rotary_factor: float = 0.5
    """Share of each head's dims that RoPE rotates (the first half; the rest pass through)."""
    max_position_embeddings: int = 16384
    initializer_range: float = 0.02
    attn_implementation: str = "sdpa"
    """One of ATTN_IMPLEMENTATIONS."""


@dataclass
class FuyuConfig:
    """A whole Fuyu model: patch projection, Persimmon decoder, untied LM head."""

    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    patch_size_px: int = 30
    num_channels: int = 3
    mean: List[float] = field(default_factory=lambda: list(FUYU_MEAN))
    std: List[float] = field(default_factory=lambda: list(FUYU_STD))
    vocab_size: Optional[int] = None
    """Rows of the embedding table and LM head; None in a tiny flavour, filled from the token ids."""

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch (2700 for 30x30 RGB)."""
        return self.patch_size_px * self.patch_size_px * self.num_channels

    def check(self) -> None:
        """Raise ValueError naming the field when the configuration cannot build a model."""
        dec = self.decoder
        if dec.hidden_size % dec.num_attention_heads:
            raise ValueError(
                f"decoder.num_attention_heads: {dec.num_attention_heads} does not divide "
                f"decoder.hidden_size {dec.hidden_size}"
            )
        rotary_dims = dec.hidden_size // dec.num_attention_heads * dec.partial_rotary_factor
        if not 0 < dec.partial_rotary_factor <= 1 or rotary_dims != int(rotary_dims) or int(rotary_dims) % 2:
            raise ValueError(
                f"decoder.partial_rotary_factor: {dec.partial_rotary_factor} must pick an even number of "
                f"each head's {dec.hidden_size // dec.num_attention_heads} dims"
            )
        if dec.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(
                f"decoder.attn_implementation: {dec.attn_implementation!r} is not one of {list(ATTN_IMPLEMENTATIONS)}"
            )
        if self.patch_size_px < 1 or self.num_channels < 1:
            raise ValueError(f"patch_size_px and num_channels: must be >= 1, got {self.patch_size_px}, {self.num_channels}")
        if len(self.mean) != self.num_channels or len(self.std) != self.num_channels or min(self.std) <= 0:
            raise ValueError(f"mean, std: need {self.num_channels} values each (std > 0), got {self.mean}, {self.std}")
        if self.vocab_size is None or self.vocab_size < 1:
            raise ValueError(f"vocab_size: must be a positive int (filled from the token ids), got {self.vocab_size!r}")


def bind_token_ids(config: FuyuConfig, token_ids: Mapping[str, Any]) -> FuyuConfig:
    """Return `config` with its vocabulary size filled from the tokenizer's token ids if it is empty.

    A flavour with a published vocabulary keeps it; the tokenizer must then fit inside it (a larger
    tokenizer means the checkpoint and the tokenizer do not belong together).
    """
    missing = [key for key in REQUIRED_TOKEN_IDS if key not in token_ids]
    if missing:
        raise ValueError(f"token_ids: missing {missing}; expected the fields of mmtrain.data.tokenizer.TokenIds")
    tokenizer_vocab = int(token_ids["base_vocab_size"]) + int(token_ids["num_added_tokens"])
    if config.vocab_size is None:
        return dataclasses.replace(config, vocab_size=tokenizer_vocab)
    if tokenizer_vocab > config.vocab_size:
        raise ValueError(
            f"vocab_size: the model has {config.vocab_size} rows but the tokenizer has {tokenizer_vocab} ids"
        )
    return config


def image_spec(config: FuyuConfig) -> Dict[str, Any]:
    """What the data pipeline must cut images into: raw uint8 patches, flattened like Fuyu's processor.

    `layout: patches` means no resize to a square: the image is scaled within the recipe's
    resolution bounds (aspect kept), padded at the bottom and right to whole patches with pixel 255
    (Fuyu's 1.0), and cut into `patch_px` squares in row-major order. Each patch is flattened in
    (row, column, channel) order, i.e. from an HWC uint8 array
    `img.reshape(H/p, p, W/p, p, C).transpose(0, 2, 1, 3, 4).reshape(-1, p*p*C)`: the order of
    transformers' FuyuImageProcessor.patchify_image. The token stream holds, per patch row, one
    image placeholder per patch and then one newline token, all before the BOS token.
    `mean`/`std` travel with the spec but are applied by the model on its device.
    """
    return {
        "layout": "patches",
        "patch_px": config.patch_size_px,
        "patch_dim": config.patch_dim,
        "mean": list(config.mean),
        "std": list(config.std),
    }


# Fuyu-8B's published architecture (adept/fuyu-8b config.json): the DecoderConfig defaults.
FUYU_8B = FuyuConfig(decoder=DecoderConfig(), vocab_size=262144)

# OtterHD-8B is Fuyu-8B fine-tuned in full: the same architecture and parameter names.
OTTERHD_8B = FuyuConfig(decoder=DecoderConfig(), vocab_size=262144)

FUYU_TINY = FuyuConfig(
    decoder=DecoderConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=4096,
    ),
)
