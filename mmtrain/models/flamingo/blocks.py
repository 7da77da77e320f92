"""The Flamingo pieces the field's libraries lack: perceiver resampler, media mask, gated
cross-attention, and IDEFICS-style decoupled embedding / LM head for added tokens.

Shapes: B batch, T text tokens, N image slots, P patches per image, L latents per image,
H heads, D head dim. Attention goes through `F.scaled_dot_product_attention`, or FlexAttention for
the cross-attention when the model's `cross_attn_implementation` asks for it (mmtrain.models.flex).
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from mmtrain.models.flex import FLEX, flex_attention, is_block_mask, media_block_mask


def _split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, S, H*D] → [B, H, S, D]."""
    batch, seq, _ = x.shape
    return x.view(batch, seq, num_heads, -1).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, H, S, D] → [B, S, H*D]."""
    batch, heads, seq, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, seq, heads * head_dim)


class FeedForward(nn.Module):
    """Pre-LayerNorm GELU MLP without biases (Flamingo's FF in the perceiver and the gated blocks)."""

    def __init__(self, dim: int, mult: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc_in = nn.Linear(dim, dim * mult, bias=False)
        self.act = nn.GELU()
        self.fc_out = nn.Linear(dim * mult, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(self.act(self.fc_in(self.norm(x))))


class PerceiverAttention(nn.Module):
    """Latents attend over concat(media, latents); both inputs are LayerNormed first."""

    def __init__(self, dim: int, num_heads: int, head_dim: int):
        super().__init__()
        self.num_heads = num_heads
        inner = num_heads * head_dim
        self.media_norm = nn.LayerNorm(dim)
        self.latents_norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        media = self.media_norm(media)
        latents = self.latents_norm(latents)
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([media, latents], dim=1)).chunk(2, dim=-1)
        out = F.scaled_dot_product_attention(
            _split_heads(q, self.num_heads), _split_heads(k, self.num_heads), _split_heads(v, self.num_heads)
        )
        return self.to_out(_merge_heads(out))


class PerceiverBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, head_dim: int, ff_mult: int):
        super().__init__()
        self.attn = PerceiverAttention(dim, num_heads, head_dim)
        self.ff = FeedForward(dim, ff_mult)

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        latents = latents + self.attn(media, latents)
        return latents + self.ff(latents)


class PerceiverResampler(nn.Module):
    """[B, N, P, d] patch features → [B, N, L, d] latents; every image is resampled on its own."""

    def __init__(self, dim: int, num_latents: int, depth: int, num_heads: int, head_dim: int, ff_mult: int):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, dim))
        self.blocks = nn.ModuleList([PerceiverBlock(dim, num_heads, head_dim, ff_mult) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)

    def forward(self, media: torch.Tensor) -> torch.Tensor:
        batch, num_images, num_patches, dim = media.shape
        media = media.reshape(batch * num_images, num_patches, dim)
        latents = self.latents.unsqueeze(0).expand(batch * num_images, -1, -1)
        for block in self.blocks:
            latents = block(media, latents)
        return self.norm(latents).reshape(batch, num_images, -1, dim)


def document_starts(position_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: where a packed document (or the padding after the last one) begins.

    The data path restarts `position_ids` at 0 for every document it packs into a row, so the
    positions alone carry the boundaries (the same rule transformers' masks use for packed rows).
    """
    return position_ids == 0


def media_image_index(
    input_ids: torch.Tensor,
    image_token_id: int,
    num_images: int,
    position_ids: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """[B, T] long: the image slot (0..N-1) each text token attends to, -1 for none.

    Token t sees only image number text_time[t] = #`<image>` tokens at positions <= t (1-based),
    so the `<image>` token itself and everything up to the next `<image>` see that image. With
    packed rows (`position_ids` restarting at 0 per document) a token sees an image only if it
    belongs to its own document: the text before a document's first `<image>` sees none (the
    image mask resets at each document start, as IDEFICS resets it at EOS). A count beyond the N
    slots sees none either.
    """
    is_image = input_ids == image_token_id
    text_time = torch.cumsum(is_image, dim=1)
    sees = (text_time >= 1) & (text_time <= num_images)
    if position_ids is not None:
        # Images before the token's document began: the count just before each document start,
        # carried forward (counts only grow along a row, so a running max carries it).
        before_start = torch.where(document_starts(position_ids), text_time - is_image.long(), 0)
        sees &= text_time > torch.cummax(before_start, dim=1).values
    return torch.where(sees, text_time - 1, -1)


def media_attention_mask(
    input_ids: torch.Tensor,
    image_token_id: int,
    num_images: int,
    num_latents: int,
    position_ids: Optional[torch.Tensor] = None,
    kernel: str = "sdpa",
) -> Tuple[Any, torch.Tensor]:
    """Which media latents each text token may attend to (:func:`media_image_index`), in the form
    the cross-attention kernel takes, and `has_media` [B, T, 1] bool.

    kernel "flex_attention": a BlockMask (mmtrain.models.flex), no dense mask. Otherwise a dense
    bool mask [B, 1, T, N*L]; rows of tokens that see no image allow every key there, because an
    all-False row makes SDPA return NaN. Either way their output must be multiplied by `has_media`.
    """
    token_image = media_image_index(input_ids, image_token_id, num_images, position_ids)
    has_media = (token_image >= 0).unsqueeze(-1)
    if kernel == FLEX:
        return media_block_mask(token_image, num_latents, num_images), has_media
    sees_image = token_image.unsqueeze(-1) == torch.arange(num_images, device=input_ids.device)  # [B, T, N]
    mask = sees_image.repeat_interleave(num_latents, dim=-1) | ~has_media
    return mask.unsqueeze(1), has_media


class MaskedCrossAttention(nn.Module):
    """Text queries (pre-LayerNorm) over media latents, restricted by :func:`media_attention_mask`."""

    def __init__(self, dim_text: int, dim_media: int, num_heads: int, head_dim: int):
        super().__init__()
        self.num_heads = num_heads
        inner = num_heads * head_dim
        self.norm = nn.LayerNorm(dim_text)
        self.to_q = nn.Linear(dim_text, inner, bias=False)
        self.to_kv = nn.Linear(dim_media, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim_text, bias=False)

    def forward(
        self, x: torch.Tensor, media: torch.Tensor, media_mask: torch.Tensor, has_media: torch.Tensor
    ) -> torch.Tensor:
        q = self.to_q(self.norm(x))
        k, v = self.to_kv(media).chunk(2, dim=-1)
        q, k, v = (_split_heads(t, self.num_heads) for t in (q, k, v))
        if is_block_mask(media_mask):
            out = flex_attention(q, k, v, block_mask=media_mask)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=media_mask)
        # Multiplying (instead of indexing) keeps the graph identical for text-only batches, so every
        # ZeRO-3 rank runs the same modules, and makes tokens without an image contribute exactly zero.
        return self.to_out(_merge_heads(out)) * has_media.to(x.dtype)


class GatedCrossAttentionBlock(nn.Module):
    """x + tanh(attn_gate)·xattn(x), then + tanh(ff_gate)·ff(x); gates start at 0 so a fresh
    block leaves the pretrained decoder's function unchanged."""

    def __init__(self, dim_text: int, dim_media: int, num_heads: int, head_dim: int, ff_mult: int):
        super().__init__()
        self.attn = MaskedCrossAttention(dim_text, dim_media, num_heads, head_dim)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ff = FeedForward(dim_text, ff_mult)
        self.ff_gate = nn.Parameter(torch.zeros(1))

    def forward(
        self, x: torch.Tensor, media: torch.Tensor, media_mask: torch.Tensor, has_media: torch.Tensor
    ) -> torch.Tensor:
        x = x + self.attn_gate.tanh() * self.attn(x, media, media_mask, has_media)
        return x + self.ff_gate.tanh() * self.ff(x)


class TiedEmbedding(nn.Embedding):
    """nn.Embedding that is also its tied output projection: `forward(hidden, unembed=True)` = hidden @ weight^T.

    Through `forward`, not a direct read of `weight`: under ZeRO-3 a module's parameters are gathered
    only for its own calls.
    """

    def forward(self, x: torch.Tensor, unembed: bool = False) -> torch.Tensor:
        return F.linear(x, self.weight) if unembed else super().forward(x)


class DecoupledEmbedding(TiedEmbedding):
    """Base table (`weight`, ids < base vocab) plus `additional_embedding` for added tokens.

    Keeping the added rows in their own parameter lets them train while the base table is
    frozen, without masking gradient rows (which ZeRO-3's partitioned grads cannot do).
    With tied embeddings (MPT) it is the LM head too: `forward(hidden, unembed=True)` gives the
    logits of the base tokens then the added ones, as one tied table holding both would.
    """

    def __init__(self, base_vocab_size: int, num_added_tokens: int, dim: int, init_std: float):
        # Initialised inside __init__ (via _weight) so that DeepSpeed zero.Init, which partitions
        # parameters when a module's __init__ returns, sees the final values.
        super().__init__(base_vocab_size, dim, _weight=torch.randn(base_vocab_size, dim) * init_std)
        self.additional_embedding = TiedEmbedding(
            num_added_tokens, dim, _weight=torch.randn(num_added_tokens, dim) * init_std
        )

    def forward(self, x: torch.Tensor, unembed: bool = False) -> torch.Tensor:
        if unembed:
            return torch.cat([F.linear(x, self.weight), self.additional_embedding(x, unembed=True)], dim=-1)
        is_added = x >= self.num_embeddings
        base = F.embedding(x.masked_fill(is_added, 0), self.weight)
        added = self.additional_embedding((x - self.num_embeddings).clamp(min=0))
        return torch.where(is_added.unsqueeze(-1), added, base)


class DecoupledLinear(nn.Linear):
    """LM head: base logits from `weight`, added-token logits from `additional_fc`, concatenated."""

    def __init__(self, in_features: int, base_vocab_size: int, num_added_tokens: int):
        super().__init__(in_features, base_vocab_size, bias=False)
        self.additional_fc = nn.Linear(in_features, num_added_tokens, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([F.linear(x, self.weight), self.additional_fc(x)], dim=-1)
