"""Process-group set-up. Rank, world size and master address always come from the environment
(torchrun, the deepspeed launcher, Slurm via torchrun, SageMaker): never from ssh or hand-set flags.

No hangs: `dist.timeout_s` reaches every process group, the ones DeepSpeed creates for itself
included, and a rank that fails says so (:func:`report_failure`): its error and traceback in its
log, a one-line summary where the other ranks read it, and, on each failing rank, which ranks
reported errors and which went silent (killed, out of memory, hung).
"""

from __future__ import annotations

import atexit
import datetime
import logging
import os
import random
import socket
import sys
import threading
import time
import traceback
import warnings
from dataclasses import dataclass
from typing import Dict, List, NoReturn, Optional

import torch

from mmtrain.engine.gpu_env import prepare_gpu_environment


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# Where free_port looks: below Linux's default ephemeral range (32768-60999) and below the ports
# of Slurm's usual configurations (6817-6818, SrunPortRange often 60001-63000).
_PORT_RANGE = (10000, 20000)


def free_port() -> int:
    """A TCP port that is free now on 127.0.0.1, for a rendezvous that binds it seconds later.
    Not one from the kernel's ephemeral range: meanwhile the kernel may hand that port to any
    outgoing connection, including a rank's own retries to connect to it, which then connect to
    themselves. Falls back to an ephemeral port when the range has no free one."""
    choose = random.SystemRandom()  # not the training's seeded `random` stream
    for _ in range(64):
        port = choose.randrange(*_PORT_RANGE)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:  # taken
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def choose_deepspeed_accelerator() -> None:
    """Without a GPU, DeepSpeed's CPU accelerator, named before deepspeed is imported (its
    auto-detection logs a warning and probes for Intel extensions)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def prepare_environment() -> None:
    """Settings that must exist before deepspeed is imported.

    DeepSpeed's accelerator (choose_deepspeed_accelerator); a plain `python -m mmtrain.train` gets a
    world of one. For a rank's process only: it fills in the rank variables of os.environ.
    """
    choose_deepspeed_accelerator()
    prepare_gpu_environment()  # NCCL reads NCCL_P2P_DISABLE when the process group starts
    # A timed-out or failed NCCL collective tears the process down (the watchdog's mode 3) rather than
    # leaving it blocked in CUDA; blocking wait is not set, as it would serialise every collective.
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")
    # DeepSpeed calls collectives that torch marks deprecated; the warning repeats every step.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    if "RANK" not in os.environ:
        os.environ.update(
            {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
        )
        os.environ.setdefault("MASTER_PORT", str(free_port()))


def init_distributed(timeout_s: int) -> DistInfo:
    prepare_environment()
    import deepspeed

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    # torchrun sets LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE.
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", str(world))))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        torch.set_num_threads(cpu_threads_per_rank(local_world))
        device, backend = torch.device("cpu"), "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    _default_group_timeout(timeout)
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(
            dist_backend=backend,
            auto_mpi_discovery=False,
            timeout=timeout,
            rank=rank,
            world_size=world,
        )
    return DistInfo(rank, world, local_rank, local_world, device)


def cpu_threads_per_rank(local_world_size: int) -> int:
    """CPU ranks' intra-op threads: OMP_NUM_THREADS when set (a CPU matmul splits its sums by thread
    count, so runs compared bit for bit across topologies must fix it), else this host's cores shared
    among its ranks (oversubscribing threads slows every rank down)."""
    explicit = os.environ.get("OMP_NUM_THREADS")
    if explicit and explicit.isdigit() and int(explicit) > 0:
        return int(explicit)
    return max(1, (os.cpu_count() or 1) // local_world_size)


def _default_group_timeout(timeout: datetime.timedelta) -> None:
    """Make `timeout` the default of every process group created from now on.

    init_process_group takes a timeout, but torch.distributed.new_group without one falls back to
    torch's defaults (30 min for gloo, 10 min for NCCL), and DeepSpeed's ZeRO collectives run on such
    a group (its clone of the world group). torch reads the defaults from these module globals at
    each new_group call.
    """
    from torch.distributed import distributed_c10d

    for name in ("default_pg_timeout", "default_pg_nccl_timeout"):
        if not hasattr(distributed_c10d, name):
            warnings.warn(f"torch.distributed has no {name}: process groups DeepSpeed creates keep torch's "
                          "default timeout, not dist.timeout_s", stacklevel=2)
            continue
        setattr(distributed_c10d, name, timeout)


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.SUM)
    return values


def all_reduce_max(values: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.MAX)
    return values


def destroy() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    remove_shm_allreduce_buffer()


def _shm_allreduce_buffer_path(rank: int) -> str:
    """This rank's segment of DeepSpeed's CPU shared-memory all-reduce (DeepSpeed 0.19's naming:
    prefix, uid, MASTER_ADDR, MASTER_PORT, rank). DeepSpeed creates it when every rank is on one host
    by its LOCAL_SIZE (set by the deepspeed launcher) and the accelerator is the CPU."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def remove_shm_allreduce_buffer() -> None:
    """DeepSpeed never unlinks its shared-memory all-reduce segments (its shared_close is never
    called), so each CPU run under the deepspeed launcher left ~66 MB per rank in /dev/shm for good.
    Every rank mapped every other rank's segment while initialising, before its first collective, so
    by now the name is no longer needed: removing it frees the memory when the last rank exits."""
    if "RANK" not in os.environ:
        return
    try:
        os.remove(_shm_allreduce_buffer_path(int(os.environ["RANK"])))
    except FileNotFoundError:  # not a CPU run under the deepspeed launcher
        pass


def exit_process(code: int) -> NoReturn:
    """End a rank's process with `code`: run the exit handlers, then exit without the interpreter's
    teardown. For process entry points only (`python -m mmtrain.train`, `mmtrain train`); it never
    returns.

    Why: destroy_process_group leaves gloo's worker threads running (DeepSpeed still holds its
    process groups), and one of them can drop the last reference to a collective's tensors while
    Python finalizes. A tensor that owns a Python object then needs the GIL; a thread that asks for
    it during finalization is ended inside a C++ destructor, which aborts the whole process
    ("terminate called without an active exception", SIGABRT) after the run had finished and
    saved, and the launcher reports a failed rank. Skipping only the teardown keeps everything else
    of a normal exit: the atexit handlers (logging's flush, temporary directories, data workers)
    run here, while the interpreter is whole."""
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more can be written to it
            pass
    os._exit(code)


# ------------------------------------------------------------------ failures
# How long a failing rank waits for the others' reports before naming the silent ones: long enough
# for peers blocked in a collective to see the broken connection, short enough not to delay exit.
FAILURE_REPORT_WAIT_S = 5.0
_STORE_TIMEOUT_S = 5.0


def _failure_key(rank: int) -> str:
    # A restarted torchrun round reuses the agent's store: keep each round's reports apart.
    return f"mmtrain/failed/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{rank}"


def _failure_store() -> torch.distributed.TCPStore:
    """A client of the rendezvous store (torchrun's agent, or rank 0 for independent ranks)."""
    return torch.distributed.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
        timeout=datetime.timedelta(seconds=_STORE_TIMEOUT_S), wait_for_workers=False,
    )


def failure_summary(error: BaseException) -> str:
    """One line: the exception and where it was raised."""
    frames = traceback.extract_tb(error.__traceback__)
    where = f" (at {frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name})" if frames else ""
    text = f"{type(error).__name__}: {error}".strip().replace("\n", " ")
    return (text[:400] + " ..." if len(text) > 400 else text) + where


def is_collective_failure(error: BaseException) -> bool:
    """A collective that failed because of another rank (its connection closed, or it timed out),
    as opposed to an error of this rank's own. gloo reports both as a plain RuntimeError naming
    its transport, hence the look at the message."""
    text = str(error)
    return isinstance(error, torch.distributed.DistError) or any(
        mark in text for mark in ("gloo/transport", "Connection reset", "Connection closed", "NCCL", "Timed out"))


def report_failure(error: BaseException, rank: int, world_size: int, log: logging.Logger,
                   wait_s: float = FAILURE_REPORT_WAIT_S) -> Dict[int, str]:
    """Log this rank's failure with its traceback and post a summary to the rendezvous store. When
    the error is a failed collective, wait up to `wait_s` for the other ranks' posts and log who
    failed and who went silent; a rank whose own error started it exits at once instead (its peers
    learn of it when its connections close). Never raises. Returns the posts read (rank → summary)."""
    log.error("rank %d failed: %s", rank, "".join(traceback.format_exception(error)).rstrip())
    if world_size <= 1 or "MASTER_ADDR" not in os.environ:
        return {rank: failure_summary(error)}
    where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
    try:
        store = _failure_store()
        store.set(_failure_key(rank), failure_summary(error))
    except Exception as store_error:  # noqa: BLE001 - the report must not mask the original error
        log.error("rank %d: cannot reach the rendezvous store at %s (%s); it lives in rank 0's process when "
                  "ranks run without a launcher agent, so rank 0 has probably died", rank, where, store_error)
        return {rank: failure_summary(error)}
    if not is_collective_failure(error):
        return {rank: failure_summary(error)}
    posts = _collect_posts(store, world_size, wait_s)
    others = {r: text for r, text in posts.items() if r != rank}
    silent = sorted(set(range(world_size)) - set(posts))
    for other, text in sorted(others.items()):
        log.error("rank %d: rank %d failed: %s", rank, other, text)
    if silent:
        shown = silent if len(silent) <= 16 else silent[:16] + ["..."]
        log.error("rank %d: ranks %s reported no error within %.0f s: they died without a Python error "
                  "(killed, out of memory, a crash) or are still hung", rank, shown, wait_s)
    return posts


def _collect_posts(store: torch.distributed.TCPStore, world_size: int, wait_s: float) -> Dict[int, str]:
    deadline = time.monotonic() + wait_s
    posts: Dict[int, str] = {}
    while True:
        missing: List[int] = [r for r in range(world_size) if r not in posts]
        for r in missing:
            try:
                if store.check([_failure_key(r)]):
                    posts[r] = store.get(_failure_key(r)).decode(errors="replace")
            except Exception:  # noqa: BLE001 - the store host went away meanwhile: report what we have
                return posts
        if len(posts) == world_size or time.monotonic() >= deadline:
            return posts
        time.sleep(0.5)


def exit_watchdog(exit_code: int, grace_s: float, log: Optional[logging.Logger] = None) -> threading.Timer:
    """After a failure: end the process with `exit_code` if clean shutdown (process-group teardown,
    data workers, atexit hooks) has not finished within `grace_s`, so no rank outlives its error."""

    def _force_exit() -> None:
        if log is not None:
            log.error("shutdown after the failure took over %.0f s: exiting with %d", grace_s, exit_code)
            for handler in log.handlers:
                handler.flush()
        os._exit(exit_code)

    timer = threading.Timer(grace_s, _force_exit)
    timer.daemon = True
    timer.start()
    return timer
