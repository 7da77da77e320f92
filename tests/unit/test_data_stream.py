"""Streaming loader: batch contract, determinism, rank split, exact resume, broken samples, eval prompts, images."""

import io
import json
import os
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

import mmtrain.data.stream as stream_mod
from mmtrain.data.formats import BadSample, ShardWriter
from mmtrain.data.images import ImageSpec, decode_image
from mmtrain.data.stream import build_train_loader, iter_eval_prompts, iter_shard_samples

SPEC = ImageSpec(size_px=8)


def jpeg(color, size=(12, 10)):
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="JPEG", quality=90)
    return out.getvalue()


def episode(prefix, i):
    n_ctx = i % 3
    turns = [
        {"instruction": f"context {j} of {i}?", "answer": f"ctx answer {j}", "images": [f"{j}.jpg"]} for j in range(n_ctx)
    ]
    turns.append({"instruction": f"What is sample {i}?", "answer": f"sample {i}", "images": [f"{n_ctx}.jpg"] if i % 4 else []})
    return {"id": f"{prefix}{i:04d}", "source": prefix, "turns": turns}


def write_source(path, prefix, n, per_shard, broken=()):
    """`broken`: indices whose sample is corrupt (even: bad JPEG bytes, odd: bad JSON)."""
    with ShardWriter(str(path), kind="mimicit", max_samples=per_shard) as w:
        for i in range(n):
            rec = episode(prefix, i)
            members = {"json": json.dumps(rec).encode()}
            for turn in rec["turns"]:
                for name in turn["images"]:
                    members[name] = jpeg((i * 7 % 256, 40, 200))
            if i in broken:
                if i % 2 == 0:
                    members[rec["turns"][0]["images"][0] if rec["turns"][0]["images"] else "0.jpg"] = b"\xff\xd8 not a jpeg"
                    if not any(t["images"] for t in rec["turns"]):
                        rec["turns"][0]["images"] = ["0.jpg"]
                        members["json"] = json.dumps(rec).encode()
                else:
                    members["json"] = b'{"id": "broken", "turns": [ oops'
            w.write(f"k{i:05d}", members)
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return {
        "many": write_source(root / "many", "m", 40, per_shard=5),  # 8 shards
        "one": write_source(root / "one", "o", 9, per_shard=100),  # 1 shard
        "broken": write_source(root / "broken", "b", 12, per_shard=4, broken={2, 5, 6, 9}),
    }


def loader(tok, ids, sources, **kw):
    args = dict(template="simple", max_seq_tokens=128, max_images=4, micro_batch_size=3, seed=7, rank=0,
                world_size=1, num_workers=0, shuffle_buffer_samples=8)
    args.update(kw)
    return build_train_loader(sources, tok, ids, SPEC, **args)


def take(it, n):
    return [next(it) for _ in range(n)]


def ids_of(batches):
    return [sid for b in batches for sid in b["meta"]["sample_ids"]]


def test_batch_contract(tok, ids, data):
    batch = next(iter(loader(tok, ids, [{"name": "many", "path": data["many"]}])))
    b, t = batch["input_ids"].shape
    assert b == 3
    assert batch["labels"].shape == batch["attention_mask"].shape == (b, t)
    assert batch["input_ids"].dtype == batch["labels"].dtype == batch["num_images"].dtype == torch.long
    n = batch["images"].shape[1]
    assert batch["images"].shape == (b, n, 3, 8, 8) and batch["images"].dtype == torch.uint8 and n >= 1
    for i in range(b):
        length = int(batch["attention_mask"][i].sum())
        row = batch["input_ids"][i]
        assert row[0] == ids.bos and row[length - 1] == ids.eos
        assert (row[length:] == ids.pad).all() and (batch["labels"][i, length:] == -100).all()
        assert (batch["attention_mask"][i, :length] == 1).all()
        k = int(batch["num_images"][i])
        assert int((row == ids.image).sum()) == k
        assert (batch["images"][i, k:] == 0).all()
        if k:
            assert batch["images"][i, :k].abs().sum() > 0
    assert n == max(1, int(batch["num_images"].max()))
    meta = batch["meta"]
    assert len(meta["sample_ids"]) == b and meta["sources"] == ["many"] * b
    assert meta["cursor"]["batches"] == 1 and meta["skipped"] == {}


def test_deterministic_and_seed_dependent(tok, ids, data):
    src = [{"name": "many", "path": data["many"]}]
    a = ids_of(take(iter(loader(tok, ids, src)), 10))
    b = ids_of(take(iter(loader(tok, ids, src)), 10))
    c = ids_of(take(iter(loader(tok, ids, src, seed=8)), 10))
    assert a == b and a != c


def test_each_epoch_is_a_fresh_permutation_of_all_samples(tok, ids, data):
    batches = take(iter(loader(tok, ids, [{"name": "many", "path": data["many"]}], micro_batch_size=4)), 20)
    seen = ids_of(batches)
    epoch0, epoch1 = seen[:40], seen[40:]
    assert sorted(epoch0) == sorted(epoch1) == [f"m{i:04d}" for i in range(40)]
    assert epoch0 != epoch1
    assert batches[-1]["meta"]["cursor"]["workers"][0]["sources"]["many"] == {"epoch": 1, "consumed": 40}


@pytest.mark.parametrize("name,num_workers", [("many", 0), ("one", 0), ("many", 2), ("one", 2)])
def test_two_ranks_get_disjoint_samples_and_both_yield(tok, ids, data, name, num_workers):
    n = {"many": 40, "one": 9}[name]
    src = [{"name": name, "path": data[name]}]
    per_rank = []
    for rank in range(2):
        it = iter(loader(tok, ids, src, rank=rank, world_size=2, num_workers=num_workers, micro_batch_size=1))
        # Pull well past one epoch: every rank keeps yielding.
        batches = take(it, n + 4)
        it.close()
        # Within an epoch the shares are disjoint; the worker cursor says which epoch a sample came from.
        epoch0 = [b["meta"]["sample_ids"][0] for b in batches if b["meta"]["worker_cursor"]["sources"][name]["epoch"] == 0]
        assert len(epoch0) == len(set(epoch0)) and len(epoch0) < len(batches)
        per_rank.append(set(epoch0))
    assert per_rank[0] and per_rank[1]
    assert per_rank[0].isdisjoint(per_rank[1])
    assert len(per_rank[0] | per_rank[1]) == n


@pytest.mark.parametrize("num_workers,k", [(0, 4), (2, 3), (2, 4)])
def test_exact_resume(tok, ids, data, num_workers, k):
    src = [{"name": "many", "path": data["many"], "weight": 2.0}, {"name": "one", "path": data["one"], "weight": 1.0}]
    m = 9  # crosses epoch boundaries of "one" (9 samples, split over workers)
    reference_loader = loader(tok, ids, src, num_workers=num_workers)
    reference = take(iter(reference_loader), k + m)
    reference_loader.close()  # its DataLoader workers; left to the garbage collector, their shutdown stalls ~20 s
    first = loader(tok, ids, src, num_workers=num_workers)
    it = iter(first)
    take(it, k)
    state = json.loads(json.dumps(first.state_dict()))  # must survive JSON
    it.close()
    resumed = loader(tok, ids, src, num_workers=num_workers)
    resumed.load_state_dict(state)
    after = take(iter(resumed), m)
    assert ids_of(after) == ids_of(reference[k:])
    for x, y in zip(after, reference[k:]):
        for key in ("input_ids", "labels", "attention_mask", "images", "num_images"):
            assert torch.equal(x[key], y[key]), key
        assert x["meta"]["cursor"] == y["meta"]["cursor"]
    resumed.close()


def test_resume_replays_without_decoding(tok, ids, data, monkeypatch):
    src = [{"name": "many", "path": data["many"]}]
    first = loader(tok, ids, src, micro_batch_size=2)
    take(iter(first), 25)  # past an epoch boundary
    state = first.state_dict()
    first.close()
    calls = []
    real = stream_mod.decode_image
    monkeypatch.setattr(stream_mod, "decode_image", lambda b, s: calls.append(1) or real(b, s))
    resumed = loader(tok, ids, src, micro_batch_size=2)
    resumed.load_state_dict(state)
    batch = next(iter(resumed))
    assert len(calls) == int(batch["num_images"].sum())
    resumed.close()


def test_broken_samples_are_skipped_and_counted(tok, ids, data):
    lo = loader(tok, ids, [{"name": "broken", "path": data["broken"]}], micro_batch_size=2)
    batches = take(iter(lo), 8)  # 16 good samples = 2 epochs of 8 good ones
    seen = ids_of(batches)
    good = sorted(f"b{i:04d}" for i in range(12) if i not in {2, 5, 6, 9})
    assert sorted(seen[:8]) == good and sorted(seen[8:]) == good
    skipped = batches[-1]["meta"]["skipped"]
    assert skipped == {"bad_image": 4, "bad_json": 4}  # 2 of each per epoch
    assert lo.skipped == skipped


def test_truncated_shard_is_not_fatal(tok, ids, tmp_path):
    path = write_source(tmp_path / "trunc", "t", 6, per_shard=3)
    shard = os.path.join(path, "shard-000001.tar")
    with tarfile.open(shard) as tar:
        last = tar.getmembers()[-1]
    with open(shard, "r+b") as f:
        f.truncate(last.offset_data + last.size // 2)  # cut into the last member's data
    keys = [(k, err) for k, _, err in iter_shard_samples(shard)]
    assert keys[-1][1] == "truncated" and all(e == "" for _, e in keys[:-1])
    lo = loader(tok, ids, [{"name": "t", "path": path}], micro_batch_size=1)
    batches = take(iter(lo), 10)
    assert batches[-1]["meta"]["skipped"].get("truncated", 0) >= 1
    assert "t0005" not in ids_of(batches)


def test_mixture_follows_weights(tok, ids, data):
    src = [{"name": "many", "path": data["many"], "weight": 3.0}, {"name": "one", "path": data["one"], "weight": 1.0}]
    batches = take(iter(loader(tok, ids, src, micro_batch_size=8)), 50)
    counts = Counter(s for b in batches for s in b["meta"]["sources"])
    assert 0.68 < counts["many"] / 400 < 0.82


def test_state_from_another_topology_is_refused(tok, ids, data):
    src = [{"name": "many", "path": data["many"]}]
    state = loader(tok, ids, src).state_dict()
    with pytest.raises(ValueError, match="world_size"):
        loader(tok, ids, src, rank=0, world_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match="num_workers"):
        loader(tok, ids, src, num_workers=2).load_state_dict(state)


def test_too_many_global_workers_for_the_data_fails_clearly(tok, ids, tmp_path):
    path = write_source(tmp_path / "tiny", "x", 2, per_shard=10)
    lo = loader(tok, ids, [{"name": "x", "path": path}], rank=2, world_size=3, micro_batch_size=1)
    with pytest.raises(RuntimeError, match="no samples"):
        next(iter(lo))


def test_eval_prompts(tok, ids, data):
    got = list(iter_eval_prompts(data["broken"], tok, ids, SPEC, "simple", 128, 4, max_samples=5))
    assert [g[0] for g in got] == ["b0000", "b0001", "b0003", "b0004", "b0007"]  # manifest order, broken skipped
    for sid, prompt, images, answer in got:
        i = int(sid[1:])
        assert answer == f"sample {i}"
        assert prompt.shape[0] == 1 and prompt.dtype == torch.long
        assert prompt[0, 0] == ids.bos and prompt[0, -1] == ids.answer
        n = int((prompt == ids.image).sum())
        assert images.shape == (1, max(1, n), 3, 8, 8)
    again = list(iter_eval_prompts(data["broken"], tok, ids, SPEC, "simple", 128, 4, max_samples=5))
    assert [g[0] for g in again] == [g[0] for g in got]


def test_decode_image_resizes_to_uint8_pixels():
    spec = ImageSpec(size_px=16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    out = decode_image(jpeg((255, 0, 0), size=(40, 24)), spec)
    assert out.shape == (3, 16, 16) and out.dtype == torch.uint8
    assert out[0].float().mean() > 240 and out[1].float().mean() < 15 and out[2].float().mean() < 15
    png = io.BytesIO()
    Image.new("LA", (5, 7), (128, 255)).save(png, format="PNG")
    assert decode_image(png.getvalue(), spec).shape == (3, 16, 16)


def test_decode_image_large_jpeg_uses_reduced_decoding():
    rng = np.random.default_rng(0)
    big = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (400, 640, 3), dtype=np.uint8)).resize((640, 400)).save(big, format="JPEG")
    Image.fromarray(np.zeros((400, 640, 3), np.uint8)).save(io.BytesIO(), format="JPEG")
    spec = ImageSpec(size_px=32)
    out = decode_image(big.getvalue(), spec)
    assert out.shape == (3, 32, 32) and torch.isfinite(out).all()
    with Image.open(io.BytesIO(big.getvalue())) as img:
        img.draft("RGB", (32, 32))
        assert min(img.size) >= 32 and img.size[0] < 640  # the draft path really shrinks


@pytest.mark.parametrize("payload", [b"", b"\xff\xd8\xff\xe0 truncated jpeg", b"GIF89a nope", jpeg((1, 2, 3))[:60]])
def test_decode_image_rejects_bad_bytes(payload):
    with pytest.raises(BadSample) as e:
        decode_image(payload, SPEC)
    assert e.value.reason == "bad_image"
