"""Jobs on a real Slurm (slurmctld + slurmd on this machine, see tests/cluster_fixtures.py): the
batch script's requeue mechanics, a tiny 2-rank training job submitted with `mmtrain submit slurm`,
and preemption: SIGUSR1 → save at a step boundary → exit 75 → requeue → resume to max_steps.

A requeued job is held by Slurm until its eligible time (about two minutes after the requeue, a
guard against requeue loops); the tests move that time to now with `scontrol update StartTime=now`
a few seconds after they have seen the job requeued (see _release_now), so they do not sit idle.
Nothing else is shortened."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
from cluster_fixtures import job_fields, wait_for_job
from helpers import REPO, TINY_RECIPE, data_overrides

from mmtrain.engine.preemption import PREEMPTED_EXIT_CODE
from mmtrain.submit import slurm

pytestmark = pytest.mark.dist

PROBE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "preempt_probe.py")
JOB_TIMEOUT_S = 600
TINY_FAST = [
    "train.micro_batch_size=4",
    "train.global_batch_size=8",
    "train.log_every_steps=1",
    "optim.warmup_steps=1",
    "data.eval_path=null",
]


def _requeued_and_pending(fields: dict) -> bool:
    return int(fields.get("Restarts", 0)) >= 1 and fields.get("JobState") == "PENDING"


def _completed(fields: dict) -> bool:
    return fields.get("JobState") == "COMPLETED"


# slurmd refuses a launch whose credential was created in the same second as (or before) the
# revocation of the job's previous credential at requeue ("Job credential revoked", the batch job
# killed as non-startable): Slurm's own two-minute hold avoids that, so a test that skips the hold
# must still let a few seconds pass.
CREDENTIAL_REVOKE_MARGIN_S = 3


def _release_now(job_id: str) -> None:
    time.sleep(CREDENTIAL_REVOKE_MARGIN_S)
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True, capture_output=True)


def _scancel(*args: str) -> None:
    subprocess.run(["scancel", *args], check=True, capture_output=True, timeout=60)


def _metrics(run_dir: str) -> list:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def _complete_checkpoints(run_dir: str) -> list:
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    return sorted(n for n in os.listdir(root) if os.path.exists(os.path.join(root, n, "COMPLETE")))


def _submit(partition: str, run_root: str, run_name: str, paths: dict, extra: list) -> dict:
    cmd = [sys.executable, "-m", "mmtrain.cli", "submit", "slurm", TINY_RECIPE, "--nodes", "1",
           "--gpus-per-node", "0", "--cpu-ranks-per-node", "2", "--partition", partition,
           *data_overrides(paths, run_root, run_name), *TINY_FAST, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture
def cancel_on_failure():
    """Jobs registered here are cancelled when the test ends, so a failure leaves the node free."""
    jobs = []
    yield jobs
    for job_id in jobs:
        subprocess.run(["scancel", job_id], capture_output=True)


def test_by_hand_script_requeues_on_the_preempted_exit_code(slurm_cluster, tmp_path, cancel_on_failure):
    """The mechanics alone, with launch/slurm/mmtrain.sbatch as a user submits it by hand: the
    training entry point is swapped for a probe rank that keeps the preemption contract."""
    script = open(os.path.join(REPO, "launch", "slurm", "mmtrain.sbatch")).read()
    assert script.count("-m mmtrain.train ") == 1
    probe_script = tmp_path / "probe.sbatch"
    probe_script.write_text(script.replace("-m mmtrain.train ", f"{PROBE} "))
    probe_log, out = str(tmp_path / "probe.log"), str(tmp_path / "slurm-%j.out")
    env = {**os.environ, "RANKS_PER_NODE": "2", "PYTHON": sys.executable}
    done = subprocess.run(["sbatch", "--parsable", f"--partition={slurm_cluster['partition']}", f"--output={out}",
                           f"--chdir={REPO}", str(probe_script), probe_log],
                          capture_output=True, text=True, env=env, check=True)
    job_id = done.stdout.strip().split(";")[0]
    cancel_on_failure.append(job_id)
    out = out.replace("%j", job_id)
    wait_for_job(job_id, lambda f: os.path.exists(probe_log) and open(probe_log).read().count("ready") == 2,
                 JOB_TIMEOUT_S, "both probe ranks ready", out)
    # --full: the batch shell gets it too and must survive it (it traps USR1).
    _scancel("--signal=USR1", "--full", job_id)
    wait_for_job(job_id, _requeued_and_pending, JOB_TIMEOUT_S, "requeued after SIGUSR1", out)
    _release_now(job_id)
    fields = wait_for_job(job_id, _completed, JOB_TIMEOUT_S, "requeued job completes", out)
    assert fields["Restarts"] == "1" and fields["ExitCode"] == "0:0"
    lines = open(probe_log).read().splitlines()
    assert sorted(line for line in lines if "signal" in line or "done" in line) == [
        "0 0 signal SIGUSR1", "0 1 signal SIGUSR1", "1 0 done", "1 1 done"]
    assert all(line.endswith(" resume=auto") for line in lines if " args " in line)
    log = open(out).read()
    assert f"exited {PREEMPTED_EXIT_CODE} (preempted); requeueing job {job_id}" in log
    assert "(restart 1)" in log and "step exited 0" in log


def test_tiny_training_job(slurm_cluster, shapes_data, tmp_path, cancel_on_failure):
    job = _submit(slurm_cluster["partition"], str(tmp_path / "runs"), "tiny", shapes_data, ["train.max_steps=3"])
    cancel_on_failure.append(job["job_id"])
    assert job["script"] == os.path.join(job["run_dir"], slurm.SCRIPT_NAME)
    fields = wait_for_job(job["job_id"], _completed, JOB_TIMEOUT_S, "tiny job completes", job["log"])
    assert fields["ExitCode"] == "0:0" and fields["NumTasks"] == "1"
    rows = _metrics(job["run_dir"])
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["samples"] == 8 and r["loss"] > 0 for r in rows)
    log = open(job["log"]).read()
    assert f"on 1 node(s) x 2 rank(s), rendezvous {slurm_cluster['host']}:" in log and "step exited 0" in log
    assert "world 2 |" in open(os.path.join(job["run_dir"], "train.log")).read()


def test_preempted_job_saves_requeues_and_continues(slurm_cluster, shapes_data, tmp_path, cancel_on_failure):
    max_steps, signal_after_step = 20, 3
    # checkpoint.every_steps=0: the only checkpoint before the end is the one the signal causes.
    job = _submit(slurm_cluster["partition"], str(tmp_path / "runs"), "preempt", shapes_data,
                  [f"train.max_steps={max_steps}", "checkpoint.every_steps=0", "checkpoint.keep_last=3"])
    job_id, run_dir, log_path = job["job_id"], job["run_dir"], job["log"]
    cancel_on_failure.append(job_id)
    wait_for_job(job_id, lambda f: any(r["step"] >= signal_after_step for r in _metrics(run_dir)),
                 JOB_TIMEOUT_S, f"training reaches step {signal_after_step}", log_path)
    _scancel("--signal=USR1", "--full", job_id)
    wait_for_job(job_id, _requeued_and_pending, JOB_TIMEOUT_S,
                 f"ranks save and exit {PREEMPTED_EXIT_CODE}, the script requeues the job", log_path)
    # Saved at a step boundary: one complete checkpoint, of the last step in metrics.jsonl, before the end.
    saved = _complete_checkpoints(run_dir)
    steps_before = [r["step"] for r in _metrics(run_dir)]
    assert len(saved) == 1, saved
    saved_step = int(saved[0].split("_")[-1])
    assert signal_after_step <= saved_step < max_steps and steps_before[-1] == saved_step, (saved, steps_before)
    shutil.copy(log_path, str(tmp_path / "first_attempt.out"))
    _release_now(job_id)
    fields = wait_for_job(job_id, _completed, JOB_TIMEOUT_S, "requeued job finishes", log_path)
    assert fields["Restarts"] == "1" and fields["ExitCode"] == "0:0"
    rows = _metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, max_steps + 1))
    assert _complete_checkpoints(run_dir)[-1] == f"step_{max_steps:07d}"
    log = open(log_path).read()
    assert f"requeueing job {job_id}" in log and "(restart 1)" in log
    train_log = open(os.path.join(run_dir, "train.log")).read()
    assert f"{saved[0]} at step {saved_step}" in train_log, train_log[-3000:]
    assert job_fields(job_id)["JobState"] == "COMPLETED"
