"""The Fuyu family (Fuyu-8B, OtterHD-8B) and its registered flavours.

The model code is imported here, eagerly: importing transformers inside DeepSpeed's
`zero.Init` context (which patches tensor constructors) fails, so a builder must not import
its model module lazily.
"""

from __future__ import annotations

from typing import Mapping

from mmtrain.models.fuyu.config import (
    ATTN_IMPLEMENTATIONS,
    FAMILY,
    FUYU_8B,
    FUYU_TINY,
    OTTERHD_8B,
    PARAM_GROUPS,
    FuyuConfig,
    bind_token_ids,
    image_spec,
)
from mmtrain.models.fuyu.model import FuyuForCausalLM, checkpoint_key
from mmtrain.models.registry import ModelSpec, register

__all__ = ["FuyuConfig", "FuyuForCausalLM", "checkpoint_key", "image_spec"]


def build_fuyu(name: str, config: FuyuConfig, token_ids: Mapping[str, int]) -> FuyuForCausalLM:
    """Registry builder: fill an empty vocabulary size from the token ids, then build with random weights."""
    return FuyuForCausalLM(bind_token_ids(config, token_ids), token_ids, flavour=name)


for _name, _config, _description in (
    ("fuyu-tiny", FUYU_TINY, "Fuyu layout at toy size (64 wide, 2 Persimmon layers, 30 px patches) for CPU tests"),
    ("fuyu-8b", FUYU_8B, "adept/fuyu-8b: 30 px patches → Linear(2700, 4096) → Persimmon-8B decoder (9.4B)"),
    ("otterhd-8b", OTTERHD_8B, "Otter-AI/OtterHD-8B: Fuyu-8B architecture and names, fully fine-tuned"),
):
    register(
        ModelSpec(
            name=_name,
            family=FAMILY,
            config=_config,
            builder=build_fuyu,
            image_spec=image_spec,
            param_groups=PARAM_GROUPS,
            attention_implementations=ATTN_IMPLEMENTATIONS,
            description=_description,
        )
    )
