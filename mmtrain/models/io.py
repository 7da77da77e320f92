"""Save and load a model directory: weights (`model.safetensors`, or shards with
`model.safetensors.index.json`) + `mmtrain_model.json`.

The JSON holds `model.config_dict()`: family, flavour, the complete config and the token ids,
which is everything needed to rebuild the module before loading the weights. The weights are in
mmtrain's parameter names (`save_pretrained`) or in the family's published layout
(`mmtrain export --layout published`, see :mod:`mmtrain.models.weights`); `load_pretrained`
reads both, one tensor at a time.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Union

import torch
from torch import nn

from mmtrain.models.registry import model_from_config_dict
from mmtrain.models.weights import (
    DEFAULT_MAX_SHARD_BYTES,
    MMTRAIN_CONFIG_NAME,
    WEIGHTS_NAME,
    WriteEntry,
    load_weights,
    write_sharded,
)

CONFIG_NAME = MMTRAIN_CONFIG_NAME

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "load_pretrained", "save_pretrained"]


def save_pretrained(
    state_dict: Mapping[str, torch.Tensor],
    config_dict: Mapping[str, Any],
    out_dir: Union[str, Path],
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write the weights and config into `out_dir` (created); returns `out_dir`.

    `state_dict` must be complete (under ZeRO-3: gathered, e.g. from the engine's 16-bit
    gather) and is written as given, dtype included, one tensor at a time (`state_dict` may be
    lazy: any mapping whose values are tensors, or objects with `shape`, `dtype` and
    `contiguous()`). Every file is written to a temporary name and renamed, so a crash never
    leaves a half-written file under the final name.
    """
    out_dir = Path(out_dir)
    entries = [
        WriteEntry(key=name, source=name, shape=tuple(int(d) for d in tensor.shape), dtype=tensor.dtype)
        for name, tensor in state_dict.items()
    ]
    fetch: Callable[[str], torch.Tensor] = lambda name: _materialise(state_dict[name])  # noqa: E731
    write_sharded(out_dir, entries, fetch, max_shard_bytes)
    text = json.dumps(dict(config_dict), indent=2, sort_keys=True) + "\n"
    tmp = out_dir / (CONFIG_NAME + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, out_dir / CONFIG_NAME)
    return out_dir


def load_pretrained(model_dir: Union[str, Path], dtype: torch.dtype = torch.float32) -> nn.Module:
    """Rebuild the model described by `mmtrain_model.json` and load its weights; eval mode, `dtype`.

    Missing, unexpected or mis-shaped weights are an error listing them.
    """
    model_dir = Path(model_dir)
    config_dict = json.loads((model_dir / CONFIG_NAME).read_text())
    model = model_from_config_dict(config_dict)
    load_weights(model, model_dir)
    return model.to(dtype).eval()


def _materialise(tensor: Any) -> torch.Tensor:
    return tensor if isinstance(tensor, torch.Tensor) else tensor.contiguous()
