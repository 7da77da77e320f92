"""The language decoders FlamingoForCausalLM runs its own layer loop over, one adapter per `decoder.kind`.

The decoder is transformers' own base model, built without its initialisation (left to the
model's `deferred_init`) and with its token embedding swapped for the decoupled one. An adapter
says where its parts are and how one layer is called:

  kind   module     in *ForCausalLM  embedding     layers    final norm  per-layer inputs
  llama  LlamaModel model.            embed_tokens  layers.N  norm        rotary (cos, sin) + causal mask
  mpt    MptModel   transformer.      wte           blocks.N  norm_f      ALiBi bias + causal mask (bool, True = masked)

Packed rows (`position_ids` restarting at 0 per document) keep documents apart in both: the causal
mask comes from transformers' `create_causal_mask`, which reads the document boundaries from the
positions and makes it block-diagonal. MPT's ALiBi bias (slope x key index) needs no positions: inside
a row of the mask it differs from slope x (key - query) by a constant, which softmax ignores, so a
packed document is attended exactly as it would be alone.
"""

from __future__ import annotations

from typing import Any, Dict, Tuple

import torch
from torch import nn
from transformers import LlamaConfig, LlamaModel, MptConfig, MptModel
from transformers.initialization import no_init_weights
from transformers.masking_utils import create_causal_mask
from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

from mmtrain.models.flamingo.config import DecoderConfig


def _causal_mask(decoder: nn.Module, hidden: torch.Tensor, position_ids: torch.Tensor):
    # None under SDPA for single-document rows (its is_causal path); with packed rows transformers
    # reads the boundaries from the restarting position_ids and builds a block-diagonal causal mask
    # (or varlen boundaries for flash-attention). Eager (MPT) always gets an additive float mask.
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
            "position_embeddings": _rotary_embeddings(decoder.rotary_emb, hidden, position_ids),
        }

    @staticmethod
    def layer_output(output: Any) -> torch.Tensor:
        return output


def _rotary_embeddings(
    rotary: nn.Module, hidden: torch.Tensor, position_ids: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    if rotary.inv_freq.dtype != torch.float32:
        # A bf16 model (`.bfloat16()`, or DeepSpeed zero.Init creating every float tensor in bf16)
        # has RoPE's inverse frequencies rounded to bf16, which shifts rotary angles by whole
        # radians at long positions. Recompute them in fp32 once; they are non-persistent buffers.
        inv_freq, _ = rotary.compute_default_rope_parameters(rotary.config)
        rotary.inv_freq = inv_freq.to(rotary.inv_freq.device)
        rotary.original_inv_freq = rotary.inv_freq.clone()
    return rotary(hidden, position_ids)


class MptDecoder:
    embedding, layers, final_norm = "wte", "blocks", "norm_f"
    causal_lm_prefix = "transformer"

    @staticmethod
    def build(config: DecoderConfig, vocab_size: int) -> nn.Module:
        with no_init_weights():
            return MptModel(
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
                    # transformers' MptAttention is eager only (matmul + fp32 softmax).
                    attn_implementation="eager",
                    use_cache=False,
                )
            )

    @staticmethod
    def layer_inputs(decoder: nn.Module, hidden: torch.Tensor, position_ids: torch.Tensor) -> Dict[str, Any]:
        # Built for the actual length (MptModel builds max_seq_len and slices), so rows longer than
        # max_seq_len work as ALiBi allows. fp32: the scores it is added to are promoted to fp32.
        alibi = build_mpt_alibi_tensor(
            decoder.num_heads, hidden.shape[1], decoder.config.attn_config.alibi_bias_max, device=hidden.device
        )
        # MptAttention wants a bool mask, True where masked: the additive eager mask is nonzero there.
        return {"position_bias": alibi, "attention_mask": _causal_mask(decoder, hidden, position_ids).to(torch.bool)}

    @staticmethod
    def layer_output(output: Tuple[torch.Tensor, Any]) -> torch.Tensor:
        return output[0]  # (hidden, attention weights)


DECODERS = {"llama": LlamaDecoder, "mpt": MptDecoder}
