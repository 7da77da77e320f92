"""Run under torchrun: a run whose `model.init_from` is a list of sources (OpenFlamingo's release).
After setup every parameter, gathered one at a time, must equal the sources' (cast to the run's
dtype); then `load_published` is called again with a source list that lacks a key (BROKEN: the
paths joined by commas) and each rank records the error it raised; then the run trains to
train.max_steps. Rank r writes OUT_DIR/rank<r>.json.

    torchrun --nproc_per_node 2 tests/dist/init_from_openflamingo_probe.py RECIPE OUT_DIR BROKEN key=value ...
"""

import json
import os
import sys

from mmtrain.config import load_config
from mmtrain.engine.distributed import exit_process
from mmtrain.engine.load import load_published, verify_loaded
from mmtrain.engine.trainer import Trainer


def main() -> None:
    recipe, out_dir, broken, overrides = sys.argv[1], sys.argv[2], sys.argv[3].split(","), sys.argv[4:]
    cfg, _ = load_config(recipe, overrides)
    trainer = Trainer(cfg)
    try:
        trainer.setup()
        model = trainer.engine.module
        sources = [str(path) for path in cfg.model.init_from]
        differing = verify_loaded(model, sources)
        try:
            load_published(model, broken)
            error = None
        except ValueError as e:
            error = str(e)
        trainer.train()
        with open(os.path.join(out_dir, f"rank{trainer.dist.rank}.json"), "w") as f:
            json.dump({"differing": differing, "num_params": len(list(model.parameters())), "error": error,
                       "steps": trainer.step}, f)
    finally:
        trainer.close()


if __name__ == "__main__":
    main()
    exit_process(0)
