"""`mmtrain export`: a ZeRO checkpoint → a model directory that `mmtrain eval` and
`mmtrain.models.io.load_pretrained` reload (model.safetensors, mmtrain_model.json, tokenizer).

Runs offline in one process with no process group: the fp32 weights are rebuilt from the ZeRO
partitions on disk (trainable parameters from their fp32 masters, frozen ones from their saved
fragments), so it works on any machine regardless of how many ranks trained the model.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Dict

import torch

from mmtrain.engine.checkpoint import resolve_checkpoint
from mmtrain.models.io import save_pretrained

EXPORT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _zero_state_dict(ckpt_dir: str) -> Dict[str, torch.Tensor]:
    from mmtrain.engine.distributed import prepare_environment

    prepare_environment()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    root, tag = os.path.split(os.path.normpath(ckpt_dir))
    return get_fp32_state_dict_from_zero_checkpoint(root, tag=tag, exclude_frozen_parameters=False)


def export(path: str, out_dir: str, dtype: str = "fp32") -> str:
    """Export the newest complete checkpoint under `path` (a run dir or a checkpoint dir)."""
    ckpt_dir = resolve_checkpoint(path)
    with open(os.path.join(ckpt_dir, "mmtrain_model.json")) as f:
        config_dict = json.load(f)
    state = {name: t.to(EXPORT_DTYPES[dtype]).contiguous() for name, t in _zero_state_dict(ckpt_dir).items()}
    save_pretrained(state, config_dict, out_dir)
    run_dir = os.path.dirname(os.path.dirname(os.path.normpath(ckpt_dir)))
    tokenizer_dir = os.path.join(run_dir, "tokenizer")
    if os.path.isdir(tokenizer_dir):
        shutil.copytree(tokenizer_dir, os.path.join(out_dir, "tokenizer"), dirs_exist_ok=True)
    # The recipe tells `mmtrain eval` which template and sequence limits the model was trained with.
    shutil.copyfile(os.path.join(ckpt_dir, "config.yaml"), os.path.join(out_dir, "train_config.yaml"))
    with open(os.path.join(out_dir, "export.json"), "w") as f:
        json.dump({"checkpoint": os.path.abspath(ckpt_dir), "dtype": dtype, "num_tensors": len(state)}, f, indent=1)
    return ckpt_dir
