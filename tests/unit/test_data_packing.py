"""Packing, mixed kinds in one stream, exact resume (2 ranks x 2 workers), broken data of every kind."""

import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from mmtrain.data.batching import Layout, collate
from mmtrain.data.episodes import Sample
from mmtrain.data.formats import ShardWriter
from mmtrain.data.images import ImageSpec
from mmtrain.data.stream import build_train_loader

SPEC = ImageSpec(size_px=8)


def jpeg(color, size=(12, 10)):
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="JPEG", quality=90)
    return out.getvalue()


def doc(i):
    n_images = 1 + i % 3
    parts = [{"text": f"Intro {i}."}]
    for j in range(n_images):
        parts += [{"image": f"{j}.jpg"}, {"text": f"Sentence {j} of document {i}" + " more" * (i % 5)}]
    return {"id": f"doc{i:03d}", "source": "docs", "parts": parts}, {f"{j}.jpg": jpeg((i, j * 50, 9)) for j in range(n_images)}


def write_docs(path, n, per_shard=4):
    with ShardWriter(str(path), kind="interleaved", max_samples=per_shard) as w:
        for i in range(n):
            record, images = doc(i)
            w.write(f"d{i:04d}", {"json": json.dumps(record).encode(), **images})
    return str(path)


def write_pairs(path, n, per_shard=5):
    with ShardWriter(str(path), kind="pairs", max_samples=per_shard) as w:
        for i in range(n):
            w.write(f"{i:09d}", {"jpg": jpeg((0, i, 90)), "txt": f"caption number {i}".encode(), "json": b"{}"})
    return str(path)


def write_episodes(path, n, per_shard=5):
    with ShardWriter(str(path), kind="mimicit", max_samples=per_shard) as w:
        for i in range(n):
            rec = {"id": f"ep{i:03d}", "turns": [{"instruction": f"q{i}?", "answer": f"a{i}", "images": ["0.jpg"]}]}
            w.write(f"e{i:04d}", {"json": json.dumps(rec).encode(), "0.jpg": jpeg((i, 1, 1))})
    return str(path)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    return [
        {"name": "docs", "path": write_docs(root / "docs", 24), "kind": "interleaved", "weight": 2.0},
        {"name": "pairs", "path": write_pairs(root / "pairs", 30), "kind": "pairs", "weight": 1.0},
        {"name": "eps", "path": write_episodes(root / "eps", 20), "kind": "mimicit", "weight": 1.0},
    ]


def loader(tok, ids, sources, **kw):
    args = dict(template="simple", max_seq_tokens=96, max_images=4, micro_batch_size=2, seed=3, rank=0, world_size=1,
                num_workers=0, shuffle_buffer_samples=4, packing=True)
    args.update(kw)
    return build_train_loader(sources, tok, ids, SPEC, **args)


def sample_ids(batches):
    return [sid for b in batches for sid in b["meta"]["sample_ids"]]


def test_collate_restarts_positions_per_document_and_pads_continue():
    a = Sample("a", [1, 5, 6], [-100, 5, 6], [])
    b = Sample("b", [1, 7], [-100, 7], [])
    c = Sample("c", [1, 8, 9, 10, 11, 12, 2], [-100] * 7, [])
    batch = collate([[a, b], [c]], Layout(max_seq_tokens=8, max_images=2, pad_id=0, image_size_px=4))
    assert batch["input_ids"].tolist() == [[1, 5, 6, 1, 7, 0, 0], [1, 8, 9, 10, 11, 12, 2]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0, 0], [1] * 7]
    assert batch["images"].shape == (2, 1, 3, 4, 4) and batch["num_images"].tolist() == [0, 0]


def test_packed_stream_keeps_row_limits_and_packs_better(tok, ids, sources):
    packed = [next(iter_) for iter_ in [iter(loader(tok, ids, sources))] for _ in range(8)]
    plain = [b for it in [iter(loader(tok, ids, sources, packing=False))] for b in (next(it) for _ in range(8))]
    for batch in packed:
        assert batch["input_ids"].shape[1] <= 96
        per_row = (batch["input_ids"] == ids.image).sum(1)
        assert (per_row == batch["num_images"]).all() and (per_row <= 4).all()
        starts = (batch["position_ids"] == 0).sum(1)
        assert (starts >= 1).all()
    kinds = {src for b in packed for src in b["meta"]["sources"]}
    assert kinds == {"docs", "pairs", "eps"}
    efficiency = np.mean([b["meta"]["packing_efficiency"] for b in packed])
    assert efficiency > np.mean([b["meta"]["packing_efficiency"] for b in plain])
    assert np.mean([b["meta"]["samples_per_row"] for b in packed]) > 1.5
    assert all(b["meta"]["samples_per_row"] == 1 for b in plain)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_exact_resume_with_packing_carries_the_pending_sample(tok, ids, sources, num_workers):
    full = loader(tok, ids, sources, num_workers=num_workers)
    it = iter(full)
    expected = [next(it) for _ in range(9)]
    full.close()
    first = loader(tok, ids, sources, num_workers=num_workers)
    it = iter(first)
    head = [next(it) for _ in range(4)]
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores survives JSON
    first.close()
    assert any(w["pending"] for w in state["workers"])  # a sample closed a batch and waits for the next
    resumed = loader(tok, ids, sources, num_workers=num_workers)
    resumed.load_state_dict(state)
    it = iter(resumed)
    tail = [next(it) for _ in range(5)]
    resumed.close()
    assert sample_ids(head + tail) == sample_ids(expected)
    for got, want in zip(head + tail, expected):
        assert torch.equal(got["input_ids"], want["input_ids"]) and torch.equal(got["images"], want["images"])


def test_two_ranks_two_workers_resume_exactly_and_stay_disjoint(tok, ids, sources):
    """The issue's case: 2 ranks x 2 workers; each rank's stream after resume == uninterrupted."""
    streams = {}
    for rank in (0, 1):
        kw = dict(rank=rank, world_size=2, num_workers=2)
        full = loader(tok, ids, sources, **kw)
        it = iter(full)
        expected = sample_ids([next(it) for _ in range(8)])
        full.close()
        first = loader(tok, ids, sources, **kw)
        it = iter(first)
        head = sample_ids([next(it) for _ in range(3)])
        state = first.state_dict()
        first.close()
        resumed = loader(tok, ids, sources, **kw)
        resumed.load_state_dict(state)
        it = iter(resumed)
        tail = sample_ids([next(it) for _ in range(5)])
        resumed.close()
        assert head + tail == expected
        streams[rank] = expected
    # Within an epoch the ranks read disjoint shards (the sources are larger than what was drawn).
    first_epoch = {r: set(s[:10]) for r, s in streams.items()}
    assert not first_epoch[0] & first_epoch[1]


def write_broken(path):
    """One good document plus one of each broken kind the issue lists."""
    good, good_images = doc(0)
    huge = io.BytesIO()
    Image.new("L", (20000, 20000)).save(huge, format="PNG")
    with ShardWriter(str(path), kind="interleaved", max_samples=100) as w:
        w.write("good", {"json": json.dumps(good).encode(), **good_images})
        w.write("corrupt_jpeg", {"json": json.dumps(good).encode(), "0.jpg": b"\xff\xd8\xff garbage"})
        w.write("bad_json", {"json": b'{"parts": [ oops', **good_images})
        w.write("no_image", {"json": json.dumps({"parts": [{"text": "only words"}]}).encode()})
        many = {"parts": [{"image": f"{i}.jpg"} for i in range(1000)] + [{"text": "gallery"}]}
        w.write("gallery", {"json": json.dumps(many).encode()})
        w.write("huge", {"json": json.dumps({"parts": [{"image": "0.jpg"}, {"text": "big"}]}).encode(), "0.png": b"",
                         "0.jpg": huge.getvalue()})
        w.write("empty_text", {"json": json.dumps({"parts": [{"image": "0.jpg"}, {"text": ""}]}).encode(),
                               "0.jpg": jpeg((1, 2, 3))})
        w.write("missing", {"json": json.dumps({"parts": [{"image": "7.jpg"}, {"text": "x"}]}).encode()})
        w.write("truncated", {"json": json.dumps(good).encode(), **good_images})
    shard = os.path.join(str(path), "shard-000000.tar")
    import tarfile

    with tarfile.open(shard) as tar:
        last = tar.getmembers()[-1]
    with open(shard, "r+b") as f:  # cut the last member's data short: a truncated tar member
        f.truncate(last.offset_data + last.size // 2)
    manifest = json.load(open(os.path.join(str(path), "manifest.json")))
    return str(path), manifest


def test_every_kind_of_broken_sample_is_skipped_and_counted(tok, ids, tmp_path):
    path, _ = write_broken(tmp_path / "broken")
    lo = loader(tok, ids, [{"name": "broken", "path": path, "kind": "interleaved"}], packing=False,
                micro_batch_size=1, shuffle_buffer_samples=1)
    it = iter(lo)
    batches = [next(it) for _ in range(3)]
    assert set(sample_ids(batches)) == {"doc000"}  # only the good one, over and over
    skipped = lo.skipped
    for reason in ("bad_image", "bad_json", "no_image", "too_many_images", "image_too_large", "empty_text",
                   "missing_image", "truncated"):
        assert skipped.get(reason, 0) >= 1, (reason, skipped)
