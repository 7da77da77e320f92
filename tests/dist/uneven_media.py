"""Run under torchrun with 2 ranks: rank 0 trains on text-only batches, rank 1 on batches with
images. ZeRO-3 gathers every module's weights collectively, so a rank that skipped the vision
tower for a text-only batch would leave the other waiting; the run must instead finish. Prints how
often each rank's vision tower ran.

    torchrun --nproc_per_node 2 tests/dist/uneven_media.py RECIPE key=value ...
"""

import sys

import torch

from mmtrain.config import load_config
from mmtrain.engine.distributed import exit_process
from mmtrain.engine.trainer import Trainer


def text_only(batches, image_id: int, filler_id: int):
    """The same batches with every `<image>` replaced by a plain token and no images at all."""
    for batch in batches:
        batch = dict(batch)
        batch["input_ids"] = batch["input_ids"].masked_fill(batch["input_ids"] == image_id, filler_id)
        batch["labels"] = batch["labels"].masked_fill(batch["labels"] == image_id, -100)
        batch["images"] = torch.zeros_like(batch["images"][:, :1])
        batch["num_images"] = torch.zeros_like(batch["num_images"])
        yield batch


def main() -> None:
    cfg, _ = load_config(sys.argv[1], sys.argv[2:])
    trainer = Trainer(cfg)
    try:
        trainer.setup()
        ids = trainer.token_ids
        if trainer.dist.rank == 0:
            trainer.data_iter = text_only(trainer.data_iter, ids.image, ids.eos)
        calls = []
        trainer.engine.module.vision_encoder.register_forward_hook(lambda *a: calls.append(1))
        trainer.train()
        print(f"rank {trainer.dist.rank}: {trainer.step} steps, vision tower ran {len(calls)} times", flush=True)
    finally:
        trainer.close()


if __name__ == "__main__":
    main()
    exit_process(0)
