"""Run under torchrun (any number of ranks): a model built partitioned (DeepSpeed zero.Init) plus
the engine's deferred initialisation must equal a plain build with the same seed, parameter for
parameter. Exits non-zero listing the parameters that differ."""

import sys

import torch

from mmtrain.engine.build import run_deferred_init
from mmtrain.engine.distributed import destroy, exit_process, init_distributed
from mmtrain.models.registry import build_model

TOKEN_IDS = {"image": 50, "end_of_chunk": 51, "answer": 52, "bos": 1, "eos": 2, "pad": 3,
             "base_vocab_size": 50, "num_added_tokens": 3}


def main() -> int:
    dist = init_distributed(120)
    import deepspeed

    torch.manual_seed(0)
    plain = dict(build_model("otter-tiny", {}, TOKEN_IDS).named_parameters())
    torch.manual_seed(0)
    config = {"train_batch_size": dist.world_size, "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    with deepspeed.zero.Init(config_dict_or_path=config):
        model = build_model("otter-tiny", {}, TOKEN_IDS, init_deferred=False)
    run_deferred_init(model, dist.rank)
    differing = []
    for name, param in model.named_parameters():
        with deepspeed.zero.GatheredParameters([param]):
            full = param.data.float().clone()
        ref = plain[name].data.float()
        if not torch.equal(full, ref):
            differing.append(f"{name}: std {full.std().item():.4f} vs {ref.std().item():.4f}, "
                             f"max abs diff {(full - ref).abs().max().item() if full.shape == ref.shape else 'shape'}")
    # Leave the process group cleanly: a rank exiting with gloo's threads still up can abort
    # ("terminate called without an active exception") after every check has passed.
    torch.distributed.barrier()
    destroy()
    if differing:
        print("partitioned build differs from the plain one:\n" + "\n".join(differing), file=sys.stderr)
        return 1
    print(f"rank {dist.rank}: {len(plain)} parameters match")
    return 0


if __name__ == "__main__":
    exit_process(main())
