"""Run under torchrun: real DeepSpeed ZeRO-3 with optimizer offload (CPU, gloo) and torch's fused
AdamW on the host, trained a few steps with DeepSpeed's own gradient clip and again with the clip
folded into the AdamW (mmtrain.engine.offload.install_folded_clip), from the same start. Rank 0
saves, per variant: the fp32 master partitions after the steps, the global gradient norm of each
step, and the grad_scale the host AdamW was handed at each sub-group update; and how many ranks
share this rank's cores (mmtrain.engine.offload's host threads).

    torchrun --nproc_per_node N tests/dist/offload_clip_probe.py OUT.pt CLIP_THRESHOLD
"""

import sys

import deepspeed
import torch

from mmtrain.engine.distributed import exit_process
from mmtrain.engine.offload import _sharing_ranks, install_folded_clip

STEPS = 3


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 96), torch.nn.GELU(), torch.nn.Linear(96, 32), torch.nn.LayerNorm(32))


def run(clip_threshold: float, fold: bool) -> dict:
    model = _model()
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, fused=True)
    config = {
        "train_micro_batch_size_per_gpu": 4, "gradient_clipping": clip_threshold, "bf16": {"enabled": True},
        # Small sub-groups: each rank updates its partition in several pieces, as a large model does.
        "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}, "sub_group_size": 1000},
        "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False,
    }
    engine, zero3, _, _ = deepspeed.initialize(model=model, optimizer=adamw, config=config)
    installed = install_folded_clip(zero3) if fold else False
    scales = []
    original_step = adamw.step

    def recording_step(*args, **kwargs):
        scale = getattr(adamw, "grad_scale", None)
        scales.append(None if scale is None else float(scale))
        return original_step(*args, **kwargs)

    adamw.step = recording_step
    norms = []
    for step in range(STEPS):
        gen = torch.Generator().manual_seed(100 + 10 * step + torch.distributed.get_rank())
        x = torch.randn(4, 32, generator=gen).to(torch.bfloat16)
        loss = engine(x).float().pow(2).mean() * 50.0  # large gradients: the clip acts at a small threshold
        engine.backward(loss)
        engine.step()
        norms.append(float(engine.get_global_grad_norm()))
    flats = [flat.detach().clone() for flat in zero3.fp32_partitioned_groups_flat]
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, {"flats": flats, "scales": scales})
    return {"installed": installed, "norms": norms, "sub_groups": len(flats),
            "ranks": gathered, "grad_scale_left": hasattr(adamw, "grad_scale")}


def main() -> None:
    out, clip_threshold = sys.argv[1], float(sys.argv[2])
    deepspeed.init_distributed("gloo")
    result = {"deepspeed": run(clip_threshold, fold=False), "folded": run(clip_threshold, fold=True),
              # The host-thread rule's gather: torchrun's ranks of one host share every core.
              "sharing_ranks": _sharing_ranks(local_world_size=1)}
    if torch.distributed.get_rank() == 0:
        torch.save(result, out)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
    # DeepSpeed keeps its gloo groups past destroy_process_group; the interpreter's teardown can
    # then abort a rank (see exit_process).
    exit_process(0)
