"""Run under torchrun: real DeepSpeed ZeRO-2 and ZeRO-3 optimizer offload on CPU (gloo) of the
idefics-tiny flavour, built as bench/perf.py builds a run (mmtrain's AdamW groups, small ZeRO-3
sub-groups), one step each. Rank 0 saves, per stage, what `mmtrain plan` needs to get right about
the host: the elements of each fp32 partition the host AdamW updates, and the bytes of every host
tensor DeepSpeed keeps for it (fp32 masters and gradients, Adam's moments, 16-bit buffers), with
the plan's own figures for the same recipe (mmtrain.engine.plan, counted on the meta device).

    torchrun --nproc_per_node N tests/dist/offload_host_probe.py OUT.pt
"""

import argparse
import os
import sys

import torch

from mmtrain.engine.distributed import exit_process, init_distributed
from mmtrain.engine.offline import flavour_nominal_token_ids

SUB_GROUP_ELEMENTS = 20_000
# bench/perf.py builds the run; a script's path starts at its own folder.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def _host_tensors(opt, stage: int):
    """DeepSpeed's host-side tensors for the offloaded optimizer: (name, tensor) of each."""
    if stage == 3:
        flats = opt.fp32_partitioned_groups_flat
        extra = [("16-bit gradient partitions", opt.grad_partitions_flat_buffer)]
    else:
        flats = opt.single_partition_of_fp32_groups
        extra = [(f"16-bit weights {i}", t) for i, t in enumerate(opt.param_buffer_of_bit16_for_cpu_offload_groups)]
    out = []
    for i, flat in enumerate(flats):
        out += [(f"master {i}", flat), (f"gradient {i}", flat.grad)]
        out += [(f"{key} {i}", value) for key, value in opt.optimizer.state[flat].items() if torch.is_tensor(value) and value.dim()]
    return [part.numel() for part in flats], out + extra


def run(stage: int, dist) -> dict:
    from bench.perf import _build_mmtrain, _flamingo_batch, _run_config
    from mmtrain.engine.plan import count_model, offload_host_bytes, offload_partitions
    from mmtrain.models.registry import get_spec

    args = argparse.Namespace(model="idefics-tiny", seq_len=64, images=1, micro_batch=1, docs_per_row=1)
    cfg = _run_config(args, ["deepspeed.offload_optimizer=true", f"deepspeed.zero_stage={stage}",
                             f"deepspeed.extra.zero_optimization.sub_group_size={SUB_GROUP_ELEMENTS}"])
    spec = get_spec(cfg.model.name)
    token_ids = flavour_nominal_token_ids(spec)  # as count_model builds it: the plan and the run agree
    engine, _ = _build_mmtrain(cfg, token_ids, dist)
    batch = _flamingo_batch(args, token_ids, spec.config, 0, dist.device, vanilla=False)
    engine.backward(engine(**batch).loss)
    engine.step()
    parts, tensors = _host_tensors(engine.optimizer, stage)
    storages = {}
    for name, tensor in tensors:
        assert tensor.device.type == "cpu", name
        storages.setdefault(tensor.untyped_storage().data_ptr(), (name, tensor.untyped_storage().nbytes()))
    counts = count_model(cfg)
    planned_parts = offload_partitions(counts, dist.world_size, stage, SUB_GROUP_ELEMENTS)
    engine.destroy()
    return {"parts": parts, "host_bytes": sum(nbytes for _, nbytes in storages.values()),
            "tensors": sorted(storages.values()), "planned_parts": planned_parts,
            # On a CPU run nothing is pinned: requests take what they ask.
            "planned_bytes": offload_host_bytes(planned_parts, stage, 2, master_pinned=False, pinned=lambda n: n)}


def main() -> None:
    dist = init_distributed(120)
    result = {stage: run(stage, dist) for stage in (2, 3)}
    if dist.rank == 0:
        torch.save(result, sys.argv[1])
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
    exit_process(0)
