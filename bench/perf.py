"""Training throughput of a model flavour (IDEFICS-9B, Otter-9B, OtterHD-8B ...) against vanilla
transformers + DeepSpeed ZeRO-3 in the same run, on the GPUs of one host.

    python3 -m bench.perf --model idefics-9b --gpus 1 --seq-len 2048 --micro-batch 4 \
        --variants vanilla,mmtrain,mmtrain-noac --out bench/results/perf_idefics9b_h200.json
    python3 -m bench.perf --model otterhd-8b --gpus 4 --seq-len 256 --micro-batch 2 \
        --variants vanilla,mmtrain --out bench/results/perf_otterhd8b_4xh200.json

Each variant runs in its own `torchrun` (a fresh process group and CUDA context, so one variant's
memory never counts against the next) on random weights and synthetic on-device batches (the data
path is benchmarked in bench/loader.py): `--warmup` steps, then `--steps` timed optimizer steps.

* vanilla: transformers' own class built from the same architecture, `gradient_checkpointing_enable()`,
  torch AdamW, DeepSpeed with its defaults for ZeRO-3 and bf16: what a user of the anchor code gets.
  IDEFICS: `IdeficsForVisionText2Text`, frozen as IDEFICS trains it (decoder and vision tower
  frozen; perceiver, gated cross-attention and the added-token rows train). Fuyu / OtterHD:
  `FuyuForCausalLM`, a full fine-tune.
* Batches: Flamingo flavours get `--micro-batch` rows of `--seq-len` tokens with `--images` 224-px
  images each (`--docs-per-row K`: K packed documents per row, with restarting positions). Fuyu
  flavours get variable resolution: step k uses the k-th size of FUYU_SIZES_PX
  (448 to 1024 px a side) for every row, as patch rows with a newline token each, then `<s>` and
  `--seq-len` text tokens; samples/s is their measure.
* mmtrain variants: the model and DeepSpeed JSON a run of the recipe builds (mmtrain.engine.build,
  mmtrain.config.deepspeed_json), with the variant's overrides (`name=k=v;k=v` on the command line
  or the named presets in VARIANTS).

One record per variant: tokens/s (all GPUs), frozen-aware MFU (mmtrain.engine.flops), peak memory,
and `vanilla_tokens_per_s` / `speedup_vs_vanilla` from the vanilla variant of the same run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List

RECIPES = {
    "idefics-9b": "recipes/idefics/idefics9b_obelics.yaml",
    "idefics-80b": "recipes/idefics/idefics9b_obelics.yaml",
    "otter-9b": "recipes/openflamingo/openflamingo9b_mmc4_laion.yaml",
    "openflamingo-9b": "recipes/openflamingo/openflamingo9b_mmc4_laion.yaml",
    "idefics-tiny": "recipes/idefics/idefics9b_obelics.yaml",
    "otter-tiny": "recipes/openflamingo/openflamingo9b_mmc4_laion.yaml",
    "otterhd-8b": "recipes/otterhd/otterhd8b_mimicit.yaml",
    "fuyu-tiny": "recipes/otterhd/otterhd8b_mimicit.yaml",
}
# Image sizes (height, width) the Fuyu steps cycle through: OtterHD's 448-1024 px range.
FUYU_SIZES_PX = [(448, 448), (1024, 768), (768, 1024), (1024, 1024), (640, 960), (960, 640)]
PATCH_PX = 30
# Fuyu-8B's tokenizer: 262,144 ids, `|SPEAKER|` as the image-patch token, `|NEWLINE|` after each patch row.
FUYU_TOKEN_IDS = {"image": 71011, "image_newline": 71019, "bos": 1, "eos": 2, "pad": 0,
                  "base_vocab_size": 262144, "num_added_tokens": 0}

# Named mmtrain variants: recipe overrides measured against each other and against vanilla.
VARIANTS: Dict[str, List[str]] = {
    "mmtrain": [],
    "mmtrain-unfused": ["model.fused_kernels=false"],
    "mmtrain-noleaf": ["deepspeed.leaf_blocks=false"],
    "mmtrain-noac": ["model.activation_checkpointing=false"],
    # Every parameter stays gathered (ZeRO-3 keeps what is below the threshold resident): frozen
    # weights are never re-gathered, at the memory cost of a full replica on each GPU.
    "mmtrain-persist": ["deepspeed.param_persistence_threshold_elements=100000000000"],
    "mmtrain-noac-persist": ["model.activation_checkpointing=false",
                             "deepspeed.param_persistence_threshold_elements=100000000000"],
}


def _parse_variant(spec: str) -> tuple:
    if spec == "vanilla":
        return "vanilla", None
    if "=" in spec.split(";")[0].split(":")[0] and ":" not in spec:
        raise SystemExit(f"variant {spec!r}: write custom variants as name:key=value;key=value")
    name, _, custom = spec.partition(":")
    if custom:
        return name, [kv for kv in custom.split(";") if kv]
    if name not in VARIANTS:
        raise SystemExit(f"unknown variant {name!r}: one of vanilla, {', '.join(VARIANTS)} or name:key=value;...")
    return name, VARIANTS[name]


# --------------------------------------------------------------------------------------------
# One variant, one rank (under torchrun)


def _run_config(args, overrides: List[str]):
    from mmtrain.config import load_config

    base = [
        "model.init_from=null", "model.tokenizer=unused", f"model.name={args.model}",
        f"data.max_seq_tokens={args.seq_len}", f"data.max_images={args.images}",
        f"train.micro_batch_size={args.micro_batch}", "train.global_batch_size=null", "train.grad_accum_steps=1",
        "train.precision=bf16", f"data.packing={'true' if args.docs_per_row > 1 else 'false'}",
    ]
    cfg, _ = load_config(RECIPES[args.model], base + list(overrides))
    return cfg


def _flamingo_batch(args, token_ids: Dict[str, int], config, step: int, device, vanilla: bool) -> Dict[str, Any]:
    """B sequences of seq_len tokens with `images` images each: text before the first image, the
    images spread over the sequence, every token a target."""
    import torch

    gen = torch.Generator(device="cpu").manual_seed(0)
    batch, seq, size = args.micro_batch, args.seq_len, config.vision.image_size_px
    docs = args.docs_per_row
    doc_len, images_per_doc = seq // docs, args.images // docs
    ids = torch.randint(4, token_ids["base_vocab_size"], (batch, seq), generator=gen)
    # `--docs-per-row` documents of equal length packed in each row, positions restarting at each.
    starts = [d * doc_len for d in range(docs)]
    ids[:, starts] = token_ids["bos"]
    ids[:, [start + 8 + k * (doc_len // images_per_doc) for start in starts for k in range(images_per_doc)]] = token_ids["image"]
    pixels = torch.randint(0, 256, (batch, args.images, 3, size, size), dtype=torch.uint8, generator=gen)
    out: Dict[str, Any] = {"input_ids": ids.to(device), "labels": ids.clone().to(device)}
    if not vanilla:
        out["images"] = pixels.to(device)
        if docs > 1:
            out["position_ids"] = (torch.arange(seq) % doc_len).expand(batch, -1).to(device)
        return out
    # transformers' IDEFICS: float pixels and image_attention_mask [B, T, N], token t attending to
    # the latest image at or before it (what its processor builds).
    out["pixel_values"] = (pixels.float() / 127.5 - 1.0).to(device, torch.bfloat16)
    seen = torch.cumsum(ids == token_ids["image"], dim=1)
    out["image_attention_mask"] = (seen.unsqueeze(-1) == torch.arange(1, args.images + 1)).long().to(device)
    out["attention_mask"] = torch.ones_like(ids).to(device)
    return out


def _fuyu_batch(args, token_ids: Dict[str, int], config, step: int, device, vanilla: bool) -> Dict[str, Any]:
    """Step k's image size for every row: its patch grid (a newline token after each row), `<s>`,
    then seq_len text tokens; the text is the target."""
    import math

    import torch

    height, width = FUYU_SIZES_PX[step % len(FUYU_SIZES_PX)]
    rows, cols = math.ceil(height / PATCH_PX), math.ceil(width / PATCH_PX)
    gen = torch.Generator(device="cpu").manual_seed(step)
    grid = torch.tensor(([token_ids["image"]] * cols + [token_ids["image_newline"]]) * rows)
    text = torch.randint(3, 70000, (args.micro_batch, args.seq_len), generator=gen)
    ids = torch.cat([grid.expand(args.micro_batch, -1), torch.full((args.micro_batch, 1), token_ids["bos"]), text], 1)
    is_patch = ids == token_ids["image"]
    indices = torch.where(is_patch, is_patch.long().cumsum(1) - 1, torch.full_like(ids, -1))
    patches = torch.randint(0, 256, (args.micro_batch, rows * cols, PATCH_PX * PATCH_PX * 3), dtype=torch.uint8, generator=gen)
    labels = ids.clone()
    labels[:, : grid.numel() + 1] = -100
    out = {"input_ids": ids.to(device), "labels": labels.to(device)}
    if vanilla:
        out.update(image_patches=(patches.float() / 127.5 - 1.0).to(device, torch.bfloat16),
                   image_patches_indices=indices.to(device), attention_mask=torch.ones_like(ids).to(device))
    else:
        out.update(image_patches=patches.to(device), image_patch_indices=indices.to(device))
    return out


BATCHES = {"flamingo": _flamingo_batch, "fuyu": _fuyu_batch}


def _build_vanilla(cfg, token_ids, world_size: int):
    import deepspeed
    import torch
    from transformers import IdeficsForVisionText2Text
    from transformers.integrations import HfDeepSpeedConfig

    from mmtrain.models.flamingo.config import bind_token_ids
    from mmtrain.models.flamingo.idefics import idefics_config
    from mmtrain.models.registry import get_spec

    spec = get_spec(cfg.model.name)
    if spec.family == "fuyu":
        from transformers import FuyuForCausalLM as model_class

        from mmtrain.models.fuyu.model import _fuyu_hf_config
        from mmtrain.models.registry import build_model

        with torch.device("meta"):
            hf_config = _fuyu_hf_config(build_model(cfg.model.name, {}, token_ids))
    else:
        model_class = IdeficsForVisionText2Text
        hf_config = idefics_config(bind_token_ids(spec.config, token_ids))
        hf_config.freeze_text_layers = True
        hf_config.freeze_vision_layers = True
        hf_config.freeze_lm_head = True
    hf_config.use_cache = False
    ds_config = {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": cfg.train.micro_batch_size * world_size,
        "bf16": {"enabled": True},
        "zero_optimization": {"stage": 3},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
    }
    # transformers' own ZeRO-3 path: with an HfDeepSpeedConfig alive, `_from_config` builds under
    # zero.Init and initialises on gathered weights, as a Trainer(deepspeed=...) run does.
    keep_alive = HfDeepSpeedConfig(ds_config)  # noqa: F841 (transformers holds only a weak reference)
    model = model_class._from_config(hf_config, dtype=torch.bfloat16)
    model.gradient_checkpointing_enable()
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine, ds_config


def _build_mmtrain(cfg, token_ids, dist):
    import torch

    from mmtrain.config import deepspeed_json
    from mmtrain.engine.build import build_run_engine, build_run_model
    from mmtrain.engine.metrics import setup_logging
    from mmtrain.engine.optim import apply_freeze_policy, check_model_section

    log = setup_logging(None, dist.rank)
    ds_config = deepspeed_json(cfg, dist.world_size)
    model = build_run_model(cfg, ds_config, token_ids, dist.device, torch.bfloat16, dist.rank, log)
    _, trainable = check_model_section(cfg.model.name, cfg.model.trainable, cfg.optim.group_lr)
    apply_freeze_policy(model, trainable)
    model.set_activation_checkpointing(cfg.model.activation_checkpointing, cfg.model.checkpoint_every_n_layers)
    engine, _ = build_run_engine(model, cfg, ds_config, dist.device, dist.local_world_size, log)
    return engine, ds_config


def _token_ids(published_vocab_size: int) -> Dict[str, int]:
    """The published split of the vocabulary into base and added tokens: LLaMA's 32,000 base rows
    and the release's added ones (IDEFICS 2, OpenFlamingo 3, Otter 4). The base size matters for
    speed: the LM head's GEMM runs a slow fallback kernel when it is not a multiple of 8."""
    from mmtrain.engine.offline import nominal_token_ids

    ids = nominal_token_ids(published_vocab_size)
    base = published_vocab_size // 64 * 64
    ids.update(base_vocab_size=base, num_added_tokens=published_vocab_size - base, image=base)
    ids.update(end_of_chunk=min(base + 1, published_vocab_size - 1), answer=published_vocab_size - 1)
    return ids


def _flavour_token_ids(spec) -> Dict[str, int]:
    """The ids a run of `spec`'s flavour uses: Fuyu's own, else the published split (`_token_ids`);
    the tiny flavours name no vocabulary and get 515 rows."""
    return FUYU_TOKEN_IDS if spec.family == "fuyu" else _token_ids(spec.config.published_vocab_size or 515)


def _vanilla_loss(engine, batch: Dict[str, Any]):
    """transformers 5's IdeficsForVisionText2Text cannot compute its own loss when the added-token
    table is in use (it reshapes logits of vocab + added columns by vocab alone), so the vanilla
    loss is the plain shifted cross-entropy on its logits, as a user's training loop would do."""
    import torch.nn.functional as F

    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = engine(**inputs).logits
    labels = batch["labels"]
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1))


def _param_counts(model) -> Dict[str, int]:
    """Elements per role, read from ZeRO-3's full shapes (ds_numel) where partitioned."""
    counts = {"frozen_decoder": 0, "trainable": 0, "trainable_perceiver": 0, "vision": 0}
    for name, p in model.named_parameters():
        numel = int(getattr(p, "ds_numel", p.numel()))
        if p.requires_grad:
            counts["trainable"] += numel
            counts["trainable_perceiver"] += numel if "perceiver" in name else 0
        elif "vision" in name:
            counts["vision"] += numel
        else:
            counts["frozen_decoder"] += numel
    return counts


def run_one(args) -> int:
    import torch

    from mmtrain.engine.distributed import init_distributed
    from mmtrain.models.registry import get_spec

    name, overrides = _parse_variant(args.one)
    vanilla = name == "vanilla"
    dist = init_distributed(1800)
    if args.mem_cap_gib and torch.cuda.is_available():
        # A smaller GPU, simulated: the caching allocator refuses to grow past the cap.
        total_gib = torch.cuda.get_device_properties(dist.device).total_memory / 2**30
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.mem_cap_gib / total_gib), dist.device)
    cfg = _run_config(args, overrides or [])
    spec = get_spec(cfg.model.name)
    token_ids = _flavour_token_ids(spec)
    torch.manual_seed(0)
    start = time.perf_counter()
    engine, ds_config = _build_vanilla(cfg, token_ids, dist.world_size) if vanilla else _build_mmtrain(cfg, token_ids, dist)
    build_s = time.perf_counter() - start
    make_batch = BATCHES[spec.family]
    batches = [make_batch(args, token_ids, spec.config, step, dist.device, vanilla) for step in range(args.warmup + args.steps)]
    counts = _param_counts(engine.module)
    cuda = torch.cuda.is_available()

    def train_step(batch) -> float:
        loss_tensor = _vanilla_loss(engine, batch) if vanilla else engine(**batch, z_loss_weight=cfg.train.z_loss_weight).loss
        engine.backward(loss_tensor)
        engine.step()
        loss = float(loss_tensor.detach())  # waits for the step's kernels (the update is queued after the loss)
        if cuda:
            torch.cuda.synchronize()
        return loss

    losses, step_times, timed_tokens = [], [], 0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for step, batch in enumerate(batches):
        t0 = time.perf_counter()
        losses.append(train_step(batch))
        if step >= args.warmup:
            step_times.append(time.perf_counter() - t0)
            timed_tokens += batch["input_ids"].numel() * dist.world_size
    profile_table = profile_table_host = profile_busy_s = profile_step_s = None
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            t0 = time.perf_counter()
            train_step(batches[-1])
            profile_step_s = time.perf_counter() - t0
        averages = prof.key_averages()
        if cuda:
            # Kernel time of the profiled step against its wall time: how much of the step the GPUs
            # spend idle (waiting on the host, on communication not overlapped, on synchronisation).
            # Kernels only (the profiler's own "Self CUDA time total" rule); NCCL kernels run on
            # their own streams, beside compute, so the two are kept apart.
            from torch.autograd import DeviceType

            kernels = [e for e in averages if e.device_type == DeviceType.CUDA and not e.is_user_annotation]
            profile_busy_s = {
                "compute": sum(e.self_device_time_total for e in kernels if "nccl" not in e.key.lower()) / 1e6,
                "nccl": sum(e.self_device_time_total for e in kernels if "nccl" in e.key.lower()) / 1e6,
            }
        sort_key = "cuda_time_total" if cuda else "cpu_time_total"
        profile_table = averages.table(sort_by=sort_key, row_limit=45, max_name_column_width=70)
        if cuda:
            # Host-side time by op, own time only: where the step waits on the CPU (the optimizer
            # step under offload, Python-side ZeRO-3 work) rather than on kernels.
            profile_table_host = averages.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=70)
    timed_s = sum(step_times)
    record = {
        "variant": name,
        "overrides": overrides,
        "num_gpus": dist.world_size,
        "build_s": round(build_s, 1),
        "step_s_median": sorted(step_times)[len(step_times) // 2],
        "step_s_all": step_times,
        "timed_steps": len(step_times),
        "timed_s": timed_s,
        "timed_tokens": timed_tokens,
        "mean_seq_tokens": timed_tokens / (len(step_times) * args.micro_batch * dist.world_size),
        "tokens_per_s": timed_tokens / timed_s,
        "samples_per_s": len(step_times) * args.micro_batch * dist.world_size / timed_s,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
        "losses": losses,
        "finite": all(v == v and abs(v) != float("inf") for v in losses),
        "param_counts": counts,
        # The AdamW that ran (torch's, fused, or DeepSpeed's CPU Adam under optimizer offload).
        "base_optimizer": type(getattr(engine.optimizer, "optimizer", engine.optimizer)).__name__,
        # torch's intra-op threads in this rank (the host work under offload runs on them).
        "host_threads": torch.get_num_threads(),
        "ds_config": ds_config,
        "profile_table": profile_table,
        "profile_table_host": profile_table_host,
        "profile_step_s": profile_step_s,
        "profile_gpu_busy_s": profile_busy_s,
    }
    if dist.rank == 0:
        with open(args.result_file, "w") as f:
            json.dump(record, f)
    engine.destroy()  # ZeRO-3's hooks and buffers go before the process group does
    gc.collect()
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    return 0


# --------------------------------------------------------------------------------------------
# The driver: every variant in its own torchrun, one JSON for the run


def _mfu(record: Dict[str, Any], args, model_config) -> float:
    """Frozen-aware MFU (mmtrain.engine.flops) over the timed steps. Flamingo: the perceiver, which
    reads image patches rather than text tokens, is left out of the count (about 1% of IDEFICS-9B's
    FLOPs): an undercount. Fuyu: every parameter, the patch projection included, sees every token."""
    from mmtrain.engine.flops import mfu, model_shape, train_step_flops
    from mmtrain.engine.metrics import peak_tflops

    counts, gpus = record["param_counts"], record["num_gpus"]
    flops = train_step_flops(
        # Attention spans one document: a packed row's documents are args.docs_per_row times shorter.
        num_tokens=record["timed_tokens"], seq_tokens=record["mean_seq_tokens"] / args.docs_per_row,
        trainable_params=counts["trainable"] - counts["trainable_perceiver"], frozen_params=counts["frozen_decoder"],
        num_images=args.images * args.micro_batch * gpus * record["timed_steps"],
        frozen_vision_params=counts["vision"], **model_shape(model_config))
    peak = peak_tflops()
    return mfu(flops, record["timed_s"], peak, gpus) if peak else None


def _write(records: List[Dict[str, Any]], path) -> None:
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            f.write(json.dumps(records, indent=1) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="idefics-9b", choices=sorted(RECIPES))
    parser.add_argument("--gpus", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--images", type=int, default=2, help="images per sequence")
    parser.add_argument("--docs-per-row", type=int, default=1,
                        help="Flamingo flavours: pack this many equal documents in each row (data.packing=true; "
                             "--images and --seq-len divide among them; vanilla cannot pack and is refused)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--variants", default="vanilla,mmtrain")
    parser.add_argument("--out", default=None)
    parser.add_argument("--mem-cap-gib", type=float, default=None,
                        help="cap each GPU's allocator at this many GiB (a 24 GiB card on a bigger one)")
    parser.add_argument("--profile", action="store_true", help="add torch.profiler tables (by GPU and by host time) of one extra step per variant")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result-file", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.docs_per_row < 1 or args.seq_len % args.docs_per_row or args.images % args.docs_per_row:
        parser.error("--docs-per-row must divide --seq-len and --images")
    if args.docs_per_row > 1 and not args.one and "vanilla" in args.variants.split(","):
        parser.error("--docs-per-row: the vanilla classes take no packed rows")
    if args.one:
        return run_one(args)

    import torch

    from mmtrain.engine.metrics import library_versions
    from mmtrain.models.registry import get_spec

    command = "python3 -m bench.perf " + " ".join(argv if argv is not None else sys.argv[1:])
    records: List[Dict[str, Any]] = []
    for spec in args.variants.split(","):
        _parse_variant(spec)  # fail before any run on a bad name
    for spec in args.variants.split(","):
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tmp:
            result_file = tmp.name
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.gpus}",
               "-m", "bench.perf", "--one", spec, "--result-file", result_file,
               "--model", args.model, "--seq-len", str(args.seq_len), "--micro-batch", str(args.micro_batch),
               "--images", str(args.images), "--warmup", str(args.warmup), "--steps", str(args.steps),
               "--docs-per-row", str(args.docs_per_row)]
        cmd += ["--profile"] if args.profile else []
        cmd += ["--mem-cap-gib", str(args.mem_cap_gib)] if args.mem_cap_gib else []
        print(f"== {spec}", flush=True)
        proc = subprocess.run(cmd)
        if proc.returncode != 0 or os.path.getsize(result_file) == 0:
            records.append({"variant": spec, "error": f"exit {proc.returncode}"})
            continue
        with open(result_file) as f:
            records.append(json.load(f))
        os.unlink(result_file)
        _write(records, args.out)  # kept if a later variant fails or the run is cut short
        print(json.dumps({k: records[-1][k] for k in ("variant", "tokens_per_s", "peak_mem_gib", "finite")}), flush=True)
    vanilla = next((r for r in records if r.get("variant") == "vanilla" and "error" not in r), None)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor()
    for record in records:
        if "error" in record:
            continue
        record.update({
            "model": args.model, "device": device, "seq_len": args.seq_len, "micro_batch_size": args.micro_batch,
            "images_per_sample": args.images, "precision": "bf16", "mem_cap_gib": args.mem_cap_gib, "zero_stage": record["ds_config"]["zero_optimization"]["stage"],
            "vanilla_tokens_per_s": vanilla["tokens_per_s"] if vanilla else None,
            "speedup_vs_vanilla": record["tokens_per_s"] / vanilla["tokens_per_s"] if vanilla else None,
            "vanilla_samples_per_s": vanilla["samples_per_s"] if vanilla else None,
            "versions": library_versions(), "command": command,
        })
    _write(records, args.out)  # the measurements are kept even if the accounting below fails
    for record in records:
        if "error" not in record:
            record["mfu"] = _mfu(record, args, get_spec(args.model).config)
    _write(records, args.out)
    for r in records:
        if "error" in r:
            print(f"{r['variant']:<28} ERROR {r['error']}")
        else:
            print(f"{r['variant']:<28} {r['tokens_per_s']:>9.0f} tok/s  MFU {r.get('mfu')}  peak {r['peak_mem_gib']} GiB"
                  + (f"  x{r['speedup_vs_vanilla']:.2f} vs vanilla" if r.get("speedup_vs_vanilla") else ""))
    return 0


if __name__ == "__main__":
    from mmtrain.engine.distributed import exit_process

    # Every --one run is a rank: no interpreter teardown under live process groups (exit_process).
    exit_process(main())
