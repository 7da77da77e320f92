"""FlamingoForCausalLM: ViT → perceiver → gated cross-attention between decoder layers.

The decoder is transformers' `LlamaModel` or `MptModel` (`decoder.kind`, see decoders.py); this
module runs its own loop over the decoder's layers so the gated blocks can sit between them
(placement from the config), and swaps the token embedding and LM head for decoupled ones (IDEFICS
style) so the added media tokens train in their own small tables. Which tower, perceiver and blocks
it builds, and under which names, are fields of the config (see config.py); the parts are reached
as `vision_encoder`, `perceiver`, `decoder` (its token embedding: `embed_tokens`),
`gated_cross_attn_layers` and `lm_head` (absent with tied embeddings) whatever their names.

Parameter names, `param_layout: mmtrain` (otter-tiny, openflamingo-*, otter-9b*):
  vision_encoder.*                                 open_clip `visual.*` (hf_clip: CLIPVisionModel's)
  perceiver.{latents, blocks.K.{attn,ff}.*, norm}
  gated_cross_attn_layers.M.{attn.*, attn_gate, ff.*, ff_gate}
  llama: decoder.{embed_tokens.weight, embed_tokens.additional_embedding.weight, layers.N.*, norm.weight}
         lm_head.{weight, additional_fc.weight}
  mpt:   decoder.{wte.weight, wte.additional_embedding.weight, blocks.N.{norm_1, attn.Wqkv, attn.out_proj,
         norm_2, ffn.up_proj, ffn.down_proj}.weight, norm_f.weight}; no lm_head: the embedding is the
         head (decoder.tie_word_embeddings), base and added tables both
(openflamingo.py maps these to and from OpenFlamingo's and Otter's checkpoint names.)

`param_layout: idefics` (idefics-*), the names of the published IDEFICS checkpoints and of
transformers' IdeficsForVisionText2Text, so their weights load as they are (no key mapping):
  model.embed_tokens.{weight, additional_embedding.weight}
  model.vision_model.{embeddings.*, pre_layrnorm.*, encoder.layers.N.*, post_layernorm.*}
  model.perceiver_resampler.{latents, blocks.K.0.{context_layer_norm, latents_layer_norm, q_layer_norm,
      k_layer_norm, q_proj, k_proj, v_proj, output_proj}, blocks.K.1.{ln, fc, c_proj}, layer_norm}.*
  model.layers.N.{self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj, input_layernorm,
      post_attention_layernorm}.weight                              (LLaMA's layers: same names)
  model.gated_cross_attn_layers.M.{alpha_cross_attn, alpha_dense, cross_attn.{q,k,v,o}_proj.weight,
      cross_attn.{q,k}_layer_norm.weight, mlp.{gate,up,down}_proj.weight, input_layernorm.weight,
      post_attention_layernorm.weight}
  model.norm.weight
  lm_head.{weight, additional_fc.weight}
The added-token tables hold the tokenizer's added tokens (`num_added_tokens`); the published ones
hold 2 rows (`<fake_token_around_image>`, `<image>`), so a tokenizer with more added tokens needs
those tables padded with new rows on load.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.models.idefics.modeling_idefics import IdeficsRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.utils import ModelOutput

from mmtrain.models.flamingo.blocks import (
    DecoupledEmbedding,
    DecoupledLinear,
    GatedCrossAttentionBlock,
    PerceiverResampler,
    media_attention_mask,
)
from mmtrain.models.flamingo.config import FAMILY, PARAM_GROUPS, PARAM_LAYOUTS, FlamingoConfig
from mmtrain.models.flamingo.decoders import DECODERS
from mmtrain.models.flamingo.idefics import IdeficsGatedCrossAttentionBlock, IdeficsPerceiver, idefics_layout
from mmtrain.models.flamingo.openflamingo import openflamingo_layout
from mmtrain.models.flamingo.vision import build_vision_encoder, patch_features, tower_layers, vision_kernel
from mmtrain.models.loss import causal_lm_loss
from mmtrain.models.registry import FamilyModel


def _group_prefixes(layout: Mapping[str, str], embedding: str) -> Tuple[Tuple[str, str], ...]:
    """Parameter-name prefix → group for a PARAM_LAYOUTS entry and the decoder's embedding name; the
    first match wins, so the added-token tables come before the decoder prefixes that contain them
    (and, in the idefics layout, the parts under `model.` before `model.` itself)."""
    decoder = layout["decoder"]
    return (
        (f"{decoder}.{embedding}.additional_embedding.", "new_tokens"),
        ("lm_head.additional_fc.", "new_tokens"),
        (f"{layout['vision_encoder']}.", "vision"),
        (f"{layout['perceiver']}.", "perceiver"),
        (f"{layout['gated_cross_attn_layers']}.", "cross_attn"),
        (f"{decoder}.", "decoder"),
        ("lm_head.", "decoder"),
    )


# Parameters without weight decay, besides those of norm and embedding modules and biases.
_NO_DECAY_LEAF_NAMES = frozenset(
    {"attn_gate", "ff_gate", "alpha_cross_attn", "alpha_dense", "latents", "class_embedding", "positional_embedding"}
)
_NO_DECAY_MODULES = (nn.LayerNorm, LlamaRMSNorm, IdeficsRMSNorm, nn.Embedding)


@dataclass
class FlamingoOutput(ModelOutput):
    """`loss = ce_loss + z_loss_weight * z_loss` (fp32 scalars) when labels are given."""

    loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    ce_loss: Optional[torch.Tensor] = None
    z_loss: Optional[torch.Tensor] = None


def _zero_bias(module: nn.Module) -> None:
    nn.init.zeros_(module.bias)


def _build_perceiver(config: FlamingoConfig) -> nn.Module:
    if config.perceiver.style == "idefics":
        return IdeficsPerceiver(config)
    return PerceiverResampler(
        dim=config.vision.width,
        num_latents=config.perceiver.num_latents,
        depth=config.perceiver.depth,
        num_heads=config.perceiver.num_heads,
        head_dim=config.perceiver.head_dim,
        ff_mult=config.perceiver.ff_mult,
    )


def _build_gated_block(config: FlamingoConfig, index: int) -> nn.Module:
    if config.cross_attn_style == "idefics":
        return IdeficsGatedCrossAttentionBlock(config, index)
    return GatedCrossAttentionBlock(
        dim_text=config.decoder.hidden_size,
        dim_media=config.vision.width,
        num_heads=config.cross_attn_num_heads,
        head_dim=config.cross_attn_head_dim,
        ff_mult=config.cross_attn_ff_mult,
    )


class FlamingoForCausalLM(FamilyModel, nn.Module):
    """A Flamingo-style interleaved image-text LM (see docs/architecture.md for the contract)."""

    family = FAMILY

    def __init__(self, config: FlamingoConfig, token_ids: Mapping[str, int], flavour: str):
        super().__init__()
        config.check()
        self.config = config
        self.flavour = flavour
        self.token_ids = {key: int(value) for key, value in token_ids.items()}
        self.image_token_id = self.token_ids["image"]
        # Set by the engine (set_activation_checkpointing): which decoder layers and gated blocks are
        # recomputed in backward while training.
        self.set_activation_checkpointing(False)
        # The loss; mmtrain.models.kernels.install swaps in a fused one (same numerics).
        self.loss_fn = causal_lm_loss

        vision_encoder = build_vision_encoder(config.vision, vision_kernel(config.decoder.attn_implementation))
        perceiver = _build_perceiver(config)
        # transformers would initialise the decoder here (post_init); that is left to deferred_init,
        # so that a plain build and a partitioned (zero.Init) one draw the same random numbers in the
        # same order and give identical weights for the same seed.
        self._kind = DECODERS[config.decoder.kind]
        decoder = self._kind.build(config.decoder, config.base_vocab_size)
        setattr(
            decoder,
            self._kind.embedding,
            DecoupledEmbedding(
                config.base_vocab_size,
                config.num_added_tokens,
                config.decoder.hidden_size,
                init_std=config.decoder.initializer_range,
            ),
        )
        self.cross_attn_layer_indices: List[int] = config.cross_attn_layer_indices()
        gated_cross_attn_layers = nn.ModuleList(
            [_build_gated_block(config, index) for index in range(len(self.cross_attn_layer_indices))]
        )
        # Each part goes where the layout names it (parents first; in the mmtrain layout all sit at the
        # top, in this order); the properties below find them there.
        self._layout: Dict[str, str] = dict(PARAM_LAYOUTS[config.param_layout])
        parts = {
            "vision_encoder": vision_encoder,
            "perceiver": perceiver,
            "decoder": decoder,
            "gated_cross_attn_layers": gated_cross_attn_layers,
        }
        for role in sorted(parts, key=lambda role: self._layout[role].count(".")):
            parent_path, _, name = self._layout[role].rpartition(".")
            setattr(self._module_at(parent_path), name, parts[role])
        if not config.decoder.tie_word_embeddings:
            self.lm_head = DecoupledLinear(config.decoder.hidden_size, config.base_vocab_size, config.num_added_tokens)
        self._prefix_groups = _group_prefixes(self._layout, self._kind.embedding)
        self._param_names = frozenset(name for name, _ in self.named_parameters())
        # By module type and name, not by ndim: ZeRO-3 partitioned parameters are all flat 1-D tensors.
        # No weight decay on norms, biases, gates, embeddings (incl. the added-token table) and latents.
        self._no_decay_names = frozenset(
            f"{module_name}.{param_name}" if module_name else param_name
            for module_name, module in self.named_modules()
            for param_name, _ in module.named_parameters(recurse=False)
            if isinstance(module, _NO_DECAY_MODULES)
            or param_name in _NO_DECAY_LEAF_NAMES
            or param_name.endswith("bias")
        )

    # ----------------------------------------------------------------------------------------
    # The parts, wherever config.param_layout puts them

    def _module_at(self, path: str) -> nn.Module:
        # Through `_modules`, not getattr/get_submodule: in the mmtrain layout a part's name is also
        # the name of the property that looks it up.
        module: nn.Module = self
        for name in filter(None, path.split(".")):
            module = module._modules[name]
        return module

    @property
    def vision_encoder(self) -> nn.Module:
        return self._module_at(self._layout["vision_encoder"])

    @property
    def perceiver(self) -> nn.Module:
        return self._module_at(self._layout["perceiver"])

    @property
    def decoder(self) -> nn.Module:
        """transformers' LlamaModel or MptModel with the decoupled embedding (in the idefics layout it
        also holds the other parts as children, as IdeficsModel does)."""
        return self._module_at(self._layout["decoder"])

    @property
    def embed_tokens(self) -> DecoupledEmbedding:
        """The decoder's token embedding (`embed_tokens` or MPT's `wte`); with tied embeddings also the LM head."""
        return getattr(self.decoder, self._kind.embedding)

    @property
    def gated_cross_attn_layers(self) -> nn.ModuleList:
        return self._module_at(self._layout["gated_cross_attn_layers"])

    # ----------------------------------------------------------------------------------------
    # Contract: forward, generate, param_groups, no_weight_decay, config_dict

    def forward(
        self,
        input_ids: torch.Tensor,
        images: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        num_images: Optional[torch.Tensor] = None,
        z_loss_weight: float = 0.0,
    ) -> FlamingoOutput:
        """`input_ids` [B, T] right-padded; `images` [B, N>=1, 3, H, W], uint8 pixels (normalised
        here, on the device) or already-normalised floats, zeros in unused slots.

        `position_ids` [B, T] restarting at 0 per document mark packed rows: attention then stays
        inside each document (self- and cross-attention); None means one document per row.
        `attention_mask` and `num_images` are accepted for the batch contract but not needed: with
        right padding every pad comes after every real token, so causal attention already keeps
        pads out of real tokens' context, pads are never targets, and unused image slots are
        never referenced by an `<image>` token.
        """
        media = self.encode_images(images)
        logits = self.decode(input_ids, media, position_ids)
        if labels is None:
            return FlamingoOutput(logits=logits)
        loss, ce_loss, z_loss = self.loss_fn(logits, labels, z_loss_weight)
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

    def published_layout(self):
        """The published layout this flavour loads (and, for IDEFICS, exports): IDEFICS' (param
        layout `idefics`), OpenFlamingo's / Otter's, or None (mmtrain.models.weights)."""
        return idefics_layout(self) or openflamingo_layout(self)

    def zero3_leaf_blocks(self) -> List[nn.Module]:
        return [*getattr(self.decoder, self._kind.layers), *self.gated_cross_attn_layers,
                *tower_layers(self.vision_encoder)]

    def param_groups(self) -> Dict[str, List[Tuple[str, nn.Parameter]]]:
        """Every parameter in exactly one of PARAM_GROUPS (what the freeze policy acts on)."""
        groups: Dict[str, List[Tuple[str, nn.Parameter]]] = {group: [] for group in PARAM_GROUPS}
        for name, param in self.named_parameters():
            group = next((g for prefix, g in self._prefix_groups if name.startswith(prefix)), None)
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
        zero.Init partitioned the child. Every other module (the IDEFICS parts included: they are
        transformers' plain nn.Modules) initialises in its own constructor.
        """
        pairs: List[Tuple[nn.Module, Callable[[nn.Module], None]]] = [
            (module.out_proj, _zero_bias) for module in self.modules() if isinstance(module, nn.MultiheadAttention)
        ]
        # Only the decoder's own modules: in the idefics layout the other parts are its children.
        others = {
            id(module)
            for part in (self.vision_encoder, self.perceiver, self.gated_cross_attn_layers)
            for module in part.modules()
        }
        pairs += [
            (module, self.decoder._init_weights) for module in self.decoder.modules() if id(module) not in others
        ]
        # The hf_clip tower is a PreTrainedModel too, built without its initialisation likewise. With
        # transformers' generic init, which touches only a module's own parameters (what the engine
        # gathers per module): CLIP's own init also draws for children from their parents, which
        # shifts the random stream of a partitioned build against a plain one. A frozen pretrained
        # tower's random init matters only in toy runs.
        tower = self.vision_encoder
        if isinstance(tower, PreTrainedModel):
            init_fn = functools.partial(PreTrainedModel._init_weights, tower)
            owners = [module for module in tower.modules() if next(module.parameters(recurse=False), None) is not None]
            pairs += [(module, init_fn) for module in owners]
        return pairs


    # ----------------------------------------------------------------------------------------
    # The two halves of forward (generate reuses the media across steps)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """[B, N, 3, H, W] pixels → [B, N, L, d_vision] perceiver latents."""
        if images.dim() != 5:
            raise ValueError(f"images must be [B, N, 3, H, W], got shape {tuple(images.shape)}")
        if images.dtype == torch.uint8:
            images = self._normalise(images)
        return self.perceiver(patch_features(self.vision_encoder, images))

    def _normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 pixels → (x/255 - mean) / std in fp32 (the tower casts to its dtype). Done here, not
        in the loader: a uint8 batch is 4x smaller to make, pass between processes and copy over."""
        vision = self.config.vision
        shape = (1, 1, 3, 1, 1)
        mean = torch.tensor(vision.mean, device=pixels.device, dtype=torch.float32).view(shape)
        std = torch.tensor(vision.std, device=pixels.device, dtype=torch.float32).view(shape)
        return (pixels.float() / 255.0 - mean) / std

    def decode(self, input_ids: torch.Tensor, media: torch.Tensor, position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits [B, T, V] for `input_ids` [B, T] given media latents [B, N, L, d_vision]."""
        batch, num_images, num_latents, dim = media.shape
        media = media.reshape(batch, num_images * num_latents, dim)
        media_mask, has_media = media_attention_mask(
            input_ids, self.image_token_id, num_images, num_latents, position_ids, self.config.cross_attn_implementation
        )

        decoder, kind = self.decoder, self._kind
        hidden = self.embed_tokens(input_ids)
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        # The same for every layer: rotary + causal mask (llama), ALiBi + causal mask (mpt); packed
        # rows get a block-diagonal causal mask from the restarting position_ids (decoders.py).
        layer_inputs = kind.layer_inputs(decoder, hidden, position_ids)
        block_of_layer = dict(zip(self.cross_attn_layer_indices, self.gated_cross_attn_layers))
        for index, layer in enumerate(getattr(decoder, kind.layers)):
            recompute = self._recomputes(index)
            block = block_of_layer.get(index)
            if block is not None:
                hidden = self._call(block, recompute, hidden, media, media_mask, has_media)
            hidden = kind.layer_output(self._call(layer, recompute, hidden, **layer_inputs))
        hidden = getattr(decoder, kind.final_norm)(hidden)
        if self.config.decoder.tie_word_embeddings:
            return self.embed_tokens(hidden, unembed=True)
        return self.lm_head(hidden)

