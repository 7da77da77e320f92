"""Two ranks of real DeepSpeed ZeRO-3 on CPU (gloo): a run, its run directory, exact resume, and
export → reload with the same logits."""

import json
import os
import sys

import pytest
import torch
from helpers import TINY_RECIPE, data_overrides, run_ranks

pytestmark = pytest.mark.dist

FAST = [
    "train.max_steps=4",
    "train.micro_batch_size=4",
    "train.global_batch_size=8",
    "train.log_every_steps=1",
    "optim.warmup_steps=1",
    "checkpoint.every_steps=2",
    "checkpoint.keep_last=3",
    "data.eval_path=null",
]


def _train(paths, root, name, extra=()):
    done = run_ranks(2, ["-m", "mmtrain.train", TINY_RECIPE, *data_overrides(paths, root, name), *FAST, *extra])
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return os.path.join(root, name)


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _export(run_dir, out):
    from mmtrain.engine.export import export

    export(run_dir, out)
    from safetensors.torch import load_file

    return load_file(os.path.join(out, "model.safetensors"))


@pytest.fixture(scope="module")
def straight_run(shapes_data, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("runs"))
    return _train(shapes_data, root, "straight")


def test_run_directory_contract(straight_run):
    names = set(os.listdir(straight_run))
    assert {"config.yaml", "ds_config.json", "metrics.jsonl", "tb", "train.log", "checkpoints", "tokenizer"} <= names
    with open(os.path.join(straight_run, "ds_config.json")) as f:
        ds = json.load(f)
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"] is True
    assert ds["train_batch_size"] == 4 * 1 * 2
    rows = _metrics(straight_run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert all(k in r for k in ("loss", "ce_loss", "z_loss", "lr", "grad_norm", "tokens", "tokens_per_s", "data_wait_s"))
        assert r["z_loss"] > 0 and abs(r["loss"] - r["ce_loss"]) < 1e-2
        assert r["samples"] == 8
    assert rows[0]["lr"] < rows[1]["lr"] or rows[0]["lr"] == pytest.approx(2e-3)  # warmup of 1 step then decay
    tb_files = os.listdir(os.path.join(straight_run, "tb"))
    assert any(f.startswith("events.out.tfevents") for f in tb_files)
    # DeepSpeed also drops its conversion scripts (zero_to_fp32.py, ...) next to the checkpoints.
    ckpts = sorted(n for n in os.listdir(os.path.join(straight_run, "checkpoints")) if not n.endswith(".py"))
    assert ckpts == ["latest", "step_0000002", "step_0000004"]
    assert open(os.path.join(straight_run, "checkpoints", "latest")).read().strip() == "step_0000004"
    for c in ckpts[1:]:
        files = os.listdir(os.path.join(straight_run, "checkpoints", c))
        assert "COMPLETE" in files and "rank_00000.pt" in files and "rank_00001.pt" in files


def test_tensorboard_events_hold_the_losses(straight_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(straight_run, "tb"))
    acc.Reload()
    losses = [e.value for e in acc.Scalars("train/loss")]
    assert losses == pytest.approx([r["loss"] for r in _metrics(straight_run)], rel=1e-6)


def test_resume_gives_the_same_losses_and_weights(straight_run, shapes_data, tmp_path):
    root = str(tmp_path)
    first = _train(shapes_data, root, "resumed", ["train.stop_at_step=2"])
    assert [r["step"] for r in _metrics(first)] == [1, 2]
    again = _train(shapes_data, root, "resumed", ["resume=auto"])
    assert again == first
    straight, resumed = _metrics(straight_run), _metrics(first)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    # Bit-identical on CPU: same weights, optimizer state, schedule, data position and RNG.
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]
    assert [r["lr"] for r in resumed] == [r["lr"] for r in straight]
    a = _export(straight_run, str(tmp_path / "export_a"))
    b = _export(first, str(tmp_path / "export_b"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_export_reload_gives_the_live_logits(shapes_data, tmp_path):
    root = str(tmp_path)
    run_dir = _train(shapes_data, root, "fp32", ["train.precision=fp32", "train.max_steps=2", "checkpoint.every_steps=2"])
    probe = str(tmp_path / "live.pt")
    done = run_ranks(2, [os.path.join(os.path.dirname(__file__), "live_logits.py"), TINY_RECIPE, probe,
                         *data_overrides(shapes_data, root, "fp32"), *FAST,
                         "train.precision=fp32", "train.max_steps=2", "resume=auto"])
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    live = torch.load(probe)
    out = str(tmp_path / "export")
    _export(run_dir, out)
    from mmtrain.models.io import load_pretrained

    model = load_pretrained(out)
    batch = live["batch"]
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], images=batch["images"], attention_mask=batch["attention_mask"]).logits
    assert logits.shape == live["logits"].shape
    assert (logits - live["logits"]).abs().max().item() < 1e-4
    # The reloaded model is the trained one, not a fresh initialisation.
    assert os.path.isfile(os.path.join(out, "tokenizer", "tokenizer.json"))


def _mixed_recipe(shapes_data, tmp_path):
    """The tiny recipe over three kinds at once: the shapes episodes, interleaved documents with one
    broken sample of several kinds, and image-caption pairs; packed rows."""
    import io
    import json as _json

    import yaml
    from PIL import Image

    from mmtrain.data.formats import ShardWriter

    def jpeg(color):
        out = io.BytesIO()
        Image.new("RGB", (40, 40), color).save(out, format="JPEG")
        return out.getvalue()

    docs, pairs = str(tmp_path / "docs"), str(tmp_path / "pairs")
    with ShardWriter(docs, kind="interleaved", max_samples=8) as w:
        for i in range(16):
            parts = [{"text": f"a picture {i}"}, {"image": "0.jpg"}, {"text": "the square is red"}]
            w.write(f"d{i}", {"json": _json.dumps({"id": f"doc{i}", "parts": parts}).encode(), "0.jpg": jpeg((i * 9, 0, 0))})
        w.write("corrupt", {"json": _json.dumps({"parts": [{"image": "0.jpg"}, {"text": "x"}]}).encode(), "0.jpg": b"junk"})
        w.write("textonly", {"json": _json.dumps({"parts": [{"text": "no image"}]}).encode()})
        w.write("badjson", {"json": b"{oops"})
    with ShardWriter(pairs, kind="pairs", max_samples=8) as w:
        for i in range(16):
            w.write(f"{i:06d}", {"jpg": jpeg((0, i * 9, 0)), "txt": f"a green shape {i}".encode()})
    with open(TINY_RECIPE) as f:
        recipe = yaml.safe_load(f)
    recipe["data"]["sources"] = [
        {"name": "shapes", "path": shapes_data["train"], "kind": "mimicit", "weight": 1.0},
        {"name": "docs", "path": docs, "kind": "interleaved", "weight": 1.0},
        {"name": "pairs", "path": pairs, "kind": "pairs", "weight": 1.0},
    ]
    recipe["data"]["packing"] = True
    path = str(tmp_path / "mixed.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(recipe, f)
    return path


def test_mixed_kinds_packed_with_broken_samples(shapes_data, tmp_path):
    recipe = _mixed_recipe(shapes_data, tmp_path)
    root = str(tmp_path / "runs")
    args = [a for a in data_overrides(shapes_data, root, "mixed") if not a.startswith("data.sources")]
    done = run_ranks(2, ["-m", "mmtrain.train", recipe, *args, *FAST, "train.max_steps=3", "checkpoint.every_steps=0"])
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    rows = _metrics(os.path.join(root, "mixed"))
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(0 < r["packing_efficiency"] <= 1 for r in rows)
    assert rows[-1]["samples"] > 8  # packed: more samples than the 2 x 4 rows of a step
    skipped = rows[-1]["skipped_samples"]
    assert {"bad_image", "no_image", "bad_json"} <= set(skipped), skipped


def test_text_only_rank_and_image_rank_stay_in_lockstep(shapes_data, tmp_path):
    """One rank sees only text, the other images: the vision tower still runs on both in every
    micro-step, so ZeRO-3's collective gathers match and the run finishes (a hang would hit the
    60 s collective timeout and fail)."""
    root = str(tmp_path)
    script = os.path.join(os.path.dirname(__file__), "uneven_media.py")
    done = run_ranks(2, [script, TINY_RECIPE, *data_overrides(shapes_data, root, "uneven"), *FAST,
                         "train.max_steps=3", "checkpoint.every_steps=0", "dist.timeout_s=60"], timeout_s=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    for rank in (0, 1):
        assert f"rank {rank}: 3 steps, vision tower ran 3 times" in done.stdout, done.stdout[-2000:]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
