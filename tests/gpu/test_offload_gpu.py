"""ZeRO-3 optimizer offload with mmtrain's pinned upload (mmtrain/engine/offload.py): after every
optimizer step the GPU's bf16 weights are exactly the host's fp32 master weights rounded to bf16,
which is what DeepSpeed's own blocking copy leaves, for every sub-group, and the weights move.
Built the way bench/perf.py builds a run (one rank, the default host AdamW)."""

import argparse
import os

import pytest
import torch

pytestmark = pytest.mark.gpu


def _single_rank_env():
    from mmtrain.engine.distributed import free_port

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))


def test_pinned_upload_leaves_the_master_weights_rounded_on_the_gpu(monkeypatch):
    from bench.perf import _build_mmtrain, _flamingo_batch, _flavour_token_ids, _run_config
    from mmtrain.engine import offload
    from mmtrain.engine.distributed import init_distributed
    from mmtrain.engine.offload import _PinnedUpload
    from mmtrain.models.registry import get_spec

    # Chunks smaller than the sub-groups, dividing them unevenly: uploads of several chunks and a short last one.
    chunk = 4099
    monkeypatch.setattr(offload, "UPLOAD_CHUNK_ELEMENTS", chunk)
    _single_rank_env()
    dist = init_distributed(120)
    args = argparse.Namespace(model="idefics-tiny", seq_len=256, images=2, micro_batch=2, docs_per_row=1)
    # Small sub-groups, so several uploads are in flight while the host updates the next ones.
    # A large learning rate from the first step, so every update shows in bf16.
    cfg = _run_config(args, ["deepspeed.offload_optimizer=true", "optim.lr=0.01", "optim.warmup_steps=0",
                             "deepspeed.extra.zero_optimization.sub_group_size=20000"])
    spec = get_spec(cfg.model.name)
    token_ids = _flavour_token_ids(spec)
    engine, _ = _build_mmtrain(cfg, token_ids, dist)
    try:
        opt = engine.optimizer
        upload = opt._reassign_or_swap_out_partitioned_parameters
        assert isinstance(upload, _PinnedUpload), "optimizer offload on a GPU run must install the pinned upload"
        groups = [i for i in range(len(opt.fp16_partitioned_groups_flat)) if upload.applies(i)]
        assert len(groups) >= 3, f"expected several offloaded sub-groups, got {len(groups)}"
        unpinned = [i for i in groups if not opt.fp32_partitioned_groups_flat[i].is_pinned()]
        assert not unpinned, f"sub-groups {unpinned} not pinned at install"
        sizes = [opt.fp32_partitioned_groups_flat[i].numel() for i in groups]
        assert any(size > chunk and size % chunk for size in sizes), sizes
        initial = [opt.fp16_partitioned_groups_flat[i].detach().clone() for i in groups]
        for step in range(3):
            batch = _flamingo_batch(args, token_ids, spec.config, step, dist.device, vanilla=False)
            loss = engine(**batch, z_loss_weight=cfg.train.z_loss_weight).loss
            engine.backward(loss)
            engine.step()
            # Before any other CUDA call: the step returned with every upload done (the last
            # sub-group waits), as DeepSpeed's blocking copy left it.
            assert upload.last_upload is not None and upload.last_upload.query()
            assert torch.isfinite(loss.detach()).item()
            for i in groups:
                low = opt.fp16_partitioned_groups_flat[i]
                high = opt.fp32_partitioned_groups_flat[i].detach()
                assert high.is_pinned(), f"sub-group {i}: the master weights must be in pinned memory"
                # Still the tensor the host AdamW keeps its state for (pinning swaps its storage only).
                assert "exp_avg" in opt.optimizer.state[opt.fp32_partitioned_groups_flat[i]]
                assert torch.equal(low.cpu(), high.to(low.dtype)), f"step {step}, sub-group {i}: GPU weights are not the master's"
        # The gates start at zero, so most blocks get their first gradient only at the second step;
        # after three, every sub-group has moved on the GPU.
        still = [i for i, old in zip(groups, initial) if torch.equal(opt.fp16_partitioned_groups_flat[i], old)]
        assert not still, f"sub-groups {still} of {groups} never changed on the GPU"
    finally:
        engine.destroy()
        torch.distributed.destroy_process_group()
