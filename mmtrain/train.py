"""`python -m mmtrain.train RECIPE [key=value ...]`: one rank of a training run.

Start it under any launcher; rank and world come from the environment:
    python -m mmtrain.train recipes/tiny/otter_shapes.yaml                       (one process)
    torchrun --standalone --nproc_per_node 2 -m mmtrain.train recipes/tiny/otter_shapes.yaml
    deepspeed --num_gpus 8 --module mmtrain.train recipes/idefics/idefics9b_obelics.yaml train.max_steps=100
(the deepspeed launcher spells it --module, not -m; the --local_rank=N it appends is dropped)

Exit status: 0 when the run reached its stop step; 75 (PREEMPTED_EXIT_CODE) after SIGTERM or SIGUSR1,
with a complete checkpoint at the step reached (requeue and resume=auto); 1 when this rank failed
or another rank's failure broke the run; 2 for a recipe error. The process then ends through
`mmtrain.engine.distributed.exit_process` (exit handlers run, interpreter teardown skipped: gloo's
worker threads could abort a finished rank there).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import List, Optional

from mmtrain.config import ConfigError, load_config

# After a failure, the most a rank spends closing down before it exits anyway.
SHUTDOWN_AFTER_FAILURE_S = 30.0


def without_local_rank(argv: List[str]) -> List[str]:
    """Drop the `--local_rank=N` (or `--local_rank N`, `--local-rank ...`) that the deepspeed
    launcher appends; the local rank is read from LOCAL_RANK instead."""
    out: List[str] = []
    skip_value = False
    for arg in argv:
        if skip_value:
            skip_value = False
        elif arg in ("--local_rank", "--local-rank"):
            skip_value = True
        elif not arg.startswith(("--local_rank=", "--local-rank=")):
            out.append(arg)
    return out


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = without_local_rank(argv)
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

    from mmtrain.engine import distributed
    from mmtrain.engine.trainer import Trainer

    trainer = Trainer(cfg)
    # Before setup: a preemption signal during start-up is acted on at the first step boundary.
    trainer.stop_signals.install()
    failed = True
    try:
        trainer.setup()
        code = trainer.train()  # 0, or PREEMPTED_EXIT_CODE after a stop signal
        failed = False
    except Exception as error:  # noqa: BLE001 - every rank reports its own failure, then exits non-zero
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        log = logging.getLogger("mmtrain")
        distributed.report_failure(error, rank, world, log)
        # Tearing down a broken process group can block; the launcher must see this rank exit.
        distributed.exit_watchdog(1, SHUTDOWN_AFTER_FAILURE_S, log)
        code = 1
    finally:
        try:
            trainer.close()
        except Exception:
            if not failed:
                raise
    return code


if __name__ == "__main__":
    from mmtrain.engine.distributed import exit_process

    exit_process(main())
