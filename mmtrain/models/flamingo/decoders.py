"""The language decoders FlamingoForCausalLM runs its own layer loop over, one adapter per `decoder.kind`.

The decoder is transformers' own base model, built without its initialisation (left to the
model's `deferred_init`) and with its token embedding swapped for the decoupled one. An adapter
says where its parts are and how one layer is called:

  kind   module     in *ForCausalLM  embedding     layers    final norm  per-layer inputs
  llama  LlamaModel model.            embed_tokens  layers.N  norm        rotary (cos, sin) + causal mask
  mpt    MptModel   transformer.      wte           blocks.N  norm_f      ALiBi bias + causal mask (bool, True = masked)

Packed rows (`position_ids` restarting at 0 per document) keep documents apart in both: the causal
mask comes from transformers' `create_causal_mask`, which reads the document boundaries from the
positions and makes it block-diagonal (a BlockMask for flex_attention, mmtrain.models.flex). MPT's
ALiBi bias needs no positions: eager adds slope x (key - T + 1), the SDPA and flex kernels slope x
(key - query); inside a row of the mask the two differ by a constant, which softmax ignores, so a
packed document is attended exactly as it would be alone.

transformers' MPT attention is eager only (scores materialised, fp32 softmax). With
`attn_implementation` sdpa or flex_attention each block's attention becomes a
:class:`MptKernelAttention`: the same module and weights, its scores computed by SDPA (ALiBi and the
mask as one additive bias) or by FlexAttention (ALiBi as a score_mod, the mask as a BlockMask).
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaModel, MptConfig, MptModel
from transformers.initialization import no_init_weights
from transformers.masking_utils import create_causal_mask
from transformers.models.mpt.modeling_mpt import MptAttention, build_mpt_alibi_tensor

from mmtrain.models.flamingo.config import DecoderConfig
from mmtrain.models.flex import FLEX, alibi_score_mod, flex_attention, is_block_mask
from mmtrain.models.rope import rotary_embeddings


def _causal_mask(decoder: nn.Module, hidden: torch.Tensor, position_ids: torch.Tensor):
    # None under SDPA for single-document rows (its is_causal path); with packed rows transformers
    # reads the boundaries from the restarting position_ids and builds a block-diagonal causal mask
    # (bool for SDPA, a BlockMask for flex, varlen boundaries for flash-attention). Eager always
    # gets an additive float mask.
    return create_causal_mask(
        config=decoder.config,
        inputs_embeds=hidden,
        attention_mask=None,
        past_key_values=None,
        position_ids=position_ids,
    )


class LlamaDecoder:
    embedding, layers, final_norm = "embed_tokens", "layers", "norm"
    causal_lm_prefix = "model"
    """Where LlamaForCausalLM holds this module (its checkpoints' key prefix; OpenFlamingo's `lang_encoder.model`)."""

    @staticmethod
    def build(config: DecoderConfig, vocab_size: int) -> nn.Module:
        with no_init_weights():
            return LlamaModel(
                LlamaConfig(
                    vocab_size=vocab_size,
                    hidden_size=config.hidden_size,
                    num_hidden_layers=config.num_hidden_layers,
                    num_attention_heads=config.num_attention_heads,
                    num_key_value_heads=config.num_key_value_heads,
                    intermediate_size=config.intermediate_size,
                    rms_norm_eps=config.rms_norm_eps,
                    max_position_embeddings=config.max_position_embeddings,
                    rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
                    initializer_range=config.initializer_range,
                    attn_implementation=config.attn_implementation,
                    tie_word_embeddings=False,
                    use_cache=False,
                )
            )

    @staticmethod
    def layer_inputs(decoder: nn.Module, hidden: torch.Tensor, position_ids: torch.Tensor) -> Dict[str, Any]:
        return {
            "attention_mask": _causal_mask(decoder, hidden, position_ids),
            "position_ids": position_ids,
            "position_embeddings": rotary_embeddings(decoder.rotary_emb, hidden, position_ids),
        }

    @staticmethod
    def layer_output(output: Any) -> torch.Tensor:
        return output


class MptKernelAttention(MptAttention):
    """transformers' MptAttention (same parameters) computed by SDPA or FlexAttention.

    Called as MptBlock calls its attention, with what `MptDecoder.layer_inputs` made for the kernel:
    SDPA gets `attention_mask` = the additive bias (ALiBi + mask, in the activation dtype), flex a
    BlockMask and `position_bias` = the per-head ALiBi slopes. Softmax scale as MPT's.
    """

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_bias: Optional[torch.Tensor],
        past_key_values: Any = None,
        attention_mask: Any = None,
        **kwargs: Any,
    ) -> Tuple[torch.Tensor, None]:
        if past_key_values is not None:
            raise NotImplementedError("mmtrain's MPT attention kernels train; they keep no KV cache")
        batch, seq_len = hidden_states.shape[:2]
        qkv = self.Wqkv(hidden_states)
        if self.clip_qkv:
            qkv = qkv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
        q, k, v = (t.view(batch, seq_len, self.n_heads, self.head_dim).transpose(1, 2) for t in qkv.chunk(3, dim=2))
        if is_block_mask(attention_mask):
            if self.attn_dropout_p:
                raise ValueError("decoder.attn_implementation flex_attention: MPT attention dropout is not supported")
            out = flex_attention(
                q, k, v, block_mask=attention_mask, score_mod=alibi_score_mod(position_bias), scale=self.softmax_scale
            )
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attention_mask, scale=self.softmax_scale,
                dropout_p=self.attn_dropout_p if self.training else 0.0,
            )
        return self.out_proj(out.transpose(1, 2).reshape(batch, seq_len, -1)), None


def _alibi_slopes(decoder: nn.Module, device: torch.device) -> torch.Tensor:
    """[H] fp32 ALiBi slopes, read off transformers' own bias: over 2 keys it is slope x [-1, 0]."""
    return -build_mpt_alibi_tensor(decoder.num_heads, 2, decoder.config.attn_config.alibi_bias_max, device=device)[:, 0, 0]


class MptDecoder:
    embedding, layers, final_norm = "wte", "blocks", "norm_f"
    causal_lm_prefix = "transformer"

    @staticmethod
    def build(config: DecoderConfig, vocab_size: int) -> nn.Module:
        with no_init_weights():
            decoder = MptModel(
                MptConfig(
                    vocab_size=vocab_size,
                    d_model=config.hidden_size,
                    n_layers=config.num_hidden_layers,
                    n_heads=config.num_attention_heads,
                    expansion_ratio=config.intermediate_size // config.hidden_size,
                    max_seq_len=config.max_position_embeddings,
                    layer_norm_epsilon=config.layer_norm_eps,
                    attn_config={"alibi": True, "alibi_bias_max": config.alibi_bias_max},
                    no_bias=True,
                    initializer_range=config.initializer_range,
                    tie_word_embeddings=config.tie_word_embeddings,
                    # transformers' MptAttention is eager only; see MptKernelAttention for the others.
                    attn_implementation="eager",
                    use_cache=False,
                )
            )
        if config.attn_implementation != "eager":
            # The mask format create_causal_mask builds follows this field; the modules keep their weights.
            decoder.config._attn_implementation = config.attn_implementation
            for block in decoder.blocks:
                block.attn.__class__ = MptKernelAttention
        return decoder

    @staticmethod
    def layer_inputs(decoder: nn.Module, hidden: torch.Tensor, position_ids: torch.Tensor) -> Dict[str, Any]:
        kernel = decoder.config._attn_implementation
        mask = _causal_mask(decoder, hidden, position_ids)
        if kernel == FLEX:
            return {"position_bias": _alibi_slopes(decoder, hidden.device), "attention_mask": mask}
        seq_len = hidden.shape[1]
        if kernel == "sdpa":
            # One additive bias [B or 1, H, T, T] for every layer: slope x (key - query) where the
            # mask allows, the dtype's minimum elsewhere (bf16 keeps the small near-diagonal values).
            offsets = torch.arange(seq_len, device=hidden.device)
            relative = (offsets.view(1, -1) - offsets.view(-1, 1)).to(torch.float32)
            bias = _alibi_slopes(decoder, hidden.device).view(1, -1, 1, 1) * relative
            allowed = torch.ones(seq_len, seq_len, dtype=torch.bool, device=hidden.device).tril() if mask is None else mask
            bias = bias.masked_fill(~allowed, torch.finfo(hidden.dtype).min).to(hidden.dtype)
            return {"position_bias": None, "attention_mask": bias}
        # Built for the actual length (MptModel builds max_seq_len and slices), so rows longer than
        # max_seq_len work as ALiBi allows. fp32: the scores it is added to are promoted to fp32.
        alibi = build_mpt_alibi_tensor(
            decoder.num_heads, seq_len, decoder.config.attn_config.alibi_bias_max, device=hidden.device
        )
        # MptAttention wants a bool mask, True where masked: the additive eager mask is nonzero there.
        return {"position_bias": alibi, "attention_mask": mask.to(torch.bool)}

    @staticmethod
    def layer_output(output: Tuple[torch.Tensor, Any]) -> torch.Tensor:
        return output[0]  # (hidden, attention weights)


DECODERS = {"llama": LlamaDecoder, "mpt": MptDecoder}
