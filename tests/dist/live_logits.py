"""Run under torchrun: resume a run's newest checkpoint on every rank, compute logits on one batch
with the live (ZeRO-3 partitioned) model, and save batch and logits from rank 0.

    torchrun --nproc_per_node 2 tests/dist/live_logits.py RECIPE OUT.pt key=value ...
"""

import sys

import torch

from mmtrain.config import load_config
from mmtrain.engine.distributed import exit_process
from mmtrain.engine.trainer import Trainer


def main() -> None:
    recipe, out, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
    cfg, _ = load_config(recipe, overrides)
    trainer = Trainer(cfg)
    try:
        trainer.setup()
        assert trainer.step > 0, "expected to resume from a checkpoint"
        batch = next(trainer.data_iter)
        model = trainer.engine.module
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], images=batch["images"],
                           attention_mask=batch["attention_mask"]).logits
        if trainer.dist.rank == 0:
            keep = {k: batch[k] for k in ("input_ids", "images", "attention_mask")}
            torch.save({"batch": keep, "logits": logits.float()}, out)
    finally:
        trainer.close()


if __name__ == "__main__":
    main()
    exit_process(0)
