"""Single-process work on exported models: evaluation and parameter counts (no process group)."""

from __future__ import annotations

import os
from typing import Dict, Optional, Tuple

import torch
from omegaconf import OmegaConf

from mmtrain.data.stream import iter_eval_prompts
from mmtrain.data.tokenizer import TokenIds, load_tokenizer
from mmtrain.engine.evaluate import evaluate
from mmtrain.models.io import load_pretrained
from mmtrain.models.registry import ModelSpec, build_model, get_spec


def _training_data_settings(model_dir: str) -> Dict:
    """Template and sequence limits the model was trained with (export copies the run's recipe)."""
    path = os.path.join(model_dir, "train_config.yaml")
    if not os.path.isfile(path):
        return {}
    data = OmegaConf.load(path).get("data", {})
    return {k: data[k] for k in ("template", "max_seq_tokens", "max_images", "max_frames") if k in data}


def eval_exported(model_dir: str, data_dir: str, max_samples: int, max_new_tokens: int,
                  template: Optional[str] = None) -> Dict:
    model = load_pretrained(model_dir)
    settings = {"template": "simple", "max_seq_tokens": 2048, "max_images": 5, **_training_data_settings(model_dir)}
    if template is not None:
        settings["template"] = template
    tokenizer = load_tokenizer(os.path.join(model_dir, "tokenizer"), settings["template"])
    token_ids = TokenIds.from_tokenizer(tokenizer, settings["template"])
    spec = get_spec(model.config_dict()["flavour"])
    image_spec = spec.image_spec(model.config)
    prompts = iter_eval_prompts(data_dir, tokenizer, token_ids, image_spec, max_samples=max_samples, **settings)
    result = evaluate(model, prompts, tokenizer, stop_ids=[token_ids.end_of_chunk, token_ids.eos],
                      max_new_tokens=max_new_tokens, device=torch.device("cpu"))
    return {"accuracy": result["accuracy"], "num_samples": result["num_samples"], "examples": result["examples"]}


# Flavours whose vocabulary comes from their tokenizer are counted with their published vocabulary
# where the flavour names one (`published_vocab_size`), else with this one (as `mmtrain ls` says).
NOMINAL_VOCAB = 512


def nominal_token_ids(vocab: int) -> dict:
    base = vocab - 3
    return {"image": base, "end_of_chunk": base + 1, "answer": base + 2, "bos": 1, "eos": 2, "pad": 3,
            "base_vocab_size": base, "num_added_tokens": 3}


def flavour_nominal_token_ids(spec: ModelSpec) -> dict:
    """The token ids a flavour is counted with when no tokenizer is at hand (`mmtrain ls`, `mmtrain
    plan`): its published vocabulary where it names one, else NOMINAL_VOCAB's."""
    return nominal_token_ids(getattr(spec.config, "published_vocab_size", None) or NOMINAL_VOCAB + 3)


def count_params(spec: ModelSpec) -> Tuple[int, int]:
    """(total, trainable under the flavour's default `model.trainable`), counted on the meta device."""
    with torch.device("meta"):
        model = build_model(spec.name, {}, flavour_nominal_token_ids(spec))
    groups = model.param_groups()
    total = sum(p.numel() for params in groups.values() for _, p in params)
    default = spec.default_trainable if spec.default_trainable is not None else tuple(groups)
    trainable = sum(p.numel() for g in default if g in groups for _, p in groups[g])
    return total, trainable
