"""`mmtrain doctor`: is this machine (or cluster) ready to train? PASS / WARN / FAIL lines.

Checks, in order:
  - Python and the libraries mmtrain needs (torch, deepspeed, transformers, webdataset, open_clip;
    flash-attn optional) against the requirements in setup.py;
  - CUDA: devices, memory, bf16 support, peer-to-peer access between every pair of local GPUs
    (consumer GPUs without it deadlock in NCCL unless NCCL_P2P_DISABLE=1 is set);
  - across ranks: the library versions are the same everywhere, the clocks agree, an all-reduce
    gives the right sum (gloo on CPU, NCCL on GPU) and its bus bandwidth; every rank writes a file
    in the shared directory (write, fsync, read back, rename) and reads every other rank's file;
    free disk space there.

Without RANK/WORLD_SIZE in the environment, `mmtrain doctor --nproc N` starts N local ranks through
torchrun, each running `python -m mmtrain.engine.doctor`. Under a launcher (torchrun, srun on
several nodes, SageMaker) every process runs the rank checks in the launcher's world, so the real
fabric and the real shared filesystem are what get tested; rank 0 prints the report. The exit code
is 1 when any check FAILs, on every rank.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

PASS, WARN, FAIL = "PASS", "WARN", "FAIL"

# (name shown, distribution name in setup.py, import name)
REQUIRED_LIBRARIES = (
    ("torch", "torch", "torch"),
    ("deepspeed", "deepspeed", "deepspeed"),
    ("transformers", "transformers", "transformers"),
    ("webdataset", "webdataset", "webdataset"),
    ("open_clip", "open_clip_torch", "open_clip"),
)
OPTIONAL_LIBRARIES = (("flash-attn", "flash-attn", "flash_attn"),)

MIN_FREE_DISK_GIB = 1.0  # below this a checkpoint cannot be written at all
LOW_FREE_DISK_GIB = 50.0  # a 9B run's checkpoint (fp32 masters + Adam) is about 100 GiB
MAX_CLOCK_SKEW_S = 2.0  # after a barrier; more breaks log correlation and time-based job limits
ALLREDUCE_MIB = {"cuda": 256, "cpu": 16}  # payload of the bandwidth measurement
ALLREDUCE_ITERS = {"cuda": 10, "cpu": 3}


@dataclass
class Check:
    name: str
    status: str
    detail: str

    def line(self) -> str:
        return f"{self.status}  {self.name}: {self.detail}"


# --- local checks -----------------------------------------------------------------------------------

def setup_requirements() -> Tuple[Dict[str, str], Optional[str]]:
    """(distribution name → version specifier, python_requires) from setup.py when mmtrain runs from
    a checkout, else from the installed distribution's metadata (what setup.py said at install)."""
    setup_py = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "setup.py")
    requirements: Optional[List[str]] = None
    python_requires = None
    if os.path.isfile(setup_py):
        try:
            requirements, python_requires = _literal_requirements(setup_py)
        except (SyntaxError, ValueError):
            requirements = None  # not plain literals: the installed metadata still has them
    if requirements is None:
        from importlib import metadata

        requirements = [r.split(";")[0] for r in metadata.requires("mmtrain") or []]
        python_requires = metadata.metadata("mmtrain").get("Requires-Python")
    from packaging.requirements import Requirement

    specs = {}
    for text in requirements:
        req = Requirement(text)
        specs[_normalize(req.name)] = str(req.specifier)
    return specs, python_requires


def _literal_requirements(setup_py: str) -> Tuple[List[str], Optional[str]]:
    """install_requires + every extra, and python_requires, read from setup.py without running it."""
    with open(setup_py) as f:
        tree = ast.parse(f.read(), setup_py)
    requirements: List[str] = []
    python_requires = None
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "install_requires":
            requirements += ast.literal_eval(node.value)
        elif isinstance(node, ast.keyword) and node.arg == "extras_require":
            requirements += [r for extra in ast.literal_eval(node.value).values() for r in extra]
        elif isinstance(node, ast.keyword) and node.arg == "python_requires":
            python_requires = ast.literal_eval(node.value)
    return requirements, python_requires


def _normalize(dist: str) -> str:
    return dist.lower().replace("_", "-")


def library_checks() -> List[Check]:
    from importlib import metadata

    from packaging.specifiers import SpecifierSet

    specs, python_requires = setup_requirements()
    checks = []
    py = platform.python_version()
    if python_requires and py not in SpecifierSet(python_requires):
        checks.append(Check("python", FAIL, f"{py}; setup.py needs {python_requires}"))
    else:
        checks.append(Check("python", PASS, f"{py} ({sys.executable})"))
    for name, dist, _ in REQUIRED_LIBRARIES + OPTIONAL_LIBRARIES:
        optional = (name, dist, _) in OPTIONAL_LIBRARIES
        wanted = specs.get(_normalize(dist), "")
        try:
            version = metadata.version(dist)
        except metadata.PackageNotFoundError:
            if optional:
                checks.append(Check(name, WARN, "not installed (optional: attention falls back to PyTorch SDPA; "
                                                "`pip install .[flash]` on a CUDA machine)"))
            else:
                checks.append(Check(name, FAIL, f"not installed; setup.py needs {dist}{wanted}"))
            continue
        if wanted and version not in SpecifierSet(wanted, prereleases=True):
            checks.append(Check(name, FAIL, f"{version}, but setup.py needs {dist}{wanted}"))
        else:
            checks.append(Check(name, PASS, version + (f" (needs {wanted})" if wanted else "")))
    return checks


def library_versions() -> Dict[str, str]:
    """Installed versions of the libraries above (missing ones absent), for comparing ranks."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name, dist, _ in REQUIRED_LIBRARIES + OPTIONAL_LIBRARIES:
        try:
            out[name] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def cuda_checks() -> List[Check]:
    import torch

    if not torch.cuda.is_available():
        return [Check("cuda", WARN, f"no CUDA device (torch {torch.__version__}, built for CUDA "
                                    f"{torch.version.cuda}): training runs on CPU with gloo, tiny flavours only")]
    checks = []
    count = torch.cuda.device_count()
    for i in range(count):
        props = torch.cuda.get_device_properties(i)
        checks.append(Check(f"cuda:{i}", PASS, f"{props.name}, {props.total_memory / 2**30:.1f} GiB, "
                                              f"compute capability {props.major}.{props.minor}"))
    if torch.cuda.is_bf16_supported():
        checks.append(Check("bf16", PASS, "supported"))
    else:
        checks.append(Check("bf16", FAIL, "not supported by this GPU: set train.precision=fp32"))
    if count > 1:
        from mmtrain.engine.gpu_env import P2P_ENV, pairs_without_peer_access

        missing = pairs_without_peer_access(count, torch.cuda.can_device_access_peer)
        shown = ", ".join(f"{a}->{b}" for a, b in missing[:4])
        if not missing:
            checks.append(Check("p2p", PASS, f"every pair of the {count} GPUs has peer-to-peer access"))
        elif os.environ.get(P2P_ENV) == "1":
            checks.append(Check("p2p", PASS, f"no peer access ({shown}), and {P2P_ENV}=1 is set"))
        else:
            # mmtrain's trainer sets it itself (gpu_env); other tools on this host do not.
            checks.append(Check("p2p", WARN, f"no peer-to-peer access ({shown}): NCCL can deadlock on such GPUs "
                                             f"(RTX 3090/4090); export {P2P_ENV}=1"))
    return checks


def local_checks() -> List[Check]:
    return library_checks() + cuda_checks()


# --- rank checks (inside a process group) ----------------------------------------------------------

def _init_group(timeout_s: int):
    import datetime

    import torch

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        # Ranks on one host share its cores (see mmtrain.engine.distributed).
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
        device, backend = torch.device("cpu"), "gloo"
    # device_id binds NCCL's communicator to this rank's GPU (barriers then need no guess).
    bound = {"device_id": device} if device.type == "cuda" else {}
    torch.distributed.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s),
                                         rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]), **bound)
    return device, backend


def _all_reduce(device, backend: str) -> Dict[str, Any]:
    """A checked sum (rank r contributes r + 1 everywhere), then the bus bandwidth of a larger one."""
    import torch
    import torch.distributed as dist

    world, rank = dist.get_world_size(), dist.get_rank()
    probe = torch.full((4096,), float(rank + 1), device=device)
    dist.all_reduce(probe)
    expected = world * (world + 1) / 2
    correct = bool((probe == expected).all().item())
    kind = "cuda" if device.type == "cuda" else "cpu"
    payload_bytes = ALLREDUCE_MIB[kind] * 2**20
    data = torch.ones(payload_bytes // 4, dtype=torch.float32, device=device)
    dist.all_reduce(data)  # warm-up: NCCL builds its rings on the first call
    if kind == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(ALLREDUCE_ITERS[kind]):
        dist.all_reduce(data)
    if kind == "cuda":
        torch.cuda.synchronize()
    elapsed_s = (time.perf_counter() - start) / ALLREDUCE_ITERS[kind]
    # nccl-tests' bus bandwidth: what each link carries in a ring all-reduce.
    bus_gb_s = payload_bytes * 2 * (world - 1) / world / elapsed_s / 1e9 if world > 1 else 0.0
    return {"correct": correct, "got": float(probe[0].item()), "expected": expected, "backend": backend,
            "payload_mib": ALLREDUCE_MIB[kind], "time_ms": elapsed_s * 1e3, "bus_gb_s": bus_gb_s}


def _write_own_file(shared_dir: str, token: str, rank: int) -> Tuple[Optional[str], str]:
    """(path of this rank's file or None, error): write a temp file, fsync, read it back, rename."""
    content = f"mmtrain doctor {token} rank {rank} host {socket.gethostname()}\n"
    try:
        os.makedirs(shared_dir, exist_ok=True)
        final = os.path.join(shared_dir, f".mmtrain-doctor-{token}-rank{rank}")
        tmp = final + ".tmp"
        with open(tmp, "w") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        with open(tmp) as f:
            if f.read() != content:
                return None, f"{tmp}: read back different bytes"
        os.replace(tmp, final)
        dir_fd = os.open(shared_dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself must survive a crash, as checkpoints' do
        finally:
            os.close(dir_fd)
        return final, ""
    except OSError as e:
        return None, f"{type(e).__name__}: {e}"


def _read_others(shared_dir: str, token: str, rank: int, world: int, written: Sequence[bool]) -> List[str]:
    """Errors reading the files the other ranks wrote (only those that say they wrote one)."""
    errors = []
    for other in range(world):
        if other == rank or not written[other]:
            continue
        path = os.path.join(shared_dir, f".mmtrain-doctor-{token}-rank{other}")
        try:
            with open(path) as f:
                text = f.read()
            if f"{token} rank {other} " not in text:
                errors.append(f"{path}: unexpected content {text[:80]!r}")
        except OSError as e:
            errors.append(f"rank {other}'s file: {type(e).__name__}: {e}")
    return errors


def rank_checks(shared_dir: str, timeout_s: int) -> Optional[Dict[str, Any]]:
    """Run on every rank of an existing world (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set).
    Returns, on every rank, the gathered facts of all ranks. Every rank runs the same collectives
    in the same order whatever fails locally, so a local failure is reported instead of hanging."""
    import torch.distributed as dist

    device, backend = _init_group(timeout_s)
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        token = [uuid.uuid4().hex[:12] if rank == 0 else None]
        dist.broadcast_object_list(token, src=0)
        token = token[0]
        facts: Dict[str, Any] = {"rank": rank, "host": socket.gethostname(), "local_checks": [],
                                 "versions": library_versions()}
        try:
            facts["local_checks"] = [asdict(c) for c in local_checks()]
        except Exception as e:  # a broken install must be reported, not end this rank's collectives
            facts["local_checks"] = [asdict(Check("environment", FAIL, f"{type(e).__name__}: {e}"))]
        try:
            facts["all_reduce"] = _all_reduce(device, backend)
        except Exception as e:
            facts["all_reduce"] = {"error": f"{type(e).__name__}: {e}"}
        own, facts["write_error"] = _write_own_file(shared_dir, token, rank)
        written: List[Any] = [None] * world
        dist.all_gather_object(written, own is not None)
        facts["read_errors"] = _read_others(shared_dir, token, rank, world, written)
        try:
            usage = shutil.disk_usage(shared_dir)
            facts["free_gib"] = usage.free / 2**30
        except OSError as e:
            facts["free_gib"] = None
            facts["disk_error"] = f"{type(e).__name__}: {e}"
        dist.barrier()
        facts["time_s"] = time.time()  # right after the barrier: the spread is the clocks' skew
        gathered: List[Any] = [None] * world
        dist.all_gather_object(gathered, facts)
        dist.barrier()  # everyone has read every file before any is removed
        if own is not None:
            os.remove(own)
        return {"world_size": world, "shared_dir": os.path.abspath(shared_dir), "ranks": gathered}
    finally:
        dist.destroy_process_group()


def world_checks(world: Dict[str, Any]) -> List[Check]:
    """Turn the gathered facts of every rank into checks."""
    ranks = world["ranks"]
    n = world["world_size"]
    checks: List[Check] = []
    hosts = sorted({r["host"] for r in ranks})
    checks.append(Check("world", PASS, f"{n} ranks on {len(hosts)} host(s): {', '.join(hosts[:8])}"))
    # Each host's environment problems, once per host (rank 0's host is reported in full elsewhere).
    for r in ranks[1:]:
        for c in r["local_checks"]:
            if c["status"] != PASS and r["host"] != ranks[0]["host"]:
                checks.append(Check(f"{c['name']} (rank {r['rank']}, {r['host']})", c["status"], c["detail"]))
    base = ranks[0]["versions"]
    differ = [f"rank {r['rank']} ({r['host']}): " + ", ".join(f"{k} {r['versions'].get(k)} vs {base.get(k)}"
                                                             for k in sorted(set(base) | set(r["versions"]))
                                                             if base.get(k) != r["versions"].get(k))
              for r in ranks if r["versions"] != base]
    checks.append(Check("versions across ranks", FAIL if differ else PASS,
                        "; ".join(differ[:4]) if differ else "the same on every rank"))
    skew_s = max(r["time_s"] for r in ranks) - min(r["time_s"] for r in ranks)
    checks.append(Check("clocks", WARN if skew_s > MAX_CLOCK_SKEW_S else PASS,
                        f"{skew_s:.3f} s apart after a barrier" + (" (sync with NTP/chrony)" if skew_s > MAX_CLOCK_SKEW_S else "")))
    errors = [f"rank {r['rank']}: {r['all_reduce']['error']}" for r in ranks if "error" in r["all_reduce"]]
    wrong = [f"rank {r['rank']} got {r['all_reduce']['got']:g}, expected {r['all_reduce']['expected']:g}"
             for r in ranks if "error" not in r["all_reduce"] and not r["all_reduce"]["correct"]]
    if errors or wrong:
        checks.append(Check("all-reduce", FAIL, "; ".join((errors + wrong)[:4])))
    else:
        ar = ranks[0]["all_reduce"]
        slowest_ms = max(r["all_reduce"]["time_ms"] for r in ranks)
        checks.append(Check("all-reduce", PASS, f"{ar['backend']} over {n} ranks: sum correct on every rank; "
                                               f"{ar['payload_mib']} MiB in {slowest_ms:.1f} ms, bus bandwidth "
                                               f"{min(r['all_reduce']['bus_gb_s'] for r in ranks):.2f} GB/s"))
    problems = [f"rank {r['rank']} ({r['host']}) write: {r['write_error']}" for r in ranks if r["write_error"]]
    problems += [f"rank {r['rank']} ({r['host']}) read: {e}" for r in ranks for e in r["read_errors"]]
    shared = world["shared_dir"]
    if problems:
        checks.append(Check("shared filesystem", FAIL, f"{shared}: " + "; ".join(problems[:4])))
    else:
        checks.append(Check("shared filesystem", PASS, f"{shared}: every rank wrote (fsync, rename) and read every "
                                                      "other rank's file"))
    free = [r.get("free_gib") for r in ranks]
    if any(f is None for f in free):
        err = next(r.get("disk_error", "") for r in ranks if r.get("free_gib") is None)
        checks.append(Check("disk space", FAIL, f"{shared}: {err}"))
    else:
        least = min(free)
        status = FAIL if least < MIN_FREE_DISK_GIB else WARN if least < LOW_FREE_DISK_GIB else PASS
        checks.append(Check("disk space", status, f"{least:.1f} GiB free in {shared}"
                                                  + ("" if status == PASS else " (a 9B checkpoint is about 100 GiB)")))
    return checks


def _launch_local_ranks(nproc: int, shared_dir: str, timeout_s: int) -> Tuple[Optional[Dict[str, Any]], str]:
    """Start `nproc` ranks of this module through torchrun; (gathered facts or None, error text)."""
    with tempfile.TemporaryDirectory(prefix="mmtrain-doctor-") as tmp:
        result_path = os.path.join(tmp, "world.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "mmtrain.engine.doctor", "--shared-dir", shared_dir, "--timeout-s", str(timeout_s),
               "--result-file", result_path]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s + 120, env=env)
        except subprocess.TimeoutExpired:
            return None, f"{nproc} local ranks did not finish within {timeout_s + 120} s"
        if done.returncode != 0 or not os.path.isfile(result_path):
            tail = (done.stderr or done.stdout)[-1500:].strip()
            return None, f"torchrun with {nproc} ranks exited {done.returncode}: {tail}"
        with open(result_path) as f:
            return json.load(f), ""


def report(checks: Sequence[Check], as_json: bool) -> str:
    if as_json:
        return json.dumps({"ok": not any(c.status == FAIL for c in checks), "checks": [asdict(c) for c in checks]},
                          indent=1)
    counts = {s: sum(c.status == s for c in checks) for s in (PASS, WARN, FAIL)}
    summary = f"{counts[PASS]} passed, {counts[WARN]} warnings, {counts[FAIL]} failed"
    return "\n".join([c.line() for c in checks] + [summary])


def run_doctor(nproc: Optional[int], shared_dir: str, timeout_s: int = 120, as_json: bool = False) -> Tuple[int, str]:
    """`mmtrain doctor`: (exit code, report). Under a launcher the report is empty on ranks other than 0."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        world = rank_checks(shared_dir, timeout_s)
        checks = [Check(**c) for c in world["ranks"][0]["local_checks"]] + world_checks(world)
        code = 1 if any(c.status == FAIL for c in checks) else 0
        return code, report(checks, as_json) if int(os.environ["RANK"]) == 0 else ""
    checks = local_checks()
    import torch

    num_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    nproc = nproc or num_gpus or 2
    if num_gpus and nproc > num_gpus:
        checks.append(Check("ranks", FAIL, f"--nproc {nproc} exceeds the {num_gpus} local GPUs"))
    else:
        world, error = _launch_local_ranks(nproc, shared_dir, timeout_s)
        if world is None:
            checks.append(Check("ranks", FAIL, error))
        else:
            checks += world_checks(world)
    return (1 if any(c.status == FAIL for c in checks) else 0), report(checks, as_json)


def main(argv: Optional[List[str]] = None) -> int:
    """One rank started by `_launch_local_ranks`: rank 0 writes the gathered facts to --result-file."""
    parser = argparse.ArgumentParser(prog="python -m mmtrain.engine.doctor")
    parser.add_argument("--shared-dir", required=True)
    parser.add_argument("--timeout-s", type=int, default=120)
    parser.add_argument("--result-file", required=True)
    args = parser.parse_args(argv)
    world = rank_checks(args.shared_dir, args.timeout_s)
    if int(os.environ["RANK"]) == 0:
        with open(args.result_file, "w") as f:
            json.dump(world, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
