"""Run under torchrun: a rank that finishes while gloo's worker threads still hold its last
collectives' tensors, the hazard `mmtrain.engine.distributed.exit_process` exists for.

    torchrun --nproc_per_node 2 tests/dist/exit_race_probe.py [--plain]

Ends through exit_process, or through sys.exit with --plain (the unprotected exit, for comparison).
"""

import sys

import torch
import torch.distributed as dist

from mmtrain.engine.distributed import exit_process


def main():
    dist.init_process_group("gloo")
    # Kept past destroy_process_group, as DeepSpeed keeps its groups: its worker threads live on.
    group = dist.new_group(list(range(dist.get_world_size())))
    for _ in range(16):
        tensor = torch.ones(1_000_000)
        # The handle is dropped at once, so a worker thread holds the last reference to the tensor.
        dist.all_reduce(tensor, group=group, async_op=True)
    dist.destroy_process_group()
    return group


if __name__ == "__main__":
    kept = main()
    if "--plain" in sys.argv:
        sys.exit(0)
    exit_process(0)
