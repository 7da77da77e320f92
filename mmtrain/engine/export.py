"""`mmtrain export`: a ZeRO checkpoint → a model directory, one tensor at a time.

    mmtrain export RUN_DIR --out DIR [--layout auto|published|mmtrain] [--dtype fp32|bf16] [--max-shard-size 5GB]

Layouts (see :mod:`mmtrain.models.weights`):

* `published` (IDEFICS flavours in the `idefics` param layout, Fuyu / OtterHD): HF sharded
  safetensors under the published checkpoint's keys (`model-0000X-of-0000N.safetensors` +
  `model.safetensors.index.json`, or one `model.safetensors`), transformers' `config.json` and the
  tokenizer files, so `IdeficsForVisionText2Text.from_pretrained(DIR)` /
  `FuyuForCausalLM.from_pretrained(DIR)` load it. The added-token tables are written whole, and
  `additional_vocab_size` says how many rows they hold.
* `mmtrain`: mmtrain's parameter names (every family).
* `auto` (default): `published` where the family has one, else `mmtrain`.

Both also hold mmtrain_model.json, tokenizer/ and train_config.yaml, so `mmtrain eval` and
`mmtrain.models.io.load_pretrained` reload either.

Runs offline in one process with no process group, on any machine whatever the number of ranks
that trained. The weights come from the ZeRO partitions on disk, tensor by tensor
(:class:`ZeroCheckpointTensors`): trainable parameters from their fp32 master partitions, frozen
ones from their saved 16-bit fragments. DeepSpeed 0.19's `get_fp32_state_dict_from_zero_checkpoint`
builds the whole fp32 state dict (the frozen parameters even in its `lazy_mode`: its model-state
files are loaded without mmap and `_zero3_merge_frozen_params` concatenates every frozen parameter
up front; `convert_zero_checkpoint_to_fp32_state_dict(max_shard_size=...)` then holds one output
shard, 5 GB by default, at a time). Here both files are memory-mapped (`torch.load(mmap=True)`):
trainable parameters go through DeepSpeed's own lazy `GatheredTensor` over the mmapped fp32
partitions, frozen ones are concatenated from the mmapped fragments when asked for. The process
holds one tensor (plus its dtype conversion) in anonymous memory; the pages of the checkpoint it
has touched are file-backed page cache (shown in RSS as RssFile, dropped under memory pressure).
ZeRO stages 1-2 fall back to DeepSpeed's full reconstruction.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Callable, Dict, List, Optional

import torch

from mmtrain.engine.checkpoint import resolve_checkpoint
from mmtrain.models.weights import (
    DEFAULT_MAX_SHARD_BYTES,
    available_layouts,
    export_model,
    format_keys,
    full_shape,
    meta_model,
    parse_size,
)

EXPORT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
EXPORT_LAYOUTS = ("auto", "published", "mmtrain")


class ZeroCheckpointTensors:
    """The full fp32 (trainable) or saved-dtype (frozen) tensor of any parameter of a ZeRO
    checkpoint, built when asked for (see the module docstring)."""

    def __init__(self, ckpt_dir: str):
        from mmtrain.engine.distributed import choose_deepspeed_accelerator

        # Not prepare_environment: export runs in any process (a test's, a notebook's) and must
        # not leave a world of one (RANK, MASTER_PORT, ...) in its environment for what it starts next.
        choose_deepspeed_accelerator()
        from deepspeed.checkpoint.constants import FROZEN_PARAM_FRAGMENTS, FROZEN_PARAM_SHAPES, PARAM_SHAPES
        from deepspeed.utils import zero_to_fp32 as z

        self.ckpt_dir = ckpt_dir
        model_files = z.get_model_state_files(ckpt_dir)
        states = [torch.load(f, map_location="cpu", mmap=True, weights_only=False) for f in model_files]
        zero_stage, world_size, flat_groups, _ = z.parse_optim_states(z.get_optim_files(ckpt_dir), ckpt_dir)
        self.zero_stage, self.world_size = zero_stage, world_size
        self._getters: Dict[str, Callable[[], torch.Tensor]] = {}
        self._shapes: Dict[str, torch.Size] = {}
        if zero_stage != 3:
            # Stages 1-2 keep flat fp32 groups whose per-parameter padding only DeepSpeed's own merge
            # knows; it materialises the whole state dict (the documented limit).
            root, tag = os.path.split(os.path.normpath(ckpt_dir))
            full = z.get_fp32_state_dict_from_zero_checkpoint(root, tag=tag, exclude_frozen_parameters=False)
            for name, tensor in full.items():
                self._add(name, tensor.shape, lambda t=tensor: t)
            return
        self._states = states  # keeps the mmapped fragments alive

        frozen_shapes = states[0].get(FROZEN_PARAM_SHAPES) or {}
        for name, shape in frozen_shapes.items():
            fragments = [state[FROZEN_PARAM_FRAGMENTS][name] for state in states]
            self._add(name, shape, lambda f=fragments, s=shape: torch.cat(f, 0).narrow(0, 0, s.numel()).view(s))

        # The trainable parameters, as DeepSpeed's _zero3_merge_trainable_params lays them out: each
        # rank's flat fp32 groups hold ceil(numel / world) elements of every parameter, in order.
        param_shapes = {name: shape for group in states[0][PARAM_SHAPES] for name, shape in group.items()}
        group_offsets = [0]
        for flat in flat_groups[0]:
            group_offsets.append(group_offsets[-1] + flat.numel())
        offset = 0
        for name, shape in param_shapes.items():
            partitioned_numel, _ = z.zero3_partitioned_param_info(shape.numel(), world_size)
            lazy = z.GatheredTensor(flat_groups, group_offsets, offset, partitioned_numel, shape)
            self._add(name, shape, lazy.contiguous)
            offset += partitioned_numel
        if offset != group_offsets[-1]:
            raise ValueError(f"{ckpt_dir}: the fp32 partitions hold {group_offsets[-1]} elements per rank, "
                             f"the parameters {offset}; the checkpoint is not what DeepSpeed 0.19 writes")
        for alias, target in states[0].get("shared_params", {}).items():
            if target in self._getters:
                self._add(alias, self._shapes[target], self._getters[target])

    def _add(self, name: str, shape, getter: Callable[[], torch.Tensor]) -> None:
        self._getters[name] = getter
        self._shapes[name] = torch.Size(shape)

    def __contains__(self, name: str) -> bool:
        return name in self._getters

    def names(self) -> List[str]:
        return list(self._getters)

    def shape(self, name: str) -> torch.Size:
        return self._shapes[name]

    def get(self, name: str) -> torch.Tensor:
        return self._getters[name]()


def export(path: str, out_dir: str, dtype: str = "fp32", layout: str = "auto",
           max_shard_size: Optional[str] = None) -> str:
    """Export the newest complete checkpoint under `path` (a run dir or a checkpoint dir); returns it."""
    if layout not in EXPORT_LAYOUTS:
        raise ValueError(f"layout {layout!r} is not one of {list(EXPORT_LAYOUTS)}")
    ckpt_dir = resolve_checkpoint(path)
    with open(os.path.join(ckpt_dir, "mmtrain_model.json")) as f:
        config_dict = json.load(f)
    model = meta_model(config_dict)  # names, shapes and config; no memory
    if layout == "auto":
        layout = available_layouts(model)[0]
    elif layout not in available_layouts(model):
        raise ValueError(f"{config_dict['flavour']!r} has no published layout (its family names no transformers "
                         "class to load it); use layout 'mmtrain' or 'auto'")
    source = ZeroCheckpointTensors(ckpt_dir)
    problems = []
    for name, param in model.named_parameters():
        if name not in source:
            problems.append(f"{name} (missing)")
        elif tuple(source.shape(name)) != full_shape(param):
            problems.append(f"{name} {list(source.shape(name))} vs model {list(full_shape(param))}")
    if problems:
        raise ValueError(f"{ckpt_dir} does not hold the {config_dict['flavour']!r} model of its mmtrain_model.json: "
                         f"{format_keys(problems)}")
    max_shard_bytes = parse_size(max_shard_size) if max_shard_size else DEFAULT_MAX_SHARD_BYTES
    summary = export_model(out_dir, model, source.get, layout=layout, dtype=EXPORT_DTYPES[dtype],
                           max_shard_bytes=max_shard_bytes)
    run_dir = os.path.dirname(os.path.dirname(os.path.normpath(ckpt_dir)))
    tokenizer_dir = os.path.join(run_dir, "tokenizer")
    if os.path.isdir(tokenizer_dir):
        # tokenizer/ for `mmtrain eval`; beside the weights too for a published layout, where
        # transformers' AutoTokenizer / AutoProcessor look for it.
        shutil.copytree(tokenizer_dir, os.path.join(out_dir, "tokenizer"), dirs_exist_ok=True)
        if layout == "published":
            for name in os.listdir(tokenizer_dir):
                if os.path.isfile(os.path.join(tokenizer_dir, name)):
                    shutil.copyfile(os.path.join(tokenizer_dir, name), os.path.join(out_dir, name))
    # The recipe tells `mmtrain eval` which template and sequence limits the model was trained with.
    shutil.copyfile(os.path.join(ckpt_dir, "config.yaml"), os.path.join(out_dir, "train_config.yaml"))
    with open(os.path.join(out_dir, "export.json"), "w") as f:
        json.dump({"checkpoint": os.path.abspath(ckpt_dir), "dtype": dtype, **summary}, f, indent=1)
    return ckpt_dir
