"""Run under torchrun: `python -m mmtrain.train`'s main() with spies around every optimizer step,
for the guard tests. Each rank saves OUT.rank<R>.pt with one row per step (the guard's decision,
whether the gathered trainable weights changed, DeepSpeed's step counters, the scheduler's
position, the optimizer's update count) and the sample ids each step read; exits with main()'s code.

    MMTRAIN_INJECT_LOSS=3:nan@1 torchrun --nproc_per_node 2 tests/dist/guard_probe.py OUT RECIPE key=value ...
"""

import os
import sys

import deepspeed
import torch

from mmtrain.data.stream import TrainLoader
from mmtrain.engine.distributed import exit_process
from mmtrain.engine.trainer import Trainer
from mmtrain.train import main

ROWS, SEEN_IDS, WEIGHTS_AFTER, GROUPS = [], [], {}, {}


def gathered_weights(model):
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters([p for _, p in params]):
        return {n: p.detach().clone() for n, p in params}


def optimizer_updates(engine) -> int:
    """Updates the optimizer applied: AdamW's step count on its (ZeRO-partitioned) parameters."""
    steps = [int(s["step"]) for s in engine.optimizer.optimizer.state.values() if "step" in s]
    return max(steps, default=0)


def spy_step(original):
    def train_step(self):
        engine = self.engine
        if not GROUPS:
            # The timeout of the process group DeepSpeed's ZeRO collectives run on (its world clone).
            from deepspeed.utils import groups

            backend = groups._get_data_parallel_group()._get_backend(torch.device("cpu"))
            GROUPS["zero_timeout_s"] = backend.options._timeout.total_seconds()
        before = gathered_weights(engine.module)
        first_id = len(SEEN_IDS)
        record = original(self)
        after = gathered_weights(engine.module)
        row = {
            "step": record["step"],
            "guard": record["guard"],
            "trainer_step": self.step,
            "changed": sorted(n for n in before if not torch.equal(before[n], after[n])),
            "global_steps": engine.global_steps,
            "skipped_steps": engine.skipped_steps,
            "scheduler_steps": engine.lr_scheduler.last_epoch,
            "optimizer_updates": optimizer_updates(engine),
            "sample_ids": SEEN_IDS[first_id:],
        }
        if record["guard"] == "rolled_back":
            restored = WEIGHTS_AFTER[self.step]
            row["equals_weights_of_step"] = all(torch.equal(after[n], restored[n]) for n in after)
        WEIGHTS_AFTER[self.step] = after
        ROWS.append(row)
        return record

    return train_step


def spy_hand_out(original):
    def _hand_out(self, batch):
        SEEN_IDS.extend(batch["meta"]["sample_ids"])
        return original(self, batch)

    return _hand_out


if __name__ == "__main__":
    out = sys.argv[1]
    Trainer.train_step = spy_step(Trainer.train_step)
    TrainLoader._hand_out = spy_hand_out(TrainLoader._hand_out)
    code = main(sys.argv[2:])
    torch.save({"rows": ROWS, "seen_ids": SEEN_IDS, "exit_code": code, **GROUPS}, f"{out}.rank{os.environ['RANK']}.pt")
    exit_process(code)
