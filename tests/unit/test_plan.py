"""`mmtrain plan`: the memory arithmetic against hand-computed numbers, and the published flavours
counted on the meta device (no memory, real parameter counts) against the anchors users get wrong."""

import dataclasses
import os
import resource
import subprocess
import sys

import pytest

from mmtrain.engine.plan import (
    CONTEXT_GIB,
    FRAGMENTATION,
    GIB,
    HEADROOM,
    ActivationShape,
    ModelCounts,
    Workload,
    activation_bytes,
    estimate,
    fits,
    make_plan,
    offload_partitions,
    pinned_bytes,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
IDEFICS_RECIPE = os.path.join(REPO, "recipes", "idefics", "idefics9b_obelics.yaml")

# A decoder-only shape small enough to compute by hand.
SHAPE = ActivationShape(hidden_size=8, num_layers=2, num_cross_attn_layers=0, kv_hidden_size=8,
                        mlp_elements_per_token=4 * 16, num_heads=2, vocab_size=10, attention_stores_scores=False)


def _counts(total, trainable, largest=0, largest_trainable=0, persistent=0, shape=SHAPE):
    return ModelCounts("hand", {"frozen": (total - trainable, 0), "trained": (trainable, trainable)},
                       largest, largest_trainable, persistent, shape)


# Buckets of 0 elements: only the states are left to compare with the hand numbers.
NO_BUCKETS = Workload(micro_batch_size=1, seq_tokens=4, images_per_seq=0, reduce_bucket_elements=0,
                      prefetch_bucket_elements=0, allgather_bucket_elements=0)


def _states(est):
    return est.gpu_bytes["weights"] + est.gpu_bytes["gradients"] + est.gpu_bytes["optimizer"]


def test_adam_mixed_precision_is_16_bytes_per_trainable_and_2_per_frozen_parameter():
    everything_trains = _counts(10**9, 10**9)
    assert _states(estimate(everything_trains, NO_BUCKETS, 1, 0)) == 16 * 10**9
    all_frozen_but_one = _counts(10**9, 1)
    assert _states(estimate(all_frozen_but_one, NO_BUCKETS, 1, 0)) == 2 * (10**9 - 1) + 16
    fp32 = dataclasses.replace(NO_BUCKETS, precision="fp32")
    assert _states(estimate(everything_trains, fp32, 1, 0)) == (4 + 4 + 8) * 10**9


@pytest.mark.parametrize("stage, expected", [
    # 8 ranks, P = 800, P_t = 400: weights 2P, grads 2P_t, Adam 12 P_t, divided as each stage says.
    (0, 2 * 800 + 2 * 400 + 12 * 400),
    (1, 2 * 800 + 2 * 400 + 12 * 400 / 8),
    (2, 2 * 800 + 2 * 400 / 8 + 12 * 400 / 8),
    (3, (2 * 800 + 2 * 400 + 12 * 400) / 8),
])
def test_each_zero_stage_partitions_what_it_should(stage, expected):
    assert _states(estimate(_counts(800, 400), NO_BUCKETS, 8, stage)) == pytest.approx(expected)


def test_zero3_adds_persistent_parameters_the_gathered_layer_and_buckets():
    counts = _counts(10_000, 4_000, largest=1_000, largest_trainable=300, persistent=200)
    work = Workload(micro_batch_size=1, seq_tokens=4, images_per_seq=0, reduce_bucket_elements=500,
                    prefetch_bucket_elements=700, overlap_comm=True)
    est = estimate(counts, work, 4, 3)
    # Persistent tensors whole instead of a quarter, the largest module plus the prefetch bucket
    # gathered, the largest trainable module's full gradient: all bf16.
    assert est.gpu_bytes["gathered"] == pytest.approx(2 * (200 * 3 / 4 + 1_000 + 700 + 300))
    assert est.gpu_bytes["buffers"] == 2 * 500 * 2  # overlap_comm double-buffers the reduce bucket
    stage2 = estimate(counts, work, 4, 2)
    # Stages 1-2: DeepSpeed's 4.5x for overlap_comm over reduce + all-gather buckets, each capped
    # at what it can hold (the reduce bucket at the trainable parameters).
    assert stage2.gpu_bytes["buffers"] == pytest.approx(2 * (500 + 10_000) * 4.5)


def test_offload_moves_optimizer_and_parameters_to_the_host():
    counts = _counts(8_000, 4_000)
    plain = estimate(counts, NO_BUCKETS, 4, 3)
    opt = estimate(counts, NO_BUCKETS, 4, 3, offload_optimizer=True)
    both = estimate(counts, NO_BUCKETS, 4, 3, offload_optimizer=True, offload_params=True)
    assert opt.gpu_bytes["optimizer"] == opt.gpu_bytes["gradients"] == 0
    # One partition of 1,000 elements per rank: m and v (8,000 B), the fp32 gradient and the fp32
    # master pinned (4,000 B each, taking 4,096), and at stage 3 the bf16 gradient partitions (2,000
    # B, taking 2,048); tests/dist/test_offload_host_plan.py holds this against DeepSpeed's buffers.
    assert opt.host_bytes_per_rank == 8_000 + 4_096 + 4_096 + 2_048
    unpinned = estimate(counts, dataclasses.replace(NO_BUCKETS, pinned_upload=False), 4, 3, offload_optimizer=True)
    assert unpinned.host_bytes_per_rank == 8_000 + 4_096 + 4_000 + 2_048
    # Stage 2 pins the master itself, and keeps a pinned bf16 copy of the weights instead.
    assert estimate(counts, NO_BUCKETS, 4, 2, offload_optimizer=True).host_bytes_per_rank == 8_000 + 4_096 + 4_096 + 2_048
    # Parameter offload parks the weights there too; the master is not pinned (no upload).
    assert both.gpu_bytes["weights"] == 0
    assert both.host_bytes_per_rank == 8_000 + 4_096 + 4_000 + 2_048 + 2 * 8_000 / 4
    assert plain.gpu_total_bytes > opt.gpu_total_bytes > both.gpu_total_bytes
    with pytest.raises(ValueError, match="stage >= 2"):
        estimate(counts, NO_BUCKETS, 4, 1, offload_optimizer=True)
    with pytest.raises(ValueError, match="stage 3"):
        estimate(counts, NO_BUCKETS, 4, 2, offload_params=True)


def test_activation_formula_by_hand():
    counts = _counts(100, 100)
    # T = 2 x 4 = 8 tokens; per layer A = 6h + 2kv + f = 48 + 16 + 64 = 128 elements per token.
    work = Workload(micro_batch_size=2, seq_tokens=4, images_per_seq=0, activation_checkpointing=False)
    loss = 2 * 4 * 10 * (2 + 4 + 4)
    assert activation_bytes(counts, work) == 2 * (8 * 2 * 128 + 2 * 8 * 8) + loss
    ckpt = Workload(micro_batch_size=2, seq_tokens=4, images_per_seq=0, activation_checkpointing=True)
    # Checkpointing: each layer's input (h) plus one layer's working set.
    assert activation_bytes(counts, ckpt) == 2 * (8 * (2 * 8 + 128) + 2 * 8 * 8) + loss
    # Every 2nd layer of the 2: layer 0 keeps only its input, layer 1 stores all of its A.
    half = dataclasses.replace(ckpt, checkpoint_every_n_layers=2)
    assert activation_bytes(counts, half) == 2 * (8 * (8 + 128 + 128) + 2 * 8 * 8) + loss
    eager = dataclasses.replace(SHAPE, attention_stores_scores=True)
    # Eager attention adds heads x seq x 2 elements per token and layer: 2 x 4 x 2 = 16.
    assert activation_bytes(_counts(100, 100, shape=eager), work) == 2 * (8 * 2 * 144 + 2 * 8 * 8) + loss


def test_allowance_and_headroom():
    est = estimate(_counts(10**6, 10**6), NO_BUCKETS, 1, 0)
    rest = est.gpu_total_bytes - est.gpu_bytes["allowance"]
    assert est.gpu_bytes["allowance"] == pytest.approx(CONTEXT_GIB * GIB + FRAGMENTATION * rest)
    just_enough_gib = est.gpu_total_bytes / GIB / (1 - HEADROOM)
    assert fits(est, just_enough_gib * 1.001, None, 1) and not fits(est, just_enough_gib * 0.999, None, 1)
    offloaded = estimate(_counts(10**9, 10**9), NO_BUCKETS, 2, 3, True, True)
    # Two ranks per node share the host: each its optimizer state, gradients and weights.
    host_gib = 2 * offloaded.host_bytes_per_rank / GIB
    assert fits(offloaded, 80, host_gib / (1 - HEADROOM) * 1.01, 2)
    assert not fits(offloaded, 80, host_gib / (1 - HEADROOM) * 0.99, 2)


def test_recommendation_is_cheapest_stage_largest_micro_batch_and_keeps_the_global_batch():
    # 1.5B trainable parameters, a 50k vocabulary: ~0.5 GiB of loss activations per sequence of 1024.
    counts = _counts(15 * 10**8, 15 * 10**8, shape=dataclasses.replace(SHAPE, vocab_size=50_000))
    work = Workload(micro_batch_size=1, seq_tokens=1024, images_per_seq=0)
    plan = make_plan(counts, work, num_gpus=4, gpu_mem_gib=24, global_batch_size=64)
    rec = plan.recommended
    # Stage 0 holds 16 B x 1.5e9 = 22.4 GiB of states: over 90% of 24 GiB. Stage 1 partitions Adam
    # (4.2 GiB per rank) and adds 4.6 GiB of overlap_comm buckets: the first that fits.
    assert not fits(estimate(counts, work, 4, 0), 24, None, 4)
    assert (rec.zero_stage, rec.offload) == (1, "none")
    micro = rec.micro_batch_size
    assert micro & (micro - 1) == 0 and micro * plan.grad_accum_steps * 4 == 64
    assert 1 < micro < 16  # the activations, not the global batch, bound it here
    assert fits(estimate(counts, dataclasses.replace(work, micro_batch_size=micro), 4, 1), 24, None, 4)
    assert not fits(estimate(counts, dataclasses.replace(work, micro_batch_size=2 * micro), 4, 1), 24, None, 4)
    assert f"train.micro_batch_size={micro}" in plan.overrides and "deepspeed.zero_stage=1" in plan.overrides
    assert "train.global_batch_size=64" in plan.overrides


def test_nothing_fits_says_what_would():
    plan = make_plan(_counts(10**10, 10**10), Workload(micro_batch_size=1, seq_tokens=2048, images_per_seq=0),
                     num_gpus=1, gpu_mem_gib=24, global_batch_size=8, host_mem_gib=32)
    assert plan.recommended is None
    text = " ".join(plan.advice)
    assert "more GPUs" in text and "offload" in text and "32 is less" in text
    uneven = make_plan(_counts(10, 10), NO_BUCKETS, num_gpus=4, gpu_mem_gib=24, global_batch_size=6)
    assert uneven.recommended is None and "multiple of 4" in uneven.advice[0]


# --- the published flavours, counted on the meta device -----------------------------------------

@pytest.fixture(scope="module")
def published():
    from mmtrain.config import load_config
    from mmtrain.engine.plan import count_model

    rss_before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {}
    for name, overrides in {
        "idefics-9b": [],  # the recipe: perceiver, cross_attn, new_tokens train
        "idefics-80b-full": ["model.name=idefics-80b", "model.trainable=[vision,perceiver,cross_attn,decoder,new_tokens]"],
        "otter-9b": ["model.name=otter-9b", "model.trainable=null", "data.template=simple"],
        "fuyu-8b": ["model.name=fuyu-8b", "model.trainable=null", "data.template=fuyu"],
    }.items():
        cfg, _ = load_config(IDEFICS_RECIPE, overrides)
        out[name] = (cfg, count_model(cfg))
    out["rss_growth_gib"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before_kib) / 2**20
    return out


def test_published_flavours_build_on_meta_without_memory(published):
    from mmtrain.engine.offline import count_params
    from mmtrain.models.registry import get_spec

    # 98B parameters in bf16 would be ~180 GiB; the builds together stay under 1 GiB of peak RSS.
    assert published["rss_growth_gib"] < 1.0
    for name in ("idefics-9b", "otter-9b", "fuyu-8b"):
        counts = published[name][1]
        assert (counts.total_params, counts.trainable_params) == count_params(get_spec(counts.flavour))
    idefics = published["idefics-9b"][1]
    assert idefics.groups["decoder"][1] == 0 and idefics.groups["vision"][1] == 0
    assert idefics.groups["cross_attn"][0] == idefics.groups["cross_attn"][1] > 10**9
    full_80b = published["idefics-80b-full"][1]
    assert full_80b.frozen_params == 0 and full_80b.total_params > 79 * 10**9
    # Fuyu's 262144 x 4096 embedding is the largest layer ZeRO-3 gathers.
    assert published["fuyu-8b"][1].largest_module_params == 262144 * 4096


def test_idefics_9b_frozen_decoder_on_4x24_fits_at_zero3_without_offload(published):
    from mmtrain.engine.plan import workload_from_config

    cfg, counts = published["idefics-9b"]
    work = workload_from_config(cfg)
    est = estimate(counts, work, 4, 3)
    # Model states by hand: (2 B x all + 14 B x trainable) / 4 ranks, about 9.3 GiB.
    assert _states(est) == pytest.approx((2 * counts.total_params + 14 * counts.trainable_params) / 4)
    assert 8 * GIB < _states(est) < 10 * GIB
    assert est.gpu_total_bytes < 20 * GIB  # at the recipe's micro-batch 4, seq 1024, 5 images
    plan = make_plan(counts, work, num_gpus=4, gpu_mem_gib=24, global_batch_size=256)
    assert (plan.recommended.zero_stage, plan.recommended.offload) == (3, "none")


def test_idefics_80b_full_does_not_fit_one_24gib_gpu_without_offload(published):
    from mmtrain.engine.plan import workload_from_config

    cfg, counts = published["idefics-80b-full"]
    work = workload_from_config(cfg)
    for stage in range(4):
        assert not fits(estimate(counts, dataclasses.replace(work, micro_batch_size=1), 1, stage), 24, None, 1)
    # With a 256 GiB host not even full offload fits (80B trainable need ~1.2 TiB of Adam state).
    plan = make_plan(counts, work, num_gpus=1, gpu_mem_gib=24, global_batch_size=256, host_mem_gib=256)
    assert plan.recommended is None and any("more GPUs" in a for a in plan.advice)


def test_fuyu_8b_full_finetune_needs_offload_on_4x24_but_not_on_8x80(published):
    from mmtrain.engine.plan import workload_from_config

    cfg, counts = published["fuyu-8b"]
    work = dataclasses.replace(workload_from_config(cfg), seq_tokens=2048, images_per_seq=1)
    small = make_plan(counts, work, num_gpus=4, gpu_mem_gib=24, global_batch_size=128)
    assert small.recommended.offload_optimizer
    big = make_plan(counts, work, num_gpus=8, gpu_mem_gib=80, global_batch_size=128)
    assert not big.recommended.offload_optimizer


def test_plan_cli_json_overrides_load_and_nothing_fits_exits_nonzero(tmp_path):
    import json

    from mmtrain.cli import main
    from mmtrain.config import derive_batch, load_config

    tiny = os.path.join(REPO, "recipes", "tiny", "otter_shapes.yaml")
    out = tmp_path / "plan.json"
    code = subprocess.run([sys.executable, "-m", "mmtrain.cli", "plan", tiny, "--gpus", "2", "--gpu-mem-gib", "8",
                           "--json", "data.max_seq_tokens=128"], capture_output=True, text=True, cwd=REPO)
    assert code.returncode == 0, code.stderr
    out.write_text(code.stdout)
    plan = json.loads(out.read_text())
    assert plan["model"] == "otter-tiny" and plan["recommended"]["zero_stage"] == 0
    cfg, _ = load_config(tiny, plan["overrides"])  # what plan prints must be a valid recipe override
    assert derive_batch(cfg, 2)["grad_accum_steps"] == plan["grad_accum_steps"]
    # idefics-80b in full on one 24 GiB GPU with 64 GiB of host: nothing fits, exit 1, and why.
    code = main(["plan", IDEFICS_RECIPE, "--gpus", "1", "--gpu-mem-gib", "24", "--host-mem-gib", "64",
                 "model.name=idefics-80b", "model.trainable=[vision,perceiver,cross_attn,decoder,new_tokens]"])
    assert code == 1
    assert main(["plan", IDEFICS_RECIPE, "--gpus", "4", "--gpu-mem-gib", "24", "model.name=idefics-9x"]) == 2


def test_plan_arithmetic_imports_no_torch():
    done = subprocess.run([sys.executable, "-c", "import sys, mmtrain.engine.plan; sys.exit('torch' in sys.modules)"],
                          cwd=REPO)
    assert done.returncode == 0


def test_pinned_buffers_take_a_power_of_two():
    assert [pinned_bytes(n) for n in (0, 1, 4_000, 4_096, 4_097)] == [0, 1, 4_096, 4_096, 8_192]


def test_offload_partitions_follow_deepspeeds_sub_groups():
    counts = dataclasses.replace(_counts(1_000, 1_000), adamw_group_numels=((300, 500, 100), (7,)))
    # Stage 2: one partition per AdamW group, its flat parameters split N ways (rounded up).
    assert offload_partitions(counts, 2, 2, 10**9) == [450, 4]
    # Stage 3: each parameter's share rounded up; a sub-group closes at the first parameter that
    # brings it to sub_group_size, and a group no larger than that is one sub-group.
    assert offload_partitions(counts, 2, 3, 10**9) == [450, 4]
    assert offload_partitions(counts, 2, 3, 150) == [150, 250, 50, 4]
    assert offload_partitions(counts, 2, 3, 300) == [400, 50, 4]
    # Without the AdamW layout (hand-made counts): one tensor of all the trainable parameters.
    assert offload_partitions(_counts(1_000, 999), 2, 3, 10**9) == [500]
