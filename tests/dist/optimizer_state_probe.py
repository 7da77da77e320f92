"""Run under torchrun: set up a Trainer (resuming when the recipe says so), optionally train to
`train.stop_at_step` first, then gather the full optimizer state of every parameter with DeepSpeed's
own accessors and save it from rank 0; then train `--then-steps` more steps and record their losses.

    torchrun --nproc_per_node N tests/dist/optimizer_state_probe.py RECIPE OUT.pt [--train] [--then-steps K] key=value ...
"""

import sys

import torch

from mmtrain.config import load_config
from mmtrain.engine.distributed import exit_process
from mmtrain.engine.trainer import Trainer


def full_state(trainer) -> dict:
    """Per parameter: fp32 master and Adam moments (trained) or the 16-bit weight (frozen); per
    AdamW group: step and learning rate. Collective (every rank gathers)."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    params = {}
    for name, param in trainer.engine.module.named_parameters():
        if param.requires_grad:
            params[name] = {"fp32": safe_get_full_fp32_param(param).clone(),
                            "exp_avg": safe_get_full_optimizer_state(param, "exp_avg").clone(),
                            "exp_avg_sq": safe_get_full_optimizer_state(param, "exp_avg_sq").clone()}
        else:
            with deepspeed.zero.GatheredParameters([param]):
                params[name] = {"weight": param.data.clone()}
    for group, members in trainer.engine.module.param_groups().items():
        for name, _ in members:
            params[name]["group"] = group
    opt = trainer.engine.optimizer
    groups = {}
    for sub, flat in enumerate(opt.fp32_partitioned_groups_flat):
        group = opt.optimizer.param_groups[opt.sub_group_to_group_id[sub]]
        groups[group["name"]] = {"step": float(opt.optimizer.state[flat]["step"]), "lr": group["lr"]}
    return {"params": params, "groups": groups, "step": trainer.step}


def main() -> None:
    args = sys.argv[1:]
    recipe, out = args[0], args[1]
    train_first = "--train" in args
    then_steps = int(args[args.index("--then-steps") + 1]) if "--then-steps" in args else 0
    overrides = [a for i, a in enumerate(args[2:], 2) if "=" in a and not a.startswith("--")]
    cfg, _ = load_config(recipe, overrides)
    trainer = Trainer(cfg)
    try:
        trainer.setup()
        if train_first:
            trainer.train()
        result = full_state(trainer)
        result["data"] = trainer.loader.state_dict()
        result["losses"] = [trainer.train_step()["loss"] for _ in range(then_steps)]
        result["world_size"] = trainer.dist.world_size
        if trainer.dist.rank == 0:
            torch.save(result, out)
    finally:
        trainer.close()


if __name__ == "__main__":
    main()
    exit_process(0)
