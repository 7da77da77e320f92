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
    """Start `nproc` ranks of `python -m ...` with torchrun on this host; returns the CompletedProcess.
    On a timeout every rank is killed too (torchrun starts each in a session of its own, so killing
    torchrun alone would leave them using the cores the following tests need)."""
    import subprocess

    cmd, full_env = _ranks_command(nproc, module_args, env)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env, cwd=REPO,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_ranks(proc)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


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


def openflamingo_release(model, out, base_table_rows=None, wrap=False, seed=5):
    """`model` (an OpenFlamingo-layout flavour) written as OpenFlamingo publishes it, in `out`
    (created): the base LM's own HF checkpoint (model.safetensors, its token table cut to the base
    vocabulary and padded with random rows to `base_table_rows`), an open_clip state dict (open_clip.pt,
    text tower included) and checkpoint.pt with the trained parts and the resized token table (a
    training script's `{"model_state_dict": {"module." ...}}` when `wrap`). Returns the three paths in
    `model.init_from` order; the tensors are `model.state_dict()`'s."""
    import torch
    from safetensors.torch import save_file

    from mmtrain.models.flamingo.openflamingo import to_openflamingo

    config = model.config
    base_rows = config.base_vocab_size
    table_rows = base_rows + config.num_added_tokens
    published = to_openflamingo(model.state_dict(), config)
    base, trained, clip = {}, {}, {}
    generator = torch.Generator().manual_seed(seed)
    for key, value in published.items():
        if key.startswith("vision_encoder."):
            clip["visual." + key[len("vision_encoder.") :]] = value
        elif key.startswith("perceiver.") or ".gated_cross_attn_layer." in key:
            trained[key] = value
        else:
            if value.shape[0] == table_rows:  # a resized token table: trained (all rows), base LM (base rows, padded)
                trained[key] = value
                padding = (base_table_rows or base_rows) - base_rows
                value = torch.cat([value[:base_rows], torch.randn(padding, value.shape[1], generator=generator)])
            base[key[len("lang_encoder.") :].replace(".decoder_layer.", ".")] = value.clone()
    # open_clip's pooled projection and text tower: in the file, not in the model (skipped on load).
    clip["visual.proj"] = torch.zeros(64, 32)
    clip["transformer.resblocks.0.attn.in_proj_weight"] = torch.zeros(96, 32)
    clip["logit_scale"] = torch.ones(())
    os.makedirs(out)
    save_file({k: v.contiguous() for k, v in base.items()}, os.path.join(out, "model.safetensors"))
    torch.save(clip, os.path.join(out, "open_clip.pt"))
    if wrap:
        trained = {"epoch": 3, "model_state_dict": {"module." + k: v for k, v in trained.items()}}
    torch.save(trained, os.path.join(out, "checkpoint.pt"))
    assert base and all(not k.startswith("lang_encoder.") for k in base)
    return [str(out), os.path.join(out, "open_clip.pt"), os.path.join(out, "checkpoint.pt")]


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


def descendants(pid: int) -> list:
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


def kill_ranks(proc, timeout_s: float = 60, known: tuple = ()) -> None:
    """SIGKILL a start_ranks launch like a lost node: torchrun and every rank with its process group
    (torchrun starts each rank in a session of its own, so one killpg does not reach them); returns
    once all are gone. `known`: rank pids found earlier, killed before the walk of /proc (which takes
    long enough for a tiny checkpoint's save to finish); torchrun goes last, so that the walk still
    finds its children."""
    import signal
    import time

    def kill(pids):
        for pid in pids:
            try:
                os.killpg(pid, signal.SIGKILL) if os.getpgid(pid) == pid else os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):  # gone already (or its pid reused by then)
                pass

    kill(known)
    victims = [*known, *(pid for pid in descendants(proc.pid) if pid not in known), proc.pid]
    kill(victims[len(known):])
    proc.wait(timeout=timeout_s)
    deadline = time.monotonic() + timeout_s
    while any(_alive(pid) for pid in victims):
        assert time.monotonic() < deadline, f"processes {[p for p in victims if _alive(p)]} survived SIGKILL"
        time.sleep(0.05)


def same_weights_pair(flavour: str, token_ids: dict, overrides_a: dict, overrides_b: dict, device: str = "cpu"):
    """Two builds of `flavour` that differ only in their overrides (e.g. attention kernels), with
    identical weights and every Flamingo gate opened to 0.7 so cross-attention reaches the logits."""
    import torch

    from mmtrain.models import build_model

    torch.manual_seed(0)
    a = build_model(flavour, overrides_a, token_ids).to(device)
    b = build_model(flavour, overrides_b, token_ids).to(device)
    b.load_state_dict(a.state_dict())
    for model in (a, b):
        for block in getattr(model, "gated_cross_attn_layers", ()):
            for gate in ("attn_gate", "ff_gate", "alpha_cross_attn", "alpha_dense"):
                if hasattr(block, gate):
                    getattr(block, gate).data.fill_(0.7)
    return a, b
