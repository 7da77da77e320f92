"""Topology change and unfreezing at resume, on real DeepSpeed ZeRO-3 (CPU, gloo).

A checkpoint saved by 2 ranks training [perceiver, cross_attn, new_tokens] resumes on 1 and on 4
ranks with the same fp32 masters, Adam moments and steps, bit for bit, and keeps training; resumed
with the decoder added to model.trainable, the old groups keep their state and the decoder alone
starts fresh (zero moments, step 0, fp32 master = its saved weight). The saved state is read from
the live 2-rank engine with DeepSpeed's own accessors, independently of mmtrain's conversion.
"""

import math
import os

import pytest
import torch
from helpers import TINY_RECIPE, data_overrides, run_ranks

from mmtrain.engine import reshard

pytestmark = pytest.mark.dist

PROBE = os.path.join(os.path.dirname(__file__), "optimizer_state_probe.py")
OLD_GROUPS = ["perceiver", "cross_attn", "new_tokens"]
SMALL = [
    "train.max_steps=6",
    "train.micro_batch_size=4",
    "train.global_batch_size=8",
    "train.log_every_steps=1",
    "optim.warmup_steps=1",
    "checkpoint.every_steps=2",
    "data.eval_path=null",
    "resume=auto",
    f"model.trainable=[{','.join(OLD_GROUPS)}]",
]


def _probe(paths, root, nproc, out, extra=(), flags=()):
    done = run_ranks(nproc, [PROBE, TINY_RECIPE, out, *data_overrides(paths, root, "topo"), *SMALL, *extra, *flags])
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return torch.load(out), done.stdout


@pytest.fixture(scope="module")
def saved(shapes_data, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("topology"))
    state, _ = _probe(shapes_data, root, 2, os.path.join(root, "saved.pt"), ["train.stop_at_step=2"], ["--train"])
    assert state["step"] == 2 and state["world_size"] == 2
    return root, state


def _assert_same_state(saved_state, resumed, names):
    for name in names:
        for key, tensor in saved_state["params"][name].items():
            if key == "group":
                continue
            assert torch.equal(resumed["params"][name][key], tensor), (name, key)


# Resumed under optimizer offload with DeepSpeed's CPU Adam, which keeps its step counts as Python
# ints (the checkpoint's AdamW keeps float tensors).
OFFLOAD_CPU_ADAM = ["deepspeed.offload_optimizer=true", "deepspeed.offload_adam=deepspeed_cpu_adam"]


@pytest.mark.parametrize("nproc,extra", [(1, []), (4, ["train.micro_batch_size=2"]), (1, OFFLOAD_CPU_ADAM)],
                         ids=["2to1", "2to4", "2to1-offload-cpu-adam"])
def test_resume_on_another_world_size_keeps_the_optimizer_state(saved, shapes_data, nproc, extra):
    root, before = saved
    after, log = _probe(shapes_data, root, nproc, os.path.join(root, f"w{nproc}.pt"), extra, ["--then-steps", "2"])
    assert after["world_size"] == nproc and after["step"] == 2
    assert set(after["params"]) == set(before["params"])
    _assert_same_state(before, after, before["params"])  # masters + moments (trained), weights (frozen)
    assert after["groups"] == before["groups"]  # Adam step and learning rate of every group
    assert len(after["losses"]) == 2 and all(math.isfinite(loss) for loss in after["losses"])
    # The data cursor cannot map onto another split of the shards: a fresh epoch, logged.
    assert {pos["epoch"] for w in after["data"]["workers"] for pos in w["sources"].values()} == {1}
    assert "restarts at a fresh epoch" in log
    # The conversion is cached inside the checkpoint, complete.
    assert os.path.isfile(os.path.join(root, "topo", "checkpoints", "step_0000002", reshard.FREE_DIR, "COMPLETE"))


def test_resume_under_another_host_adamw_keeps_the_optimizer_state(saved, shapes_data):
    """Same world size, so DeepSpeed loads its own checkpoint: the states of torch's AdamW go into
    DeepSpeed's CPU Adam under offload, and training steps on from them. (The conversion of step
    counts and group keys is checked against both optimizers in tests/unit/test_engine_parts.py.)"""
    root, before = saved
    after, log = _probe(shapes_data, root, 2, os.path.join(root, "cpu_adam.pt"), OFFLOAD_CPU_ADAM, ["--then-steps", "2"])
    assert after["world_size"] == 2 and after["step"] == 2
    assert "AdamW (cpu_adam)" in log
    _assert_same_state(before, after, before["params"])
    assert after["groups"] == before["groups"]
    assert len(after["losses"]) == 2 and all(math.isfinite(loss) for loss in after["losses"])


def test_unfreezing_at_resume_gives_fresh_state_to_that_group_alone(saved, shapes_data):
    root, before = saved
    after, _ = _probe(shapes_data, root, 2, os.path.join(root, "unfrozen.pt"),
                      [f"model.trainable=[{','.join(OLD_GROUPS + ['decoder'])}]"], ["--then-steps", "2"])
    decoder = [n for n, state in after["params"].items() if state["group"] == "decoder"]
    assert decoder and all("weight" in before["params"][n] for n in decoder)  # frozen when saved
    newly_trained = [n for n in after["params"] if "fp32" in after["params"][n] and "fp32" not in before["params"][n]]
    assert sorted(newly_trained) == sorted(decoder)
    _assert_same_state(before, after, [n for n in before["params"] if "fp32" in before["params"][n]])
    for name in decoder:
        state = after["params"][name]
        assert torch.equal(state["fp32"], before["params"][name]["weight"].float()), name
        assert not state["exp_avg"].any() and not state["exp_avg_sq"].any(), name
    for group, row in after["groups"].items():
        expected = 0.0 if group.startswith("decoder") else before["groups"][group]["step"]
        assert row["step"] == expected, group
    assert all(math.isfinite(loss) for loss in after["losses"])
