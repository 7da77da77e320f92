"""Kill and resume: a 2-rank ZeRO-3 run on CPU, SIGKILLed (torchrun and every rank, as one process
group) at chosen moments, restarted with resume=auto each time, ends with the per-step losses and
exported weights of an uninterrupted run, bit for bit.

Kill points, picked by polling the run directory (deterministic, no sleeps):
  1. once metrics.jsonl holds 3 steps: step 3 is logged but only step 2 is checkpointed, so the
     resumed run trains step 3 again and metrics.jsonl must drop the stale record;
  2. while a checkpoint is being written (its step_X.partial directory exists);
  3. right after `latest` moves to a new checkpoint.
"""

import json
import os
import time

import pytest
import torch
from helpers import TINY_RECIPE, data_overrides, descendants, kill_ranks, run_ranks, start_ranks

from mmtrain.engine import checkpoint

pytestmark = pytest.mark.dist

MAX_STEPS = 8
SMALL = [
    f"train.max_steps={MAX_STEPS}",
    "train.micro_batch_size=4",
    "train.global_batch_size=8",
    "train.log_every_steps=1",
    "optim.warmup_steps=1",
    "checkpoint.every_steps=2",
    "checkpoint.keep_last=2",
    "data.eval_path=null",
    "resume=auto",
]
POLL_S = 0.002
RUN_TIMEOUT_S = 400


def _args(paths, root, name):
    return ["-m", "mmtrain.train", TINY_RECIPE, *data_overrides(paths, root, name), *SMALL]


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _export(run_dir, out):
    from safetensors.torch import load_file

    from mmtrain.engine.export import export

    export(run_dir, out)
    return load_file(os.path.join(out, "model.safetensors"))


def _num_metric_lines(run_dir):
    try:
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            return sum(1 for line in f if line.endswith("\n"))
    except FileNotFoundError:
        return 0


def _partials(run_dir, since_ns=0):
    """.partial checkpoint directories created at or after since_ns (an earlier kill may have left one)."""
    root = os.path.join(run_dir, "checkpoints")
    found = []
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        try:
            if name.endswith(".partial") and os.stat(os.path.join(root, name)).st_ctime_ns >= since_ns:
                found.append(name)
        except FileNotFoundError:  # renamed or removed between listdir and stat
            pass
    return found


def _latest(run_dir):
    try:
        with open(os.path.join(run_dir, "checkpoints", "latest")) as f:
            return f.read().strip()
    except FileNotFoundError:
        return None


def _run_until_killed(paths, root, name, should_kill, log_path):
    """Start the run, poll until should_kill(run_dir) is true, SIGKILL torchrun and every rank and
    wait until all are gone. Fails if the run ends before the kill point."""
    run_dir = os.path.join(root, name)
    proc = start_ranks(2, _args(paths, root, name), log_path)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    # The ranks, found ahead of time so that the kill lands at once (kill_ranks' `known`).
    ranks, found_at = [], 0.0
    try:
        while not should_kill(run_dir):
            if proc.poll() is not None:
                with open(log_path) as f:
                    pytest.fail(f"run ended (exit {proc.returncode}) before the kill point: {f.read()[-3000:]}")
            assert time.monotonic() < deadline, "kill point not reached in time"
            if time.monotonic() - found_at > 1.0:
                ranks, found_at = descendants(proc.pid), time.monotonic()
            time.sleep(POLL_S)
    finally:
        kill_ranks(proc, known=tuple(ranks))
    return run_dir


@pytest.fixture(scope="module")
def reference_run(shapes_data, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("reference"))
    done = run_ranks(2, _args(shapes_data, root, "straight"), timeout_s=RUN_TIMEOUT_S)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return os.path.join(root, "straight")


def test_killed_three_times_matches_an_uninterrupted_run(reference_run, shapes_data, tmp_path):
    root, log = str(tmp_path), str(tmp_path / "runs.log")

    # 1. After 3 logged steps (checkpoint of step 2 complete, step 3 logged and not saved).
    run_dir = _run_until_killed(shapes_data, root, "killed", lambda d: _num_metric_lines(d) >= 3, log)
    assert checkpoint.latest_checkpoint(os.path.join(run_dir, "checkpoints")) is not None
    saved_step = int(checkpoint.read_trainer_state(checkpoint.resolve_checkpoint(run_dir))["step"])
    assert _num_metric_lines(run_dir) > saved_step  # records past the checkpoint, to be dropped on resume

    # 2. While a checkpoint after the resumed one is being written.
    started_ns = time.time_ns()
    run_dir = _run_until_killed(shapes_data, root, "killed", lambda d: _partials(d, started_ns), log)
    partial = _partials(run_dir, started_ns)
    assert partial, "the kill did not land inside a checkpoint write"
    # The half-written checkpoint is never taken: resume=auto picks the newest complete one.
    newest = checkpoint.latest_checkpoint(os.path.join(run_dir, "checkpoints"))
    assert os.path.basename(newest) < partial[0].removesuffix(checkpoint.PARTIAL_SUFFIX)
    with pytest.raises(checkpoint.CheckpointError, match="no COMPLETE marker"):
        checkpoint.resolve_checkpoint(os.path.join(run_dir, "checkpoints", partial[0]))

    # 3. Right after `latest` moves on.
    before = _latest(run_dir)
    run_dir = _run_until_killed(shapes_data, root, "killed", lambda d: (_latest(d) or "") > before, log)

    # The last restart runs to the end.
    done = run_ranks(2, _args(shapes_data, root, "killed"), timeout_s=RUN_TIMEOUT_S)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "dropped" in open(log).read() + done.stdout  # metrics.jsonl was rewound at least once

    straight, killed = _metrics(reference_run), _metrics(run_dir)
    assert [r["step"] for r in killed] == list(range(1, MAX_STEPS + 1))  # each step once, in order
    assert [r["loss"] for r in killed] == [r["loss"] for r in straight]
    assert [r["lr"] for r in killed] == [r["lr"] for r in straight]
    assert [r["grad_norm"] for r in killed] == [r["grad_norm"] for r in straight]
    assert _partials(run_dir) == []  # leftovers of killed saves are cleaned by the next save
    a = _export(reference_run, str(tmp_path / "export_straight"))
    b = _export(run_dir, str(tmp_path / "export_killed"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
