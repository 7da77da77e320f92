"""Run under torchrun: `python -m mmtrain.train` where each rank records the CheckpointError it
raises (in $ERRORS_DIR/rank<R>.txt), optionally with a fault injected into one rank's writes: on
rank $FAIL_RANK, torch.save (which DeepSpeed's checkpoint engine and mmtrain's rank state use) and
the copyfile with which DeepSpeed installs its recovery scripts raise ENOSPC, as a full disk would,
for paths containing $FAIL_IN once $FAIL_SKIP (default 0) such writes have succeeded.

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
        import deepspeed.runtime.engine as deepspeed_engine

        fail_in, skips_left = os.environ["FAIL_IN"], [int(os.environ.get("FAIL_SKIP", "0"))]

        def failing(write):
            def write_or_fail(obj_or_src, path, *args, **kwargs):
                if isinstance(path, str) and fail_in in path:
                    if skips_left[0] == 0:
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
                    skips_left[0] -= 1
                return write(obj_or_src, path, *args, **kwargs)

            return write_or_fail

        torch.save = failing(torch.save)
        deepspeed_engine.copyfile = failing(deepspeed_engine.copyfile)
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
