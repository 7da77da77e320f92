"""`python -m mmtrain.train RECIPE [key=value ...]`: one rank of a training run.

Start it under any launcher; rank and world come from the environment:
    python -m mmtrain.train recipes/tiny/otter_shapes.yaml                       (one process)
    torchrun --standalone --nproc_per_node 2 -m mmtrain.train recipes/tiny/otter_shapes.yaml
    deepspeed --num_gpus 8 -m mmtrain.train recipes/idefics/9b.yaml train.max_steps=100
"""

from __future__ import annotations

import sys
from typing import List, Optional

from mmtrain.config import ConfigError, load_config


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = [a for a in argv if not a.startswith("--local_rank") and not a.startswith("--local-rank")]
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if args else 2
    try:
        cfg, warnings = load_config(args[0], args[1:])
        from mmtrain.engine.optim import check_model_section

        check_model_section(cfg.model.name, cfg.model.trainable, cfg.optim.group_lr)
    except ConfigError as e:
        print(f"mmtrain: config error: {e}", file=sys.stderr)
        return 2
    for w in warnings:
        print(f"mmtrain: warning: {w}", file=sys.stderr)

    from mmtrain.engine.trainer import Trainer

    trainer = Trainer(cfg)
    try:
        trainer.setup()
        trainer.train()
    finally:
        trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
