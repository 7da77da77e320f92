"""FuyuForCausalLM: linear-projected 30x30 pixel patches scattered into a Persimmon decoder.

The decoder and LM head are transformers' `PersimmonForCausalLM`; this module owns the patch
projection and its scatter into the token embeddings, the packed-row attention mask, the loss,
and runs its own loop over the decoder layers (activation checkpointing, fp32 RoPE frequencies).

Parameter names are those of the published Fuyu-8B checkpoint (adept/fuyu-8b, written by
transformers 4.x, whose FuyuForCausalLM held a PersimmonForCausalLM as `language_model`; OtterHD's
own modeling_fuyu.py has the same layout), so the safetensors load without renaming:

  vision_embed_tokens.{weight, bias}                          Linear(2700 → hidden)
  language_model.model.embed_tokens.weight
  language_model.model.layers.N.self_attn.{query_key_value, dense, q_layernorm, k_layernorm}.*
  language_model.model.layers.N.mlp.{dense_h_to_4h, dense_4h_to_h}.*
  language_model.model.layers.N.{input_layernorm, post_attention_layernorm}.*
  language_model.model.final_layernorm.{weight, bias}
  language_model.lm_head.weight

transformers 5 moved its own FuyuForCausalLM's modules (and renames the published keys on load,
see `conversion_mapping.py`); :func:`checkpoint_key` maps its state-dict keys to ours:

  model.language_model.X     → language_model.model.X
  model.vision_embed_tokens.X → vision_embed_tokens.X
  lm_head.weight             → language_model.lm_head.weight
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from transformers import PersimmonConfig, PersimmonForCausalLM
from transformers.initialization import no_init_weights
from transformers.masking_utils import create_causal_mask
from transformers.utils import ModelOutput

from mmtrain.models.flex import FLEX
from mmtrain.models.fuyu.config import FAMILY, PARAM_GROUPS, FuyuConfig
from mmtrain.models.loss import causal_lm_loss
from mmtrain.models.registry import FamilyModel
from mmtrain.models.rope import rotary_embeddings

# transformers 5 FuyuForCausalLM state-dict prefix → published checkpoint (and our) prefix.
_TRANSFORMERS_5_PREFIXES = (
    ("model.language_model.", "language_model.model."),
    ("model.vision_embed_tokens.", "vision_embed_tokens."),
    ("lm_head.", "language_model.lm_head."),
)

# Parameter-name prefix → group; the first match wins.
_GROUP_PREFIXES = (
    ("vision_embed_tokens.", "vision"),
    ("language_model.model.embed_tokens.", "embeddings"),
    ("language_model.lm_head.", "embeddings"),
    ("language_model.", "decoder"),
)

_NO_DECAY_MODULES = (nn.LayerNorm, nn.Embedding)


def checkpoint_key(transformers_key: str) -> str:
    """A transformers-5 `FuyuForCausalLM` state-dict key → the published checkpoint's (and our) key."""
    for old, new in _TRANSFORMERS_5_PREFIXES:
        if transformers_key.startswith(old):
            return new + transformers_key[len(old):]
    raise KeyError(f"{transformers_key!r} is not a key of transformers' FuyuForCausalLM")


@dataclass
class FuyuOutput(ModelOutput):
    """`loss = ce_loss + z_loss_weight * z_loss` (fp32 scalars) when labels are given."""

    loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    ce_loss: Optional[torch.Tensor] = None
    z_loss: Optional[torch.Tensor] = None


def _persimmon_config(config: FuyuConfig) -> PersimmonConfig:
    dec = config.decoder
    return PersimmonConfig(
        vocab_size=config.vocab_size,
        hidden_size=dec.hidden_size,
        num_hidden_layers=dec.num_hidden_layers,
        num_attention_heads=dec.num_attention_heads,
        intermediate_size=dec.intermediate_size,
        hidden_act=dec.hidden_act,
        layer_norm_eps=dec.layer_norm_eps,
        qk_layernorm=dec.qk_layernorm,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": dec.rope_theta,
            "partial_rotary_factor": dec.partial_rotary_factor,
        },
        max_position_embeddings=dec.max_position_embeddings,
        initializer_range=dec.initializer_range,
        # transformers refuses flex_attention at Persimmon's construction (its class does not declare
        # it), though its attention runs through the generic interface: FuyuForCausalLM sets it after.
        attn_implementation="sdpa" if dec.attn_implementation == FLEX else dec.attn_implementation,
        tie_word_embeddings=False,
        use_cache=False,
    )


class FuyuForCausalLM(FamilyModel, nn.Module):
    """Fuyu / OtterHD: a decoder-only LM whose image tokens are projected pixel patches."""

    family = FAMILY

    def __init__(self, config: FuyuConfig, token_ids: Mapping[str, int], flavour: str):
        super().__init__()
        config.check()
        self.config = config
        self.flavour = flavour
        self.token_ids = {key: int(value) for key, value in token_ids.items()}
        # Set by the engine (set_activation_checkpointing): which decoder layers are recomputed in
        # backward while training.
        self.set_activation_checkpointing(False)
        # The loss; mmtrain.models.kernels.install swaps in a fused one (same numerics).
        self.loss_fn = causal_lm_loss

        self.vision_embed_tokens = nn.Linear(config.patch_dim, config.decoder.hidden_size)
        # transformers would initialise here (post_init); that is left to deferred_init, so that a
        # plain build and a partitioned (zero.Init) one give identical weights for the same seed.
        with no_init_weights():
            self.language_model = PersimmonForCausalLM(_persimmon_config(config))
        self.language_model.config._attn_implementation = config.decoder.attn_implementation
        self._param_names = frozenset(name for name, _ in self.named_parameters())
        # By module type and name, not by ndim: ZeRO-3 partitioned parameters are all flat 1-D tensors.
        # No weight decay on norms (incl. the q/k LayerNorms), biases and the input embedding.
        self._no_decay_names = frozenset(
            f"{module_name}.{param_name}" if module_name else param_name
            for module_name, module in self.named_modules()
            for param_name, _ in module.named_parameters(recurse=False)
            if isinstance(module, _NO_DECAY_MODULES) or param_name.endswith("bias")
        )

    # ----------------------------------------------------------------------------------------
    # Contract: forward, generate, param_groups, no_weight_decay, deferred_init, config_dict

    def forward(
        self,
        input_ids: torch.Tensor,
        image_patches: torch.Tensor,
        image_patch_indices: torch.Tensor,
        position_ids: Optional[torch.Tensor] = None,
        segment_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        z_loss_weight: float = 0.0,
    ) -> FuyuOutput:
        """Logits [B, T, V] (and the loss when `labels` are given).

        input_ids [B, T] long, right-padded. image_patches [B, P>=1, patch_dim] uint8 raw pixels
        (zero rows where unused), each patch flattened as `image_spec` says. image_patch_indices
        [B, T] long: the row of `image_patches` whose projection replaces the token's embedding, -1
        for text. labels [B, T] (-100 ignored), unshifted.

        Packed rows (several documents in one row) keep attention causal within each document.
        The boundaries come from `segment_ids` [B, T] long (documents 1..k, 0 for padding) when
        given, else from `position_ids` [B, T] restarting at 0 per document (what mmtrain's loader
        emits; padding continues the last document's positions). position_ids default to 0..T-1;
        a batch whose rows are single documents keeps SDPA's is_causal path (no dense mask).

        `attention_mask` is accepted for the batch contract but not needed: with right padding every
        pad comes after every real token, so causal attention already keeps pads out of real tokens'
        context, and pads are never targets.
        """
        logits = self.logits(input_ids, image_patches, image_patch_indices, position_ids, segment_ids)
        if labels is None:
            return FuyuOutput(logits=logits)
        loss, ce_loss, z_loss = self.loss_fn(logits, labels, z_loss_weight)
        return FuyuOutput(loss=loss, logits=logits, ce_loss=ce_loss, z_loss=z_loss)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        image_patches: torch.Tensor,
        image_patch_indices: torch.Tensor,
        max_new_tokens: int,
        eos_token_id: Union[int, Sequence[int]],
    ) -> List[int]:
        """Greedy decoding of one prompt; returns the new ids, ending with the eos id if one was hit.

        No KV cache: each step reruns the decoder over the whole sequence (the patches are projected
        again each step; cheap next to the decoder). Under ZeRO-3 every rank must run the same
        number of steps.
        """
        if input_ids.shape[0] != 1:
            raise ValueError(f"generate takes one prompt, got input_ids of shape {tuple(input_ids.shape)}")
        stop = {int(eos_token_id)} if isinstance(eos_token_id, int) else {int(t) for t in eos_token_id}
        new_ids: List[int] = []
        for _ in range(max_new_tokens):
            next_id = int(self.logits(input_ids, image_patches, image_patch_indices)[0, -1].argmax())
            new_ids.append(next_id)
            if next_id in stop:
                break
            input_ids = torch.cat([input_ids, input_ids.new_tensor([[next_id]])], dim=1)
            image_patch_indices = torch.cat([image_patch_indices, image_patch_indices.new_tensor([[-1]])], dim=1)
        return new_ids

    def published_layout(self):
        """adept/fuyu-8b's layout (mmtrain.models.weights): load it, and export to it."""
        return _fuyu_layout(self)

    def zero3_leaf_blocks(self) -> List[nn.Module]:
        return list(self.language_model.model.layers)

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

        transformers initialises in `post_init`, after every submodule is built; under DeepSpeed's
        zero.Init the parameters are partitioned by then, so the decoder is built without it and
        initialised here, with the weights gathered (the engine does that). The patch projection
        takes the same init as transformers' Fuyu gives it (normal(0, initializer_range), zero bias).
        """
        init = self.language_model._init_weights
        return [(self.vision_embed_tokens, init)] + [(module, init) for module in self.language_model.modules()]


    # ----------------------------------------------------------------------------------------
    # The pieces of forward

    def embed(
        self, input_ids: torch.Tensor, image_patches: torch.Tensor, image_patch_indices: torch.Tensor
    ) -> torch.Tensor:
        """Token embeddings [B, T, d] with the projected patches in place of the image tokens'.

        The projection runs on every call, also when no token is an image token (text-only batch:
        the zero patch rows are projected and none is picked, so its grads are zero): under ZeRO-3
        every rank must run the same modules, or the parameter gathers hang.
        """
        batch, num_patches, patch_dim = image_patches.shape
        if image_patches.dtype != torch.uint8:
            raise ValueError(f"image_patches must be uint8 raw pixels, got {image_patches.dtype}")
        if num_patches < 1 or patch_dim != self.config.patch_dim:
            raise ValueError(
                f"image_patches must be [B, P>=1, {self.config.patch_dim}], got {tuple(image_patches.shape)}"
            )
        if image_patch_indices.shape != input_ids.shape:
            raise ValueError(
                f"image_patch_indices {tuple(image_patch_indices.shape)} and input_ids {tuple(input_ids.shape)} differ"
            )
        # Normalise in fp32 on device (x/255, then (x - mean)/std per channel; channel is the last
        # axis of a flattened patch), then cast: uint8 batches are 4x smaller to load and copy.
        # mean/std are not buffers: a bf16 model (or zero.Init) would round them to bf16.
        pixels = image_patches.float().div(255.0).view(batch, num_patches, -1, self.config.num_channels)
        mean, std = pixels.new_tensor(self.config.mean), pixels.new_tensor(self.config.std)
        pixels = ((pixels - mean) / std).view(batch, num_patches, patch_dim)
        patch_embeds = self.vision_embed_tokens(pixels.to(self.vision_embed_tokens.weight.dtype))

        token_embeds = self.language_model.model.embed_tokens(input_ids)
        is_patch = image_patch_indices >= 0
        # A gather + where over the whole batch, not transformers' per-row nonzero + index_put (a
        # host sync per row); autograd sends each patch its grad from every position that uses it.
        picked = patch_embeds.gather(
            1, image_patch_indices.clamp(min=0).unsqueeze(-1).expand(-1, -1, patch_embeds.shape[-1])
        )
        return torch.where(is_patch.unsqueeze(-1), picked.to(token_embeds.dtype), token_embeds)

    def logits(
        self,
        input_ids: torch.Tensor,
        image_patches: torch.Tensor,
        image_patch_indices: torch.Tensor,
        position_ids: Optional[torch.Tensor] = None,
        segment_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        hidden = self.embed(input_ids, image_patches, image_patch_indices)
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        decoder = self.language_model.model
        position_embeddings = rotary_embeddings(decoder.rotary_emb, hidden, position_ids)
        mask = self._attention_mask(hidden, position_ids, segment_ids)
        for index, layer in enumerate(decoder.layers):
            hidden = self._call(
                layer, self._recomputes(index), hidden, attention_mask=mask, position_ids=position_ids, position_embeddings=position_embeddings
            )
        return self.language_model.lm_head(decoder.final_layernorm(hidden))

    def _attention_mask(
        self, hidden: torch.Tensor, position_ids: torch.Tensor, segment_ids: Optional[torch.Tensor]
    ) -> Optional[torch.Tensor]:
        """Causal self-attention mask in the kernel's format; None under SDPA for unpacked rows.

        Without segment_ids, transformers reads packed documents from restarting position_ids
        (block-diagonal causal) and otherwise returns None (SDPA's is_causal path). With them, the
        position_ids are kept from it, as its own packing rule would remap the segment test's indices.
        """
        config = self.language_model.model.config
        if segment_ids is None:
            return create_causal_mask(
                config=config, inputs_embeds=hidden, attention_mask=None, past_key_values=None, position_ids=position_ids
            )
        if segment_ids.shape != hidden.shape[:2]:
            raise ValueError(f"segment_ids {tuple(segment_ids.shape)} and input_ids {tuple(hidden.shape[:2])} differ")

        def same_segment(batch_idx, head_idx, q_idx, kv_idx):
            return segment_ids[batch_idx, q_idx] == segment_ids[batch_idx, kv_idx]

        return create_causal_mask(
            config=config,
            inputs_embeds=hidden,
            attention_mask=None,
            past_key_values=None,
            position_ids=None,
            and_mask_function=same_segment,
        )

def _fuyu_layout(model: nn.Module):
    """Fuyu-8B / OtterHD-8B (adept/fuyu-8b): our names are the published ones (transformers 4's);
    transformers 5's FuyuForCausalLM names (`model.language_model.*`, ...) are read as aliases."""
    from mmtrain.models.weights import PublishedLayout

    def alias(key: str) -> Optional[str]:
        try:
            return checkpoint_key(key)
        except KeyError:
            return None

    return PublishedLayout(name="fuyu", aliases=alias, hf_config=_fuyu_hf_config, hf_model_class="FuyuForCausalLM")


def _fuyu_hf_config(model: nn.Module):
    from transformers import FuyuConfig

    ids = model.token_ids
    text = model.language_model.config.to_dict()
    text.update(use_cache=True, bos_token_id=ids.get("bos"), eos_token_id=ids.get("eos"), pad_token_id=ids.get("pad"))
    return FuyuConfig(
        text_config=text,
        patch_size=model.config.patch_size_px,
        num_channels=model.config.num_channels,
        image_token_id=ids["image"],
        tie_word_embeddings=False,
        bos_token_id=ids.get("bos"),
        eos_token_id=ids.get("eos"),
        pad_token_id=ids.get("pad"),
        architectures=["FuyuForCausalLM"],
    )
