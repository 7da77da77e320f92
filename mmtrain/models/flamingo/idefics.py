"""IDEFICS' perceiver and gated cross-attention: transformers' own modules behind the family's interfaces.

transformers' `IdeficsPerceiverResampler` and `IdeficsGatedCrossAttentionLayer` are used as they
are (same parameters, names and forward); the subclasses here only adapt the calls to the ones
FlamingoForCausalLM makes of every perceiver and gated block:

  perceiver(media [B, N, P, d]) → [B, N, L, d]
  block(x [B, T, D], media [B, N*L, d], media_mask [B, 1, T, N*L] bool, has_media [B, T, 1] bool)

`media_mask` / `has_media` come from `blocks.media_attention_mask`; IdeficsModel gets the same from
the processor's `image_attention_mask` (each token sees the latest preceding image, none before
the first one or after an EOS) as an additive mask and a `cross_attention_gate`.
"""

from __future__ import annotations

import torch
from transformers import IdeficsConfig
from transformers.models.idefics.modeling_idefics import IdeficsGatedCrossAttentionLayer
from transformers.models.idefics.perceiver import IdeficsPerceiverResampler

from mmtrain.models.flamingo.config import PARAM_LAYOUTS, FlamingoConfig
from mmtrain.models.flamingo.vision import idefics_vision_config, vision_kernel
from mmtrain.models.flex import is_block_mask


def idefics_config(config: FlamingoConfig) -> IdeficsConfig:
    """The transformers IdeficsConfig that the IDEFICS pieces of `config` are built from.

    Its attention fields are the cross-attention's (`num_attention_heads = cross_attn_num_heads`):
    IDEFICS uses one head count for self- and cross-attention, transformers' modules read it from here.
    """
    dec = config.decoder
    # The cross-attention kernel: transformers' IdeficsAttention reads it from this config.
    attn_implementation = config.cross_attn_implementation
    return IdeficsConfig(
        vocab_size=config.base_vocab_size,
        additional_vocab_size=config.num_added_tokens,
        hidden_size=dec.hidden_size,
        intermediate_size=dec.intermediate_size,
        num_hidden_layers=dec.num_hidden_layers,
        num_attention_heads=config.cross_attn_num_heads,
        hidden_act="silu",
        rms_norm_eps=dec.rms_norm_eps,
        max_position_embeddings=dec.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": dec.rope_theta},
        initializer_range=dec.initializer_range,
        alpha_initializer="zeros",
        alpha_type="float",
        cross_layer_interval=config.cross_attn_every_n_layers,
        qk_layer_norms=config.cross_attn_qk_norms,
        use_resampler=True,
        tie_word_embeddings=False,
        freeze_text_layers=False,
        freeze_vision_layers=False,
        use_cache=False,
        vision_config=idefics_vision_config(config.vision, vision_kernel(dec.attn_implementation)).to_dict(),
        perceiver_config={
            "use_resampler": True,
            "resampler_n_latents": config.perceiver.num_latents,
            "resampler_depth": config.perceiver.depth,
            "resampler_n_heads": config.perceiver.num_heads,
            "resampler_head_dim": config.perceiver.head_dim,
            "qk_layer_norms_perceiver": config.perceiver.qk_norms,
        },
        attn_implementation=attn_implementation,
    )


class IdeficsPerceiver(IdeficsPerceiverResampler):
    """transformers' IdeficsPerceiverResampler over [B, N, P, d]: every image resampled on its own."""

    def __init__(self, config: FlamingoConfig):
        perceiver = config.perceiver
        super().__init__(
            idefics_config(config),
            embed_dim=config.vision.width,
            depth=perceiver.depth,
            n_heads=perceiver.num_heads,
            head_dim=perceiver.head_dim,
            n_latents=perceiver.num_latents,
        )

    def forward(self, media: torch.Tensor) -> torch.Tensor:
        batch, num_images, num_patches, dim = media.shape
        latents = super().forward(media.reshape(batch * num_images, num_patches, dim))
        return latents.reshape(batch, num_images, -1, dim)


class IdeficsGatedCrossAttentionBlock(IdeficsGatedCrossAttentionLayer):
    """transformers' IdeficsGatedCrossAttentionLayer called like the OpenFlamingo-style block.

    As in IdeficsModel: the boolean media mask becomes an additive one (dtype min where masked; a
    BlockMask for the flex kernel is passed as it is),
    and `has_media` is the `cross_attention_gate` that zeroes the attention output of tokens
    that see no image (their rows allow every key, so SDPA never sees an all-masked row).
    """

    def __init__(self, config: FlamingoConfig, index: int):
        super().__init__(idefics_config(config), layer_idx=index)

    def forward(
        self, x: torch.Tensor, media: torch.Tensor, media_mask: torch.Tensor, has_media: torch.Tensor
    ) -> torch.Tensor:
        if not is_block_mask(media_mask):  # a BlockMask goes to the flex kernel as it is
            media_mask = torch.where(
                media_mask, torch.zeros((), dtype=x.dtype, device=x.device), torch.finfo(x.dtype).min
            )
        return super().forward(
            x,
            image_hidden_states=media,
            image_attention_mask=media_mask,
            cross_attention_gate=has_media.squeeze(-1).to(x.dtype),
        )


def idefics_layout(model: torch.nn.Module):
    """IDEFICS (HuggingFaceM4/idefics-9b, -80b; transformers' IdeficsForVisionText2Text): in the
    `idefics` param layout our names are the published ones; the added-token tables hold 2 rows there."""
    from mmtrain.models.weights import PublishedLayout

    if model.config.param_layout != "idefics":
        return None
    decoder_prefix = PARAM_LAYOUTS["idefics"]["decoder"]
    return PublishedLayout(
        name="idefics",
        resizable_rows=frozenset({f"{decoder_prefix}.embed_tokens.additional_embedding.weight", "lm_head.additional_fc.weight"}),
        hf_config=_idefics_hf_config,
        hf_model_class="IdeficsForVisionText2Text",
    )


def _idefics_hf_config(model: torch.nn.Module):
    """transformers' IdeficsConfig for the model; refuses what IdeficsForVisionText2Text cannot express."""
    config = model.config
    problems = []
    required = {
        "cross_attn_style": (config.cross_attn_style, "idefics"),
        "perceiver.style": (config.perceiver.style, "idefics"),
        "vision.tower": (config.vision.tower, "idefics_clip"),
        "cross_attn_placement": (config.cross_attn_placement, "before_i%n"),
    }
    problems += [f"{key} is {value!r}, IDEFICS needs {want!r}" for key, (value, want) in required.items() if value != want]
    dec = config.decoder
    if config.cross_attn_num_heads != dec.num_attention_heads:
        problems.append(f"cross_attn_num_heads {config.cross_attn_num_heads} != decoder.num_attention_heads "
                        f"{dec.num_attention_heads} (IDEFICS has one head count)")
    if dec.num_key_value_heads != dec.num_attention_heads:
        problems.append(f"decoder.num_key_value_heads {dec.num_key_value_heads} != num_attention_heads (IDEFICS has no GQA)")
    if problems:
        raise ValueError(f"{model.flavour}: cannot be written as IDEFICS: " + "; ".join(problems))
    hf = idefics_config(config)
    ids = model.token_ids
    hf.bos_token_id, hf.eos_token_id, hf.pad_token_id = ids.get("bos"), ids.get("eos"), ids.get("pad")
    hf.use_cache = True
    hf.architectures = ["IdeficsForVisionText2Text"]
    return hf
