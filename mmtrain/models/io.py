"""Save and load a model as `model.safetensors` + `mmtrain_model.json` (mmtrain's own layout).

The JSON holds `model.config_dict()`: family, flavour, the complete config and the token ids,
which is everything needed to rebuild the module before loading the weights. Export to the
published layouts (HF sharded safetensors, OpenFlamingo checkpoint.pt) is separate.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Union

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mmtrain.models.registry import model_from_config_dict

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "mmtrain_model.json"


def save_pretrained(
    state_dict: Mapping[str, torch.Tensor], config_dict: Mapping[str, Any], out_dir: Union[str, Path]
) -> Path:
    """Write the weights and config into `out_dir` (created); returns `out_dir`.

    `state_dict` must be complete (under ZeRO-3: gathered, e.g. from the engine's 16-bit
    gather) and is written as given, dtype included. Each file is written to a temporary name
    and renamed, so a crash never leaves a half-written file under the final name.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in state_dict.items()}
    _write_atomic(out_dir / WEIGHTS_NAME, lambda path: save_file(tensors, str(path), metadata={"format": "pt"}))
    text = json.dumps(dict(config_dict), indent=2, sort_keys=True) + "\n"
    _write_atomic(out_dir / CONFIG_NAME, lambda path: path.write_text(text))
    return out_dir


def load_pretrained(model_dir: Union[str, Path], dtype: torch.dtype = torch.float32) -> nn.Module:
    """Rebuild the model described by `mmtrain_model.json` and load its weights; eval mode, `dtype`.

    Missing or unexpected weight names are an error listing them.
    """
    model_dir = Path(model_dir)
    config_dict = json.loads((model_dir / CONFIG_NAME).read_text())
    model = model_from_config_dict(config_dict)
    state_dict: Dict[str, torch.Tensor] = load_file(str(model_dir / WEIGHTS_NAME))
    result = model.load_state_dict(state_dict, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{model_dir / WEIGHTS_NAME} does not match the {config_dict['flavour']!r} model: "
            f"missing {sorted(result.missing_keys)}, unexpected {sorted(result.unexpected_keys)}"
        )
    return model.to(dtype).eval()


def _write_atomic(path: Path, write) -> None:
    tmp_path = path.with_name(path.name + ".tmp")
    write(tmp_path)
    os.replace(tmp_path, path)
