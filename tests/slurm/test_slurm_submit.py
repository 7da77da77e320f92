"""`mmtrain submit slurm` without a cluster: the rendered script (one template, by hand and submitted),
the recipe checks before anything is written, and the node agent's handling of a preemption signal."""

import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import REPO, TINY_RECIPE, descendants

from mmtrain.cli import main as cli_main
from mmtrain.engine.preemption import PREEMPTED_EXIT_CODE
from mmtrain.submit import slurm
from mmtrain.submit.agent import is_preempted

PROBE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "preempt_probe.py")


def _after(text: str, marker: str) -> str:
    return text.split(marker + "\n", 1)[1]


def test_dry_run_writes_the_template_with_this_job_filled_in(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc = cli_main(["submit", "slurm", TINY_RECIPE, "--nodes", "2", "--gpus-per-node", "4", "--partition", "gpu",
                   "--time", "1:00:00", "--signal-lead-s", "120", "--sbatch-arg=--account=proj", "--dry-run",
                   "output_dir=runs", "run_name=r1", "train.micro_batch_size=4", "model.tokenizer=tok dir"])
    assert rc == 0
    out = capsys.readouterr().out
    run_dir = str(tmp_path / "runs" / "r1")
    script_path = os.path.join(run_dir, "slurm.sbatch")
    script = open(script_path).read()
    assert script in out and f"sbatch {script_path}" in out and "not submitted" in out
    header = [line[len("#SBATCH "):] for line in script.splitlines() if line.startswith("#SBATCH ")]
    assert header == [
        "--job-name=r1", "--nodes=2", "--ntasks-per-node=1", "--exclusive", "--requeue", "--open-mode=append",
        "--signal=USR1@120", f"--output={run_dir}/slurm-%j.out", f"--chdir={tmp_path}", "--gpus-per-node=4",
        "--partition=gpu", "--time=1:00:00", "--account=proj",
    ]
    settings = _after(script, slurm.SETTINGS_BEGIN).split(slurm.SETTINGS_END)[0]
    assert f"RANKS_PER_NODE=4\nPREEMPTED_EXIT_CODE={PREEMPTED_EXIT_CODE}\n" in settings
    assert f"MMTRAIN_ARGS=({TINY_RECIPE} output_dir=runs run_name=r1 train.micro_batch_size=4 'model.tokenizer=tok dir')" \
        in settings
    # One source of truth: the body below the settings is the template's, byte for byte, and the
    # by-hand script in launch/slurm is that same template.
    template = slurm.read_template()
    assert _after(script, slurm.SETTINGS_END) == _after(template, slurm.SETTINGS_END)
    by_hand = os.path.join(REPO, "launch", "slurm", "mmtrain.sbatch")
    assert os.path.samefile(by_hand, slurm.TEMPLATE_PATH)
    for text in (script, template):
        assert "--rdzv_backend c10d" in text and 'scontrol requeue "$SLURM_JOB_ID"' in text
        subprocess.run(["bash", "-n"], input=text, text=True, check=True)


def test_cpu_ranks_and_recipe_errors_come_before_any_file(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = ["submit", "slurm", TINY_RECIPE, "--dry-run", "output_dir=runs"]
    assert cli_main([*base, "--nodes", "1", "--gpus-per-node", "0", "--cpu-ranks-per-node", "2", "run_name=cpu"]) == 0
    script = open(tmp_path / "runs" / "cpu" / "slurm.sbatch").read()
    assert "RANKS_PER_NODE=2\n" in script and "#SBATCH --gpus-per-node" not in script
    capsys.readouterr()
    # 3 ranks cannot split the tiny recipe's global batch of 32 in micro-batches of 16.
    assert cli_main([*base, "--nodes", "3", "--gpus-per-node", "1", "run_name=odd"]) == 2
    assert "train.global_batch_size" in capsys.readouterr().err
    assert cli_main([*base, "--nodes", "1", "--gpus-per-node", "1", "run_name=nr", "resume=none"]) == 2
    assert "resume: a Slurm job always runs with resume=auto" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli_main([*base, "--nodes", "0", "--gpus-per-node", "1"])
    assert e.value.code == 2 and "--nodes: 0 is less than 1" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path / "runs")) == ["cpu"]


def test_render_names_a_broken_template():
    with pytest.raises(slurm.TemplateError, match="t.sbatch: missing '# mmtrain-settings-begin'"):
        slurm.render("#!/bin/bash\n#SBATCH --nodes=1\necho hi\n", [], {}, "t.sbatch")
    with pytest.raises(slurm.TemplateError, match="one block"):
        slurm.render("#SBATCH --nodes=1\necho\n#SBATCH --requeue\n", [], {}, "t.sbatch")


def test_preempted_means_saved_ranks_or_ranks_the_agent_stopped():
    assert is_preempted([PREEMPTED_EXIT_CODE, PREEMPTED_EXIT_CODE])
    assert is_preempted([PREEMPTED_EXIT_CODE, -signal.SIGTERM])
    assert not is_preempted([PREEMPTED_EXIT_CODE, 1])
    assert not is_preempted([-signal.SIGUSR1])


def _wait_for_lines(path: str, needle: str, count: int, proc, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if os.path.exists(path) and open(path).read().count(needle) >= count:
            return
        assert proc.poll() is None, f"agent exited {proc.returncode} early:\n{proc.stdout.read()[-3000:]}"
        time.sleep(0.2)
    raise AssertionError(f"{count} x {needle!r} not in {path} within {timeout_s} s")


def _start_agent(log_path: str, env: dict = None):
    cmd = [sys.executable, "-m", "mmtrain.submit.agent", "--standalone", "--nproc_per_node", "2", PROBE, log_path]
    return subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **(env or {})}, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _signal_tree(pid: int, sig: int) -> None:
    """What slurmstepd does to a step: the signal to the process and every descendant (torchrun puts
    each rank in a session of its own, so a process-group signal would miss them)."""
    for victim in [pid, *descendants(pid)]:
        try:
            os.kill(victim, sig)
        except ProcessLookupError:
            pass


def test_agent_survives_the_step_signal_and_exits_preempted(tmp_path):
    """Slurm signals every process of a step (agent and ranks); plain torchrun would die of SIGUSR1."""
    log_path = str(tmp_path / "probe.log")
    agent = _start_agent(log_path)
    try:
        _wait_for_lines(log_path, "ready", 2, agent)
        _signal_tree(agent.pid, signal.SIGUSR1)
        out, _ = agent.communicate(timeout=120)
    finally:
        if agent.poll() is None:
            _signal_tree(agent.pid, signal.SIGKILL)
    assert agent.returncode == PREEMPTED_EXIT_CODE, out[-3000:]
    assert open(log_path).read().count("signal SIGUSR1") == 2
    assert "got SIGUSR1" in out


def test_agent_reports_a_failed_rank_as_a_failure(tmp_path):
    agent = _start_agent(str(tmp_path / "probe.log"), env={"PROBE_EXIT_CODE": "3"})
    out, _ = agent.communicate(timeout=120)
    assert agent.returncode == 1, out[-3000:]
    assert "ranks failed with exit codes" in out
