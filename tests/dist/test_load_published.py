"""Published layouts under 2-rank ZeRO-3 on CPU: `model.init_from` streams an IDEFICS checkpoint
into the partitioned model (checked in the run), the run's checkpoint exports back to a directory
that transformers loads, and loading a checkpoint keeps each rank's memory bounded (measured)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import REPO, TINY_RECIPE, data_overrides, run_ranks

pytestmark = pytest.mark.dist

PROBE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "init_from_probe.py")
TRAINABLE = ["perceiver", "cross_attn", "new_tokens"]
FAST = [
    "model.name=idefics-tiny",
    "data.template=idefics",
    f"model.trainable=[{','.join(TRAINABLE)}]",
    "train.max_steps=2",
    "train.micro_batch_size=4",
    "train.global_batch_size=8",
    "optim.warmup_steps=1",
    "checkpoint.every_steps=2",
    "data.eval_path=null",
]


def _published_idefics(shapes_data, out_dir):
    """An IDEFICS-layout checkpoint as the hub has them: sharded, 2-row added-token tables (the run's
    tokenizer adds more), random "trained" weights with open gates."""
    from mmtrain.data.tokenizer import TokenIds, load_tokenizer
    from mmtrain.models import build_model
    from mmtrain.models.weights import export_model

    ids = TokenIds.from_tokenizer(load_tokenizer(shapes_data["tokenizer"], "idefics"), "idefics").as_dict()
    base = ids["base_vocab_size"]
    assert ids["num_added_tokens"] > 2
    torch.manual_seed(123)
    model = build_model("idefics-tiny", {}, dict(ids, num_added_tokens=2, fake_image=base, image=base + 1))
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith(("alpha_cross_attn", "alpha_dense")):
                param.copy_(0.5 + 0.2 * noise)
            elif name.endswith("norm.weight") or ".ln." in name:
                param.copy_(1.0 + 0.1 * noise)
            else:
                param.copy_(0.05 * noise)
    state = model.state_dict()
    export_model(out_dir, model, state.__getitem__, layout="published", max_shard_bytes=300_000)
    return ids, state


def test_init_from_published_idefics_then_export_back(shapes_data, tmp_path):
    source = str(tmp_path / "published")
    ids, state = _published_idefics(shapes_data, source)
    assert os.path.isfile(os.path.join(source, "model.safetensors.index.json"))

    root = str(tmp_path / "runs")
    probe_out = str(tmp_path / "probe.json")
    args = [*data_overrides(shapes_data, root, "init_from"), *FAST, f"model.init_from={source}"]
    done = run_ranks(2, [PROBE, TINY_RECIPE, probe_out, *args])
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    probe = json.load(open(probe_out))
    # Every parameter of the partitioned model is the file's (bf16 run: the file's values in bf16).
    assert probe["differing"] == [] and probe["num_params"] == len(state)
    assert probe["steps"] == 2
    # The 2-row tables filled the first rows; the model's other added tokens kept their fresh rows.
    assert set(probe["padded"]) == {"model.embed_tokens.additional_embedding.weight", "lm_head.additional_fc.weight"}
    for row in probe["padded"].values():
        assert row["file_rows"] == 2 and row["rows"] == ids["num_added_tokens"]
        assert row["fresh_rows_equal_plain_build"], row
    run_dir = os.path.join(root, "init_from")
    log = open(os.path.join(run_dir, "train.log")).read()
    assert "init_from" in log and "keep the model's fresh initialisation" in log

    # The run's ZeRO-3 checkpoint → the published layout, read tensor by tensor → transformers.
    from transformers import IdeficsForVisionText2Text

    from mmtrain.engine.export import export
    from mmtrain.models.weights import SafetensorsCheckpoint

    out = str(tmp_path / "export")
    export(run_dir, out, layout="published", max_shard_size="200KB")
    hf, info = IdeficsForVisionText2Text.from_pretrained(out, output_loading_info=True)
    assert (info["missing_keys"], info["unexpected_keys"], info["mismatched_keys"]) == (set(), set(), set()), info
    assert hf.config.additional_vocab_size == ids["num_added_tokens"]
    assert os.path.isfile(os.path.join(out, "tokenizer.json")) and os.path.isfile(os.path.join(out, "config.json"))
    with SafetensorsCheckpoint(out) as exported:
        moved = []
        for key in exported.keys():
            tensor = exported.read(key)
            assert tensor.dtype == torch.float32
            trains = key.startswith(("model.perceiver_resampler.", "model.gated_cross_attn_layers.")) or "additional" in key
            if not trains:  # frozen: exactly the file's weights, as the run held them (bf16)
                assert torch.equal(tensor, state[key].to(torch.bfloat16).float()), key
            elif "additional" not in key and not torch.equal(tensor, state[key].to(torch.bfloat16).float()):
                moved.append(key)
        assert moved, "two optimizer steps changed none of the trainable weights"


def test_zero3_load_keeps_each_rank_bounded(tmp_path):
    """~250 MB checkpoint into a 2-rank ZeRO-3 model: the weights are the file's, and no rank's RSS
    grows by more than a fraction of it while loading (bench/load_memory.py is the multi-GB run)."""
    out = str(tmp_path / "load_memory.json")
    # 1024 wide, 6 layers, 8,000-token vocabulary: ~250 MB in bf16, largest tensor 16 MB; only the
    # mmtrain reader (--compare with no names skips the bench's alternative readers).
    cmd = [sys.executable, os.path.join(REPO, "bench", "load_memory.py"), "--hidden", "1024", "--layers", "6",
           "--vocab", "8000", "--max-shard-size", "50MB", "--compare", "--workdir", str(tmp_path / "work"), "--out", out]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    result = json.load(open(out))
    checkpoint_bytes = result["checkpoint_bytes"]
    assert 150e6 < checkpoint_bytes < 300e6 and result["checkpoint_files"] > 1
    assert result["verified"] is True
    for rank in result["ranks"]:
        assert rank["differing"] == []
        if rank["load_growth"] is None:  # no /proc/self/clear_refs: the process's peak, build included
            assert rank["ru_maxrss_after_load"] - rank["baseline_rss"] < checkpoint_bytes, rank
            continue
        # Measured: 2x the largest tensor (the gathered parameter and DeepSpeed's gather buffer);
        # 6x leaves room for the allocator (huge pages, malloc arenas) on other hosts, still far
        # below the whole model (15x the largest tensor here).
        assert rank["load_growth"] < 0.5 * checkpoint_bytes, rank
        assert rank["load_growth"] < 6 * result["largest_tensor_bytes"], rank


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
