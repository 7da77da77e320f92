"""The demo's path at a smaller scale, through the command line: `mmtrain train --nproc 2`
(DeepSpeed ZeRO-3 on CPU), `mmtrain export`, `mmtrain eval`. The model must learn to read the
images: held-out accuracy well above what any image-blind guesser gets."""

import json
import os
import subprocess
import sys

import pytest
from helpers import REPO, TINY_RECIPE, data_overrides, make_shapes_dataset

from mmtrain.demo import image_blind_chance

pytestmark = pytest.mark.dist

NUM_TRAIN, NUM_EVAL = 2000, 150
STEPS = 250
MIN_ACCURACY = 0.8


def _cli(*args, timeout_s=900):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "mmtrain.cli", *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=timeout_s)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return done.stdout


def test_small_demo_learns_from_images(tmp_path):
    paths = make_shapes_dataset(str(tmp_path / "data"), NUM_TRAIN, NUM_EVAL)
    root = str(tmp_path / "runs")
    _cli("train", TINY_RECIPE, "--nproc", "2", *data_overrides(paths, root, "small"),
         f"train.max_steps={STEPS}", "checkpoint.every_steps=0", "eval.max_samples=50", "resume=none")
    run_dir = os.path.join(root, "small")
    with open(os.path.join(run_dir, "train.log")) as f:
        assert "world 2 |" in f.read()  # two ranks, as asked: ZeRO-3 partitioning really exercised
    with open(os.path.join(run_dir, "eval.jsonl")) as f:
        in_training = json.loads(f.readlines()[-1])
    export_dir = str(tmp_path / "export")
    _cli("export", run_dir, "--out", export_dir)
    result = json.loads(_cli("eval", export_dir, "--data", paths["eval"], "--max-samples", str(NUM_EVAL),
                             "--max-new-tokens", "6").strip().splitlines()[-1])
    chance = image_blind_chance(paths["raw_train"], paths["raw_eval"])
    assert chance <= 0.3
    assert result["num_samples"] == NUM_EVAL
    assert result["accuracy"] >= MIN_ACCURACY, (result, chance)
    # The in-training evaluation (2 ranks, ZeRO-3 partitioned weights) and the exported model agree.
    assert in_training["step"] == STEPS and in_training["num_samples"] == 50
