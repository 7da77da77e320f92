"""Helpers shared by the dist and e2e tests: the demo data at a chosen size and rank launching."""

import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_RECIPE = os.path.join(REPO, "recipes", "tiny", "otter_shapes.yaml")


def make_shapes_dataset(root: str, num_train: int, num_eval: int) -> dict:
    """The demo's data at a chosen size: raw MIMIC-IT layout → shards (4 per split), plus a tokenizer."""
    from mmtrain.demo import make_shapes_data

    return make_shapes_data(root, num_train, num_eval, shard_samples=max(1, num_train // 4))


def data_overrides(paths: dict, run_root: str, run_name: str) -> list:
    return [
        f"output_dir={run_root}",
        f"run_name={run_name}",
        f"model.tokenizer={paths['tokenizer']}",
        f"data.sources[0].path={paths['train']}",
        f"data.eval_path={paths['eval']}",
    ]


def run_ranks(nproc: int, module_args: list, timeout_s: int = 600, env: dict = None):
    """Start `nproc` ranks of `python -m ...` with torchrun on this host; returns the CompletedProcess."""
    import subprocess

    cmd, full_env = _ranks_command(nproc, module_args, env)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=full_env, cwd=REPO)


def _ranks_command(nproc: int, module_args: list, env: dict = None):
    import sys

    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *module_args], full_env


def start_ranks(nproc: int, module_args: list, log_path: str, env: dict = None):
    """Like run_ranks, without waiting, output appended to `log_path`; returns torchrun's Popen
    (started in a session of its own). kill_ranks(proc) SIGKILLs it and every rank."""
    import subprocess

    cmd, full_env = _ranks_command(nproc, module_args, env)
    with open(log_path, "ab") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env, cwd=REPO,
                                start_new_session=True)


def randomise_like_trained(model, seed: int = 1):
    """Random weights unlike any initialisation, in place: open gates, non-unit norms, so parity and
    round-trip tests cannot pass on what zero gates or unit norms would hide. Returns the model."""
    import re

    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith(("alpha_cross_attn", "alpha_dense")):
                param.copy_(0.6 + 0.3 * noise)
            elif re.search(r"(norm\d?|\.ln|layernorm)\.weight$", name):
                param.copy_(1.0 + 0.2 * noise)
            else:
                param.copy_(0.1 * noise)
    return model


def start_independent_ranks(nproc: int, module_args: list, log_dir: str, env: dict = None) -> list:
    """`nproc` ranks of `python ...` started directly, without torchrun's agent (as srun starts
    them): rank 0 hosts the rendezvous store; rank r writes to log_dir/rank<r>.log. A test signals
    one rank at a time and reads each rank's own exit code. Returns the Popens, by rank."""
    import subprocess
    import sys

    from mmtrain.engine.distributed import free_port

    common = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
              "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc), **(env or {})}
    procs = []
    for rank in range(nproc):
        with open(os.path.join(log_dir, f"rank{rank}.log"), "ab") as log:
            procs.append(subprocess.Popen([sys.executable, *module_args], stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                          env={**common, "RANK": str(rank), "LOCAL_RANK": str(rank)}))
    return procs


def wait_for_metrics_step(run_dir: str, min_step: int, procs: list, timeout_s: float = 300) -> list:
    """Poll the run's metrics.jsonl until a record of step >= min_step appears; returns the records.
    Fails if a rank exits first."""
    import json
    import time

    path = os.path.join(run_dir, "metrics.jsonl")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if os.path.isfile(path):
            with open(path) as f:
                rows = [json.loads(line) for line in f if line.endswith("\n")]
            if rows and rows[-1]["step"] >= min_step:
                return rows
        exited = [(rank, p.returncode) for rank, p in enumerate(procs) if p.poll() is not None]
        assert not exited, f"ranks exited before step {min_step}: {exited}"
        time.sleep(0.1)
    raise AssertionError(f"no step {min_step} in {path} within {timeout_s} s")


def _descendants(pid: int) -> list:
    """Every live descendant of `pid`, from /proc (Linux)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    # The command name (field 2) may hold spaces; the fields after its ')' are fixed.
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def kill_ranks(proc, timeout_s: float = 60) -> None:
    """SIGKILL a start_ranks launch like a lost node: torchrun and every rank with its process group
    (torchrun starts each rank in a session of its own, so one killpg does not reach them); returns
    once all are gone."""
    import signal
    import time

    victims = [proc.pid, *_descendants(proc.pid)]
    for pid in victims:
        try:
            os.killpg(pid, signal.SIGKILL) if os.getpgid(pid) == pid else os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=timeout_s)
    deadline = time.monotonic() + timeout_s
    while any(_alive(pid) for pid in victims):
        assert time.monotonic() < deadline, f"processes {[p for p in victims if _alive(p)]} survived SIGKILL"
        time.sleep(0.05)
