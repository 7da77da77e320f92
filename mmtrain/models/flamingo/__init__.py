"""The Flamingo family (Otter / OpenFlamingo / IDEFICS) and its registered flavours.

The model code is imported here, eagerly: importing transformers inside DeepSpeed's
`zero.Init` context (which patches tensor constructors) fails, so a builder must not import
its model module lazily.
"""

from __future__ import annotations

from typing import Mapping

from mmtrain.models.flamingo.config import (
    CROSS_ATTN_KERNELS,
    DECODER_KERNELS,
    FAMILY,
    IDEFICS_9B,
    IDEFICS_80B,
    IDEFICS_TINY,
    OPENFLAMINGO_9B,
    OPENFLAMINGO_9B_LLAMA,
    OPENFLAMINGO_TINY_MPT,
    OTTER_9B,
    OTTER_9B_MPT,
    OTTER_TINY,
    PARAM_GROUPS,
    FlamingoConfig,
    bind_token_ids,
    image_spec,
)
from mmtrain.models.flamingo.model import FlamingoForCausalLM
from mmtrain.models.registry import ModelSpec, register


def build_flamingo(name: str, config: FlamingoConfig, token_ids: Mapping[str, int]):
    """Registry builder: fill the vocabulary sizes from the token ids, then build with random weights."""
    return FlamingoForCausalLM(bind_token_ids(config, token_ids), token_ids, flavour=name)


for _name, _config, _description in (
    ("otter-tiny", OTTER_TINY,
     "Otter/OpenFlamingo layout at toy size (32 px ViT, 4-layer LLaMA) for CPU tests and recipes"),
    ("openflamingo-tiny-mpt", OPENFLAMINGO_TINY_MPT,
     "openflamingo-9b's layout at toy size (32 px ViT, 4-layer MPT) for CPU tests"),
    ("openflamingo-9b", OPENFLAMINGO_9B,
     "openflamingo/OpenFlamingo-9B-vitl-mpt7b (v2): open_clip ViT-L/14 → perceiver → MPT-7B, xattn every 4 layers"),
    ("openflamingo-9b-llama", OPENFLAMINGO_9B_LLAMA,
     "openflamingo/OpenFlamingo-9B-deprecated (v1): open_clip ViT-L/14 → perceiver → LLaMA-7B"),
    ("otter-9b", OTTER_9B,
     "luodian/OTTER-9B-LA-InContext: HF CLIP ViT-L/14 → perceiver → LLaMA-7B (from OpenFlamingo v1)"),
    ("otter-9b-mpt", OTTER_9B_MPT,
     "luodian/OTTER-Image-MPT7B: HF CLIP ViT-L/14 → perceiver → MPT-7B"),
    ("idefics-tiny", IDEFICS_TINY,
     "IDEFICS layout and names at toy size (30 px ViT, 4-layer LLaMA) for CPU tests"),
    ("idefics-9b", IDEFICS_9B,
     "HuggingFaceM4/idefics-9b: CLIP ViT-H/14 → perceiver → LLaMA-7B, xattn before every 4th layer"),
    ("idefics-80b", IDEFICS_80B,
     "HuggingFaceM4/idefics-80b: CLIP ViT-H/14 → perceiver → LLaMA-65B, xattn before every 4th layer"),
):
    register(
        ModelSpec(
            name=_name,
            family=FAMILY,
            config=_config,
            builder=build_flamingo,
            image_spec=image_spec,
            param_groups=PARAM_GROUPS,
            default_trainable=("perceiver", "cross_attn", "new_tokens"),  # Otter's and IDEFICS' recipe
            attention_implementations=DECODER_KERNELS[_config.decoder.kind],
            cross_attention_implementations=CROSS_ATTN_KERNELS,
            sdpa_dense_bias=_config.decoder.kind == "mpt",
            description=_description,
        )
    )
