"""Preemption with real signals on two independent ranks (no launcher agent, as srun starts them):
SIGUSR1 to one rank, later SIGTERM to both. Every rank stops after the same step, saves its part
of one complete checkpoint there, exits with PREEMPTED_EXIT_CODE; resume=auto continues from it."""

import json
import os
import signal

import pytest
from helpers import TINY_RECIPE, data_overrides, start_independent_ranks, wait_for_metrics_step

from mmtrain.engine import checkpoint
from mmtrain.engine.preemption import PREEMPTED_EXIT_CODE

pytestmark = pytest.mark.dist

ARGS = [
    "train.max_steps=500",  # never reached: only the signals end these runs
    "train.micro_batch_size=4",
    "train.global_batch_size=8",
    "optim.warmup_steps=1",
    "data.eval_path=null",
    "checkpoint.every_steps=0",
    "resume=auto",
]


def _run_until_signalled(cmd, log_dir, run_dir, min_step, signals):
    """Start both ranks, wait for step `min_step`, send signals[rank] to the ranks that have one;
    return the exit codes and the ranks' logs."""
    os.makedirs(log_dir)
    procs = start_independent_ranks(2, cmd, log_dir)
    try:
        wait_for_metrics_step(run_dir, min_step, procs)
        for rank, sig in signals.items():
            procs[rank].send_signal(sig)
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    logs = "".join(open(os.path.join(log_dir, f"rank{r}.log")).read()[-3000:] for r in (0, 1))
    return codes, logs


def _steps_and_latest(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        steps = [json.loads(line)["step"] for line in f]
    latest = checkpoint.latest_checkpoint(os.path.join(run_dir, "checkpoints"))
    return steps, latest


def test_sigusr1_to_one_rank_then_sigterm_to_all_save_exit_75_and_resume(shapes_data, tmp_path):
    root = str(tmp_path)
    run_dir = os.path.join(root, "preempt")
    cmd = ["-m", "mmtrain.train", TINY_RECIPE, *data_overrides(shapes_data, root, "preempt"), *ARGS]

    # A user's kill of rank 1 alone: both ranks stop at the same step boundary.
    codes, logs = _run_until_signalled(cmd, os.path.join(root, "logs1"), run_dir, 2, {1: signal.SIGUSR1})
    assert codes == [PREEMPTED_EXIT_CODE] * 2, logs
    steps, latest = _steps_and_latest(run_dir)
    first_stop = steps[-1]
    assert steps == list(range(1, first_stop + 1))
    assert latest == os.path.join(run_dir, "checkpoints", checkpoint.step_dir_name(first_stop))
    assert os.path.isfile(os.path.join(latest, checkpoint.COMPLETE))
    assert {"rank_00000.pt", "rank_00001.pt"} <= set(os.listdir(latest))
    log = open(os.path.join(run_dir, "train.log")).read()
    assert f"preempted (rank 1: SIGUSR1): saved step {first_stop}, exiting with {PREEMPTED_EXIT_CODE}" in log

    # The requeued job: resume=auto continues from that checkpoint; then Slurm's SIGTERM to every rank.
    codes, logs = _run_until_signalled(cmd, os.path.join(root, "logs2"), run_dir, first_stop + 2,
                                       {0: signal.SIGTERM, 1: signal.SIGTERM})
    assert codes == [PREEMPTED_EXIT_CODE] * 2, logs
    steps, latest = _steps_and_latest(run_dir)
    second_stop = steps[-1]
    assert second_stop >= first_stop + 2
    assert steps == list(range(1, second_stop + 1))  # continued at first_stop + 1, no step twice
    assert latest.endswith(checkpoint.step_dir_name(second_stop))
    assert os.path.isfile(os.path.join(latest, checkpoint.COMPLETE))
    log = open(os.path.join(run_dir, "train.log")).read()
    assert f"resumed from {os.path.join(run_dir, 'checkpoints', checkpoint.step_dir_name(first_stop))}" in log
    assert f"SIGTERM): saved step {second_stop}" in log
