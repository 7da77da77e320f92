"""Every full-size flavour builds on one GPU with random weights and trains a few steps at sequence
length 1024 in bf16 with a finite loss. Peak memory and step time go to bench/results (a benchmark
record, never asserted).

    MMTRAIN_RESULTS=bench/results/full_size_h100.json python -m pytest tests/gpu -q
"""

import json
import os
import platform
import time

import pytest
import torch

from mmtrain.engine.offline import nominal_token_ids
from mmtrain.engine.optim import apply_freeze_policy, check_model_section
from mmtrain.models import build_model, get_spec, list_specs

pytestmark = pytest.mark.gpu

SEQ_TOKENS = 1024
# One GPU holds the frozen weights in bf16, trainable ones with AdamW's fp32 state; flavours whose
# default training (OtterHD: full fine-tune of 9.4B) cannot fit run forward and backward only.
FUYU_TOKEN_IDS = dict(image=71011, image_newline=71019, bos=1, eos=2, pad=0, base_vocab_size=262144, num_added_tokens=0)
ONE_GPU = [s.name for s in list_specs() if "tiny" not in s.name and s.name != "idefics-80b"]
_RESULTS = []


def _token_ids(spec):
    if spec.family == "fuyu":
        return FUYU_TOKEN_IDS
    return nominal_token_ids(spec.config.published_vocab_size)


def _flamingo_batch(model, device, token_ids):
    image = token_ids["image"]
    ids = torch.randint(3, token_ids["base_vocab_size"], (1, SEQ_TOKENS), device=device)
    ids[0, 0], ids[0, 5], ids[0, 500] = 1, image, image  # two images, text before the first
    size = model.config.vision.image_size_px
    images = torch.randint(0, 256, (1, 2, 3, size, size), dtype=torch.uint8, device=device)
    return {"input_ids": ids, "images": images, "labels": ids.clone()}


def _fuyu_batch(model, device, token_ids):
    rows, cols = 26, 35  # a 1024x768 image: 26 x (35 + 1) = 936 tokens
    ids = torch.randint(3, 70000, (1, SEQ_TOKENS), device=device)
    grid = torch.tensor(([71011] * cols + [71019]) * rows, device=device)
    ids[0, : grid.numel()] = grid
    ids[0, grid.numel()] = 1
    is_patch = ids == 71011
    indices = torch.where(is_patch, is_patch.long().cumsum(1) - 1, torch.full_like(ids, -1))
    patches = torch.randint(0, 256, (1, rows * cols, 2700), dtype=torch.uint8, device=device)
    labels = ids.clone()
    labels[0, : grid.numel() + 1] = -100
    return {"input_ids": ids, "image_patches": patches, "image_patch_indices": indices, "labels": labels}


def _optimizer_fits(trainable_params: int, frozen_params: int) -> bool:
    free = torch.cuda.mem_get_info()[1]
    need = frozen_params * 2 + trainable_params * (2 + 2 + 12)  # bf16 weights/grads, fp32 master + m + v
    return need < 0.8 * free


@pytest.mark.parametrize("name", ONE_GPU)
def test_full_size_flavour_trains_at_1024_tokens(name):
    spec = get_spec(name)
    device = torch.device("cuda")
    torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    try:
        start = time.perf_counter()
        with device:
            model = build_model(name, {}, _token_ids(spec))
        build_s = time.perf_counter() - start
    finally:
        torch.set_default_dtype(torch.float32)
    _, trainable = check_model_section(name, None)
    table = apply_freeze_policy(model, trainable)
    model.gradient_checkpointing = True
    model.train()
    num_trainable = sum(r["num_trainable"] for r in table.values())
    num_total = sum(r["num_params"] for r in table.values())
    use_optimizer = _optimizer_fits(num_trainable, num_total - num_trainable)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=True) if use_optimizer else None
    batch = (_fuyu_batch if spec.family == "fuyu" else _flamingo_batch)(model, device, _token_ids(spec))
    losses, times = [], []
    for _ in range(4):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model(**batch, z_loss_weight=1e-3)
        out.loss.backward()
        if optimizer is not None:
            optimizer.step()
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(float(out.loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses))), losses
    result = {
        "model": name, "device": torch.cuda.get_device_name(), "num_gpus": 1, "seq_len": SEQ_TOKENS,
        "micro_batch": 1, "dtype": "bf16", "activation_checkpointing": True, "trainable_groups": trainable,
        "num_params": num_total, "num_trainable_params": num_trainable, "optimizer": "AdamW" if optimizer else None,
        "losses": losses, "step_time_s": sorted(times[1:])[len(times[1:]) // 2], "build_s": build_s,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
        "torch": torch.__version__, "python": platform.python_version(),
        "command": "python -m pytest tests/gpu/test_full_size.py -q",
    }
    _RESULTS.append(result)
    out_path = os.environ.get("MMTRAIN_RESULTS")
    if out_path:
        with open(out_path, "w") as f:
            json.dump(_RESULTS, f, indent=1)
    del model, optimizer, out
    torch.cuda.empty_cache()
