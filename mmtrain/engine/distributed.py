"""Process-group set-up. Rank, world size and master address always come from the environment
(torchrun, the deepspeed launcher, Slurm via torchrun, SageMaker): never from ssh or hand-set flags.
"""

from __future__ import annotations

import datetime
import os
import socket
import warnings
from dataclasses import dataclass

import torch


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


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_environment() -> None:
    """Settings that must exist before deepspeed is imported.

    Without a GPU DeepSpeed's CPU accelerator is chosen explicitly (its auto-detection logs a
    warning and probes for Intel extensions). A plain `python -m mmtrain.train` gets a world of one.
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # DeepSpeed calls collectives that torch marks deprecated; the warning repeats every step.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    if "RANK" not in os.environ:
        os.environ.update(
            {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
        )
        os.environ.setdefault("MASTER_PORT", str(_free_port()))


def init_distributed(timeout_s: int) -> DistInfo:
    prepare_environment()
    import deepspeed

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        # Ranks on one host share its cores; oversubscribing threads slows every rank down.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
        device, backend = torch.device("cpu"), "gloo"
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(
            dist_backend=backend,
            auto_mpi_discovery=False,
            timeout=datetime.timedelta(seconds=timeout_s),
            rank=rank,
            world_size=world,
        )
    return DistInfo(rank, world, local_rank, local_world, device)


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
