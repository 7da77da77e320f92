"""The three local launchers, for real on CPU with the tiny recipe for two steps: plain `python -m
mmtrain.train`, torchrun with two ranks, and DeepSpeed's launcher, both on one node (`--num_gpus`,
which on a CPU host is the number of rank processes) and as two "nodes" of one hostfile started
on this host with `--no_ssh --node_rank` (the multi-node hostfile path minus ssh, which cannot
run here). The deepspeed launcher appends `--local_rank=N`; the plain run passes `--local_rank 0`
in the other spelling. Same world, same seed → the two-rank launchers must agree on the losses."""

import json
import math
import os
import re
import subprocess
import sys

import pytest
from helpers import REPO, TINY_RECIPE, data_overrides, run_ranks

from mmtrain.engine.distributed import free_port
from mmtrain.train import without_local_rank

pytestmark = pytest.mark.dist

TWO_STEPS = [
    "train.max_steps=2",
    "train.micro_batch_size=2",
    "train.global_batch_size=4",
    "optim.warmup_steps=1",
    "checkpoint.every_steps=0",
    "data.eval_path=null",
    "resume=none",
]
LAUNCH_TIMEOUT_S = 600


def _train_args(paths, root, name):
    return [TINY_RECIPE, *data_overrides(paths, root, name), *TWO_STEPS]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}


def _deepspeed_launcher():
    """The `deepspeed` script next to this interpreter, else DeepSpeed's runner module (the same code)."""
    script = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    return [script] if os.path.exists(script) else [sys.executable, "-m", "deepspeed.launcher.runner"]


def _check_run(run_dir, world_size, output=""):
    """Two finite steps at the expected world size, and a complete final checkpoint. Returns the losses."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == [1, 2], output[-3000:]
    assert all(math.isfinite(r["loss"]) for r in rows)
    with open(os.path.join(run_dir, "train.log")) as f:
        assert f"world {world_size} |" in f.read()
    assert os.path.exists(os.path.join(run_dir, "checkpoints", "step_0000002", "COMPLETE"))
    return [r["loss"] for r in rows]


def _assert_ok(done):
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]


@pytest.fixture(scope="module")
def torchrun_losses(shapes_data, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("torchrun"))
    done = run_ranks(2, ["-m", "mmtrain.train", *_train_args(shapes_data, root, "torchrun")])
    _assert_ok(done)
    return _check_run(os.path.join(root, "torchrun"), 2, done.stdout)


def test_local_rank_argument_is_dropped_in_both_spellings():
    rest = ["recipes/x.yaml", "a.b=1"]
    assert without_local_rank(["--local_rank=3", *rest]) == rest
    assert without_local_rank(["--local_rank", "3", *rest]) == rest
    assert without_local_rank([*rest, "--local-rank", "0"]) == rest
    assert without_local_rank(["--local-rank=0", *rest]) == rest


def test_plain_python_is_a_world_of_one(shapes_data, tmp_path):
    """Also the trainer's side of data.image_decode=device: its JPEGs decoded by the training process
    (on the CPU here), after the loader worker read and packed them."""
    root = str(tmp_path)
    cmd = [sys.executable, "-m", "mmtrain.train", "--local_rank", "0", *_train_args(shapes_data, root, "plain"),
           "data.image_decode=device", "data.num_workers=1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S, env=_env(), cwd=REPO)
    _assert_ok(done)
    run_dir = os.path.join(root, "plain")
    _check_run(run_dir, 1, done.stdout)
    with open(os.path.join(run_dir, "train.log")) as f:
        log = f.read()
    assert "JPEG decoding on cpu (libjpeg through torchvision), the rest in the workers" in log
    share = re.search(r"data: (\d+) of the first batch's (\d+) images decoded on cpu", log)
    assert share and int(share.group(1)) == int(share.group(2)) > 0, log[-3000:]  # the demo's images are all JPEGs
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert all(r["images"] > 0 and r["skipped_samples"] == {} for r in rows)


def test_torchrun_two_ranks(torchrun_losses):
    assert len(torchrun_losses) == 2


def test_deepspeed_launcher_one_node(shapes_data, tmp_path, torchrun_losses):
    root, port = str(tmp_path), free_port()
    cmd = [*_deepspeed_launcher(), "--num_nodes", "1", "--num_gpus", "2", "--master_port", str(port),
           "--module", "mmtrain.train", *_train_args(shapes_data, root, "ds")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S, env=_env(), cwd=REPO)
    _assert_ok(done)
    assert "--local_rank=1" in done.stdout + done.stderr  # the launcher did append it
    losses = _check_run(os.path.join(root, "ds"), 2, done.stdout)
    assert losses == pytest.approx(torchrun_losses, rel=1e-3)
    # DeepSpeed's shared-memory all-reduce segments (one per rank under this launcher) are gone.
    left = [n for n in os.listdir("/dev/shm") if n.startswith("deepspeed_allreduce_buffer") and f"_{port}_" in n]
    assert left == []


def test_deepspeed_hostfile_two_nodes_without_ssh(shapes_data, tmp_path, torchrun_losses):
    """Each "node" is one launcher invocation naming its --node_rank, as on hosts without
    passwordless ssh; the hostfile's host names are only labels then."""
    root = str(tmp_path)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    port = str(free_port())
    nodes = []
    for node_rank in (0, 1):
        cmd = [*_deepspeed_launcher(), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node_rank),
               "--master_addr", "127.0.0.1", "--master_port", port,
               "--module", "mmtrain.train", *_train_args(shapes_data, root, "ds_nodes")]
        nodes.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      env=_env(), cwd=REPO))
    outputs = []
    try:
        for node in nodes:
            outputs.append(node.communicate(timeout=LAUNCH_TIMEOUT_S)[0])
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    assert [n.returncode for n in nodes] == [0, 0], "\n----\n".join(o[-3000:] for o in outputs)
    assert "nnodes=2" in outputs[0] and "node_rank=1" in outputs[1]
    losses = _check_run(os.path.join(root, "ds_nodes"), 2, outputs[0])
    assert losses == pytest.approx(torchrun_losses, rel=1e-3)
