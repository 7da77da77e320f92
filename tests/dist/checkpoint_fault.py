"""Run under torchrun: `python -m mmtrain.train` where each rank records the CheckpointError it
raises (in $ERRORS_DIR/rank<R>.txt), optionally with a fault injected into one rank's writes: on
rank $FAIL_RANK, torch.save (which DeepSpeed's checkpoint engine and mmtrain's rank state use)
raises ENOSPC for paths containing $FAIL_IN, as a full disk would.

    ERRORS_DIR=... FAIL_RANK=1 FAIL_IN=step_0000002 torchrun --nproc_per_node 2 tests/dist/checkpoint_fault.py RECIPE k=v ...
"""

import errno
import os
import sys

import torch

from mmtrain import train
from mmtrain.engine.checkpoint import CheckpointError
from mmtrain.engine.distributed import exit_process
from mmtrain.engine.trainer import Trainer


def main() -> int:
    rank = int(os.environ["RANK"])
    if rank == int(os.environ.get("FAIL_RANK", "-1")):
        real_save, fail_in = torch.save, os.environ["FAIL_IN"]

        def full_disk_save(obj, f, *args, **kwargs):
            if isinstance(f, str) and fail_in in f:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f)
            return real_save(obj, f, *args, **kwargs)

        torch.save = full_disk_save
    real_checkpoint = Trainer.save_checkpoint

    def recording_checkpoint(self):
        try:
            return real_checkpoint(self)
        except CheckpointError as e:
            with open(os.path.join(os.environ["ERRORS_DIR"], f"rank{rank}.txt"), "w") as f:
                f.write(str(e))
            raise

    Trainer.save_checkpoint = recording_checkpoint
    return train.main(sys.argv[1:])


if __name__ == "__main__":
    exit_process(main())
