"""FlamingoForCausalLM: open_clip ViT → perceiver → gated cross-attention between LLaMA layers.

The decoder is transformers' `LlamaModel`; this module runs its own loop over `decoder.layers`
so the gated blocks can sit between them (placement from the config), and swaps the token
embedding and LM head for decoupled ones (IDEFICS style) so the added media tokens train in
their own small tables.

Parameter names:
  vision_encoder.*                                 open_clip `visual.*`
  perceiver.{latents, blocks.K.{attn,ff}.*, norm}
  gated_cross_attn_layers.M.{attn.*, attn_gate, ff.*, ff_gate}
  decoder.{embed_tokens.weight, embed_tokens.additional_embedding.weight, layers.N.*, norm.weight}
  lm_head.{weight, additional_fc.weight}
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import LlamaConfig, LlamaModel
from transformers.initialization import no_init_weights
from transformers.masking_utils import create_causal_mask
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.utils import ModelOutput

from mmtrain.models.flamingo.blocks import (
    DecoupledEmbedding,
    DecoupledLinear,
    GatedCrossAttentionBlock,
    PerceiverResampler,
    media_attention_mask,
)
from mmtrain.models.flamingo.config import FAMILY, PARAM_GROUPS, DecoderConfig, FlamingoConfig
from mmtrain.models.flamingo.vision import build_vision_encoder, patch_features
from mmtrain.models.loss import causal_lm_loss
from mmtrain.models.registry import model_from_config_dict

# Parameter-name prefix → group; the first match wins, so the added-token tables come before
# the decoder prefixes that contain them.
_GROUP_PREFIXES = (
    ("decoder.embed_tokens.additional_embedding.", "new_tokens"),
    ("lm_head.additional_fc.", "new_tokens"),
    ("vision_encoder.", "vision"),
    ("perceiver.", "perceiver"),
    ("gated_cross_attn_layers.", "cross_attn"),
    ("decoder.", "decoder"),
    ("lm_head.", "decoder"),
)

# Parameters without weight decay, besides those of norm and embedding modules and biases.
_NO_DECAY_LEAF_NAMES = frozenset({"attn_gate", "ff_gate", "latents", "class_embedding", "positional_embedding"})
_NO_DECAY_MODULES = (nn.LayerNorm, LlamaRMSNorm, nn.Embedding)


@dataclass
class FlamingoOutput(ModelOutput):
    """`loss = ce_loss + z_loss_weight * z_loss` (fp32 scalars) when labels are given."""

    loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    ce_loss: Optional[torch.Tensor] = None
    z_loss: Optional[torch.Tensor] = None


def _llama_config(config: DecoderConfig, vocab_size: int) -> LlamaConfig:
    return LlamaConfig(
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


def _zero_bias(module: nn.Module) -> None:
    nn.init.zeros_(module.bias)


class FlamingoForCausalLM(nn.Module):
    """A Flamingo-style interleaved image-text LM (see docs/architecture.md for the contract)."""

    def __init__(self, config: FlamingoConfig, token_ids: Mapping[str, int], flavour: str):
        super().__init__()
        config.check()
        self.config = config
        self.flavour = flavour
        self.token_ids = {key: int(value) for key, value in token_ids.items()}
        self.image_token_id = self.token_ids["image"]
        # Set by the engine: recompute decoder layers and gated blocks in backward while training.
        self.gradient_checkpointing = False

        self.vision_encoder = build_vision_encoder(config.vision)
        self.perceiver = PerceiverResampler(
            dim=config.vision.width,
            num_latents=config.perceiver.num_latents,
            depth=config.perceiver.depth,
            num_heads=config.perceiver.num_heads,
            head_dim=config.perceiver.head_dim,
            ff_mult=config.perceiver.ff_mult,
        )
        # transformers would initialise the decoder here (post_init); that is left to deferred_init,
        # so that a plain build and a partitioned (zero.Init) one draw the same random numbers in the
        # same order and give identical weights for the same seed.
        with no_init_weights():
            self.decoder = LlamaModel(_llama_config(config.decoder, config.base_vocab_size))
        self.decoder.embed_tokens = DecoupledEmbedding(
            config.base_vocab_size,
            config.num_added_tokens,
            config.decoder.hidden_size,
            init_std=config.decoder.initializer_range,
        )
        self.cross_attn_layer_indices: List[int] = config.cross_attn_layer_indices()
        self.gated_cross_attn_layers = nn.ModuleList(
            [
                GatedCrossAttentionBlock(
                    dim_text=config.decoder.hidden_size,
                    dim_media=config.vision.width,
                    num_heads=config.cross_attn_num_heads,
                    head_dim=config.cross_attn_head_dim,
                    ff_mult=config.cross_attn_ff_mult,
                )
                for _ in self.cross_attn_layer_indices
            ]
        )
        self.lm_head = DecoupledLinear(config.decoder.hidden_size, config.base_vocab_size, config.num_added_tokens)
        self._param_names = frozenset(name for name, _ in self.named_parameters())
        # By module type and name, not by ndim: ZeRO-3 partitioned parameters are all flat 1-D tensors.
        self._no_decay_names = frozenset(
            f"{module_name}.{param_name}" if module_name else param_name
            for module_name, module in self.named_modules()
            for param_name, _ in module.named_parameters(recurse=False)
            if isinstance(module, _NO_DECAY_MODULES)
            or param_name in _NO_DECAY_LEAF_NAMES
            or param_name.endswith("bias")
        )

    # ----------------------------------------------------------------------------------------
    # Contract: forward, generate, param_groups, no_weight_decay, config_dict

    def forward(
        self,
        input_ids: torch.Tensor,
        images: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        z_loss_weight: float = 0.0,
    ) -> FlamingoOutput:
        """`input_ids` [B, T] right-padded, `images` [B, N>=1, 3, H, W] (zeros in unused slots).

        `attention_mask` is accepted for the batch contract but not needed: with right padding
        every pad comes after every real token, so causal attention already keeps pads out of
        real tokens' context, and pads are never targets.
        """
        media = self.encode_images(images)
        logits = self.decode(input_ids, media)
        if labels is None:
            return FlamingoOutput(logits=logits)
        loss, ce_loss, z_loss = causal_lm_loss(logits, labels, z_loss_weight)
        return FlamingoOutput(loss=loss, logits=logits, ce_loss=ce_loss, z_loss=z_loss)

    @torch.no_grad()
    def generate(
        self, input_ids: torch.Tensor, images: torch.Tensor, max_new_tokens: int, stop_ids: Sequence[int]
    ) -> List[int]:
        """Greedy decoding of one prompt; returns the new ids, ending with the stop id if one was hit.

        No KV cache: each step reruns the decoder over the whole sequence (the media latents are
        computed once). Under ZeRO-3 every rank must run the same number of steps.
        """
        if input_ids.shape[0] != 1:
            raise ValueError(f"generate takes one prompt, got input_ids of shape {tuple(input_ids.shape)}")
        stop = {int(token) for token in stop_ids}
        media = self.encode_images(images)
        new_ids: List[int] = []
        for _ in range(max_new_tokens):
            next_id = int(self.decode(input_ids, media)[0, -1].argmax())
            new_ids.append(next_id)
            if next_id in stop:
                break
            input_ids = torch.cat([input_ids, input_ids.new_tensor([[next_id]])], dim=1)
        return new_ids

    def param_groups(self) -> Dict[str, List[Tuple[str, nn.Parameter]]]:
        """Every parameter in exactly one of PARAM_GROUPS (what the freeze policy acts on)."""
        groups: Dict[str, List[Tuple[str, nn.Parameter]]] = {group: [] for group in PARAM_GROUPS}
        for name, param in self.named_parameters():
            group = next((g for prefix, g in _GROUP_PREFIXES if name.startswith(prefix)), None)
            if group is None:
                raise RuntimeError(f"parameter {name!r} belongs to no parameter group")
            groups[group].append((name, param))
        return groups

    def deferred_init(self) -> List[Tuple[nn.Module, Callable[[nn.Module], None]]]:
        """(module, init function) pairs to run once construction is over; `build_model` runs them.

        transformers initialises its decoder in `post_init`, after every submodule is built, and
        under DeepSpeed's zero.Init the parameters are partitioned by then, so that step would do
        nothing: the decoder is built without it and initialised here instead; the engine runs these
        with the weights gathered when it builds under zero.Init. torch's MultiheadAttention (in the
        open_clip tower) likewise zeroes its child `out_proj.bias` from its own constructor, after
        zero.Init partitioned the child. Every other module initialises in its own constructor.
        """
        pairs: List[Tuple[nn.Module, Callable[[nn.Module], None]]] = [
            (module.out_proj, _zero_bias) for module in self.modules() if isinstance(module, nn.MultiheadAttention)
        ]
        pairs += [(module, self.decoder._init_weights) for module in self.decoder.modules()]
        return pairs

    def no_weight_decay(self, name: str) -> bool:
        """True for norms, biases, gates, embeddings (incl. the added-token table) and latents.

        `name` is as in `self.named_parameters()`; an unknown name is a KeyError, not a silent False.
        """
        if name not in self._param_names:
            raise KeyError(f"{name!r} is not a parameter of {type(self).__name__}")
        return name in self._no_decay_names

    def config_dict(self) -> Dict[str, Any]:
        """JSON-serialisable; `from_config_dict` (or `registry.model_from_config_dict`) rebuilds the model."""
        return {
            "family": FAMILY,
            "flavour": self.flavour,
            "config": dataclasses.asdict(self.config),
            "token_ids": dict(self.token_ids),
        }

    @classmethod
    def from_config_dict(cls, config_dict: Mapping[str, Any]) -> "FlamingoForCausalLM":
        model = model_from_config_dict(config_dict)
        if not isinstance(model, cls):
            raise ValueError(f"config dict builds a {type(model).__name__}, not a {cls.__name__}")
        return model

    # ----------------------------------------------------------------------------------------
    # The two halves of forward (generate reuses the media across steps)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """[B, N, 3, H, W] pixels → [B, N, L, d_vision] perceiver latents."""
        if images.dim() != 5:
            raise ValueError(f"images must be [B, N, 3, H, W], got shape {tuple(images.shape)}")
        return self.perceiver(patch_features(self.vision_encoder, images))

    def decode(self, input_ids: torch.Tensor, media: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, V] for `input_ids` [B, T] given media latents [B, N, L, d_vision]."""
        batch, num_images, num_latents, dim = media.shape
        media = media.reshape(batch, num_images * num_latents, dim)
        media_mask, has_media = media_attention_mask(input_ids, self.image_token_id, num_images, num_latents)

        hidden = self.decoder.embed_tokens(input_ids)
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        position_embeddings = self._rotary_embeddings(hidden, position_ids)
        # None under SDPA (its is_causal path); a materialised causal mask for other attention kernels.
        causal_mask = create_causal_mask(
            config=self.decoder.config,
            inputs_embeds=hidden,
            attention_mask=None,
            past_key_values=None,
            position_ids=position_ids,
        )
        block_of_layer = dict(zip(self.cross_attn_layer_indices, self.gated_cross_attn_layers))
        for index, layer in enumerate(self.decoder.layers):
            block = block_of_layer.get(index)
            if block is not None:
                hidden = self._call(block, hidden, media, media_mask, has_media)
            hidden = self._call(
                layer,
                hidden,
                attention_mask=causal_mask,
                position_ids=position_ids,
                position_embeddings=position_embeddings,
            )
        return self.lm_head(self.decoder.norm(hidden))

    def _rotary_embeddings(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        rotary = self.decoder.rotary_emb
        if rotary.inv_freq.dtype != torch.float32:
            # A bf16 model (`.bfloat16()`, or DeepSpeed zero.Init creating every float tensor in bf16)
            # has RoPE's inverse frequencies rounded to bf16, which shifts rotary angles by whole
            # radians at long positions. Recompute them in fp32 once; they are non-persistent buffers.
            inv_freq, _ = rotary.compute_default_rope_parameters(rotary.config)
            rotary.inv_freq = inv_freq.to(rotary.inv_freq.device)
            rotary.original_inv_freq = rotary.inv_freq.clone()
        return rotary(hidden, position_ids)

    def _call(self, module: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(module, *args, use_reentrant=False, **kwargs)
        return module(*args, **kwargs)
