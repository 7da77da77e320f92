"""init_from on resume (mmtrain.engine.load.load_init_from) in one process: which weights a run
checkpoint holds, read from DeepSpeed's model-state files, and init_from reading only the others.
The 2-rank ZeRO-3 runs with real checkpoints are tests/dist/test_load_openflamingo.py."""

import json
import logging
import os

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from mmtrain.engine.checkpoint import COMPLETE
from mmtrain.engine.load import load_init_from, weights_in_checkpoint

ZERO3_STATES = "zero_pp_rank_0_mp_rank_00_model_states.pt"


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))


def _run_checkpoint(path, step, states, file_name=ZERO3_STATES):
    """A complete run checkpoint directory with one DeepSpeed model-state file (the parts read here)."""
    os.makedirs(path)
    torch.save(states, os.path.join(path, file_name))
    with open(os.path.join(path, "trainer_state.json"), "w") as f:
        json.dump({"step": step, "world_size": 1}, f)
    with open(os.path.join(path, COMPLETE), "w") as f:
        f.write(f"{step}\n")
    return str(path)


def _zero3_states(trainable, frozen, shared=None):
    """The keys of DeepSpeed 0.19's ZeRO-3 model-state file that say which weights it holds; the
    module state dict holds every name with an empty partition, so it says nothing."""
    return {
        "module": {name: torch.empty(0) for name in [*trainable, *(frozen or [])]},
        "param_shapes": [{name: torch.Size([2]) for name in trainable}],
        "frozen_param_shapes": {name: torch.Size([2]) for name in frozen} if frozen is not None else None,
        "frozen_param_fragments": {name: torch.zeros(1) for name in frozen} if frozen is not None else None,
        "shared_params": shared or {},
    }


def test_weights_in_checkpoint(tmp_path):
    zero3 = _run_checkpoint(tmp_path / "a", 2, _zero3_states(["0.weight"], ["1.weight"], {"tied": "0.weight"}))
    assert weights_in_checkpoint(zero3) == {"0.weight", "1.weight", "tied"}
    # Saved with exclude_frozen_parameters=True: no fragments, only the optimizer's parameters.
    without = _run_checkpoint(tmp_path / "b", 2, _zero3_states(["0.weight"], None))
    assert weights_in_checkpoint(without) == {"0.weight"}
    # ZeRO 0-2: whole tensors in the module state dict.
    whole = _run_checkpoint(tmp_path / "c", 2, {"module": {"0.weight": torch.ones(3, 4), "1.bias": torch.ones(3)}},
                            "mp_rank_00_model_states.pt")
    assert weights_in_checkpoint(whole) == {"0.weight", "1.bias"}
    os.makedirs(tmp_path / "d")
    with pytest.raises(FileNotFoundError, match=r"d: no DeepSpeed model-state file"):
        weights_in_checkpoint(str(tmp_path / "d"))


def test_resume_reads_only_what_the_checkpoint_lacks(tmp_path, caplog):
    source = _model()
    with torch.no_grad():
        for param in source.parameters():
            param.add_(1.0)
    init_from = str(tmp_path / "model.safetensors")
    save_file(dict(source.state_dict()), init_from)
    names = [name for name, _ in source.named_parameters()]
    log = logging.getLogger("test_init_from_resume")

    # Every weight held: init_from is not opened (its path is gone) and the model keeps its build.
    every = _run_checkpoint(tmp_path / "every", 6, _zero3_states(names[:2], names[2:]))
    model = _model()
    built = {k: v.clone() for k, v in model.state_dict().items()}
    with caplog.at_level(logging.INFO, logger="test_init_from_resume"):
        assert load_init_from(model, str(tmp_path / "gone.safetensors"), resume_from=every, log=log) is None
    assert "init_from skipped: the checkpoint at step 6" in caplog.text
    assert all(torch.equal(v, built[k]) for k, v in model.state_dict().items())

    # The frozen ones missing from the checkpoint: only they are read.
    held = names[:2]
    partial = _run_checkpoint(tmp_path / "partial", 4, _zero3_states(held, None))
    model = _model()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="test_init_from_resume"):
        plan = load_init_from(model, init_from, resume_from=partial, log=log)
    assert [entry.name for entry in plan.entries] == names[2:]
    assert f"holds 2 of {len(names)} parameters; reading the other {len(names) - 2}" in caplog.text
    got = dict(model.named_parameters())
    assert all(torch.equal(got[n], built[n]) for n in held)
    assert all(torch.equal(got[n], source.state_dict()[n]) for n in names[2:])

    # Starting fresh: everything.
    model = _model()
    assert len(load_init_from(model, init_from, log=log).entries) == len(names)
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in model.state_dict().items())

    # A resume checkpoint that cannot be read is an error naming it.
    os.remove(os.path.join(partial, ZERO3_STATES))
    with pytest.raises(ValueError, match=r"resume from .*partial: cannot tell which weights it holds"):
        load_init_from(_model(), init_from, resume_from=partial, log=log)
