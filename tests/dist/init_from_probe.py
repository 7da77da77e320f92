"""Run under torchrun: a run started with `model.init_from=DIR` (ZeRO-3 when the recipe says so).
After setup every parameter, gathered one at a time, must equal the file's (cast to the run's
dtype); the rows of a table that the file holds fewer of must be the fresh rows of a plain build
with the run's seed. Then the run trains to train.max_steps. Rank 0 writes the findings as JSON.

    torchrun --nproc_per_node 2 tests/dist/init_from_probe.py RECIPE OUT.json key=value ...
"""

import json
import sys

import torch

from mmtrain.config import load_config
from mmtrain.engine.distributed import exit_process
from mmtrain.engine.load import verify_loaded
from mmtrain.engine.trainer import Trainer
from mmtrain.models.registry import build_model
from mmtrain.models.weights import SafetensorsCheckpoint, full_shape, layout_of, plan_load


def main() -> None:
    recipe, out, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
    cfg, _ = load_config(recipe, overrides)
    trainer = Trainer(cfg)
    try:
        trainer.setup()
        import deepspeed

        model = trainer.engine.module
        differing = verify_loaded(model, cfg.model.init_from)
        with SafetensorsCheckpoint(cfg.model.init_from) as checkpoint:
            plan = plan_load([(n, full_shape(p)) for n, p in model.named_parameters()], checkpoint.shapes(),
                             layout_of(model))
        torch.manual_seed(cfg.train.seed)
        plain = dict(build_model(cfg.model.name, dict(cfg.model.overrides), trainer.token_ids.as_dict()).named_parameters())
        params = dict(model.named_parameters())
        padded = {}
        for entry in plan.padded():
            with deepspeed.zero.GatheredParameters([params[entry.name]]):
                rows = params[entry.name].data[entry.file_rows:].float()
                fresh = plain[entry.name].data[entry.file_rows:].to(params[entry.name].dtype).float()
                padded[entry.name] = {"file_rows": entry.file_rows, "rows": entry.shape[0],
                                      "fresh_rows_equal_plain_build": bool(torch.equal(rows, fresh))}
        trainer.train()
        if trainer.dist.rank == 0:
            with open(out, "w") as f:
                json.dump({"differing": differing, "num_params": len(params), "padded": padded,
                           "steps": trainer.step}, f)
    finally:
        trainer.close()


if __name__ == "__main__":
    main()
    exit_process(0)
