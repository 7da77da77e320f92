"""data_tools: synthetic MIMIC-IT data, conversion to shards, idempotency, inspect, tokenizer."""

import base64
import hashlib
import io
import json
import os
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_tools import DataToolError
from data_tools.cli import main
from data_tools.mimicit import ImageIndex, convert_mimicit, write_images_parquet
from data_tools.synthetic import COLORS, POSITIONS, QUESTION_COLOR, QUESTION_DESCRIBE, QUESTION_WHERE, synth_shapes
from mmtrain.data.formats import read_manifest, validate_episode

# ---------------------------------------------------------------------------------------------
# helpers


def _read_shards(out_dir):
    """{key: {ext: bytes}} over all shards listed in the manifest, plus keys in stored order."""
    samples, order = {}, []
    for shard in read_manifest(out_dir)["shards"]:
        with tarfile.open(os.path.join(out_dir, shard["name"])) as tar:
            for info in tar:
                key, _, ext = info.name.partition(".")
                if key not in samples:
                    samples[key] = {}
                    order.append(key)
                samples[key][ext] = tar.extractfile(info).read()
    return samples, order


def _sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _decode(data):
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _classify(pixels):
    """(colour, quadrant) read back from the pixels alone, independent of the generator's code."""
    px = pixels.astype(np.int32)
    strong = (px.max(-1) - px.min(-1)) > 90  # the background is near-grey, the shapes saturated
    assert strong.sum() > 20, "no shape found"
    mean = px[strong].mean(0)
    colour = min(COLORS, key=lambda c: float(((mean - np.array(COLORS[c])) ** 2).sum()))
    # Shape pixels: close to that colour (JPEG leaves pale halos around edges, which are not).
    mask = np.sqrt(((px - np.array(COLORS[colour])) ** 2).sum(-1)) < 90
    ys, xs = np.nonzero(mask)
    half_y, half_x = pixels.shape[0] / 2, pixels.shape[1] / 2
    # The whole shape lies inside one quadrant, so the question "where" has one answer.
    assert (ys.max() < half_y or ys.min() >= half_y) and (xs.max() < half_x or xs.min() >= half_x), "shape spans quadrants"
    row = "top" if ys.mean() < half_y else "bottom"
    column = "left" if xs.mean() < half_x else "right"
    return colour, f"{row} {column}"


def _png_bytes(color=(10, 200, 30), size=(5, 4)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg_bytes(color=(200, 20, 20), size=(8, 8)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    raw = str(tmp_path_factory.mktemp("raw"))
    return synth_shapes(raw, num_episodes=40, seed=3, image_size_px=64, context_fraction=0.5)


# ---------------------------------------------------------------------------------------------
# synth


def test_synth_layout_and_answers_match_pixels(shapes):
    body = json.load(open(shapes["instructions"]))
    data = body["data"]
    train = json.load(open(shapes["train_config"]))
    table = pq.read_table(shapes["images"])
    assert table.column_names == ["base64", "id"]
    assert json.loads(table.schema.metadata[b"pandas"])["index_columns"] == ["id"]
    images = dict(zip(table.column("id").to_pylist(), table.column("base64").to_pylist()))
    assert len(data) == len(train) == len(images) == 40
    assert list(train) == list(data)

    questions, with_context = set(), 0
    for ins_id, entry in data.items():
        assert len(entry["image_ids"]) == 1
        pixels = _decode(base64.b64decode(images[entry["image_ids"][0]]))
        assert pixels.shape == (64, 64, 3)
        colour, position = _classify(pixels)
        background = pixels[(pixels.max(-1).astype(int) - pixels.min(-1)) < 60]
        assert len(background) > 0.3 * 64 * 64
        level = np.median(background, axis=0)
        assert level.min() > 200 and level.max() - level.min() < 20, level  # light, near-grey
        assert 1.0 < background.std(0).mean() < 12.0  # mild noise, not flat and not busy
        q = entry["instruction"]
        questions.add(q)
        expected = {QUESTION_COLOR: colour, QUESTION_WHERE: position, QUESTION_DESCRIBE: f"{colour} {position}"}[q]
        assert entry["answer"] == expected, (ins_id, q, entry["answer"], expected)
        ctx = train[ins_id]
        assert entry["rel_ins_ids"] == ctx
        assert len(ctx) <= 2 and ins_id not in ctx and len(set(ctx)) == len(ctx)
        assert all(c in data for c in ctx)
        with_context += bool(ctx)
    assert questions == {QUESTION_COLOR, QUESTION_WHERE, QUESTION_DESCRIBE}
    assert 8 <= with_context <= 32  # ~ context_fraction 0.5 of 40


def test_synth_is_deterministic_from_seed(tmp_path):
    a = synth_shapes(str(tmp_path / "a"), num_episodes=6, seed=7, context_fraction=1.0)
    b = synth_shapes(str(tmp_path / "b"), num_episodes=6, seed=7, context_fraction=1.0)
    c = synth_shapes(str(tmp_path / "c"), num_episodes=6, seed=8, context_fraction=1.0)
    for k in a:
        assert _sha256(a[k]) == _sha256(b[k]), k
    assert _sha256(a["images"]) != _sha256(c["images"])
    assert all(len(v) in (1, 2) for v in json.load(open(a["train_config"])).values())


def test_synth_covers_all_positions_and_colours(tmp_path):
    p = synth_shapes(str(tmp_path), num_episodes=200, seed=0, image_size_px=48, context_fraction=0.0)
    data = json.load(open(p["instructions"]))["data"]
    answers = " | ".join(e["answer"] for e in data.values())
    assert all(name in answers for name, _, _ in POSITIONS) and all(c in answers for c in COLORS)
    assert all(v == [] for v in json.load(open(p["train_config"])).values())


# ---------------------------------------------------------------------------------------------
# convert


def test_convert_synth_records_images_order_and_manifest(shapes, tmp_path):
    out = str(tmp_path / "shards")
    rc = main(["convert", "mimicit", "--instructions", shapes["instructions"], "--images", shapes["images"],
               "--train-config", shapes["train_config"], "--out", out, "--shard-samples", "15"])
    assert rc == 0
    data = json.load(open(shapes["instructions"]))["data"]
    train = json.load(open(shapes["train_config"]))
    table = pq.read_table(shapes["images"])
    images = dict(zip(table.column("id").to_pylist(), table.column("base64").to_pylist()))

    manifest = read_manifest(out)
    assert manifest["kind"] == "mimicit" and manifest["num_samples"] == 40
    assert [s["num_samples"] for s in manifest["shards"]] == [15, 15, 10]
    for shard in manifest["shards"]:
        path = os.path.join(out, shard["name"])
        assert _sha256(path) == shard["sha256"]
        with tarfile.open(path) as tar:
            assert sum(m.name.endswith(".json") for m in tar.getmembers()) == shard["num_samples"]

    samples, order = _read_shards(out)
    assert order == list(train)  # episodes in train-config order
    for ins_id in train:
        members = samples[ins_id]
        record = json.loads(members["json"])
        validate_episode(record, ins_id)
        assert record["id"] == ins_id and record["source"] == "shapes"
        expected_ids = train[ins_id] + [ins_id]  # in-context first, target last
        assert [(t["instruction"], t["answer"]) for t in record["turns"]] == [
            (data[i]["instruction"], data[i]["answer"]) for i in expected_ids]
        names = [n for t in record["turns"] for n in t["images"]]
        assert names == [f"{k}.jpg" for k in range(len(expected_ids))]
        assert sorted(members) == sorted(names + ["json"])
        for name, i in zip(names, expected_ids):
            original = base64.b64decode(images[data[i]["image_ids"][0]])
            assert members[name] == original
            np.testing.assert_array_equal(_decode(members[name]), _decode(original))
        # The target's answer is about the target image (the last one), not the context's.
        colour, position = _classify(_decode(members[names[-1]]))
        assert record["turns"][-1]["answer"] in (colour, position, f"{colour} {position}")


def test_convert_in_context_modes(shapes, tmp_path):
    data = json.load(open(shapes["instructions"]))["data"]
    r = convert_mimicit(shapes["instructions"], [shapes["images"]], str(tmp_path / "rel"), in_context="rel-ins")
    samples, order = _read_shards(r.out_dir)
    assert order == list(data)
    for ins_id, entry in data.items():
        assert len(json.loads(samples[ins_id]["json"])["turns"]) == len(entry["rel_ins_ids"]) + 1

    r = convert_mimicit(shapes["instructions"], [shapes["images"]], str(tmp_path / "none"))
    samples, _ = _read_shards(r.out_dir)
    assert all(len(json.loads(m["json"])["turns"]) == 1 for m in samples.values())
    assert r.num_samples == 40

    with pytest.raises(DataToolError, match="needs --train-config"):
        convert_mimicit(shapes["instructions"], [shapes["images"]], str(tmp_path / "x"), in_context="train-config")


@pytest.fixture()
def handwritten(tmp_path):
    """Legacy-JSON MIMIC-IT set: PNG + JPEG images, a missing image id, bad base64, a missing
    in-context instruction, base64 with line breaks."""
    png, jpg = _png_bytes(), _jpeg_bytes()
    b64_jpg = base64.b64encode(jpg).decode()
    images = {
        "T_IMG_png": base64.b64encode(png).decode(),
        "T_IMG_jpg": "\n".join(b64_jpg[i: i + 20] for i in range(0, len(b64_jpg), 20)),  # MIME-style
        "T_IMG_bad": "this is !!! not base64",
        "T_IMG_txt": base64.b64encode(b"just some text, not an image").decode(),
    }
    data = {
        "T_INS_0": {"instruction": "What color?", "answer": "green", "image_ids": ["T_IMG_png"], "rel_ins_ids": []},
        "T_INS_1": {"instruction": "Two images?", "answer": "yes", "image_ids": ["T_IMG_jpg", "T_IMG_png"],
                    "rel_ins_ids": ["T_INS_0"]},
        "T_INS_2": {"instruction": "Missing?", "answer": "x", "image_ids": ["T_IMG_nope"], "rel_ins_ids": []},
        "T_INS_3": {"instruction": "Bad?", "answer": "x", "image_ids": ["T_IMG_bad"], "rel_ins_ids": []},
        "T_INS_4": {"instruction": "Text only turn", "answer": "ok", "image_ids": [], "rel_ins_ids": ["T_INS_9"]},
        "T_INS_5": {"instruction": "Not an image", "answer": "x", "image_ids": ["T_IMG_txt"], "rel_ins_ids": []},
    }
    train = {"T_INS_1": ["T_INS_0"], "T_INS_0": [], "T_INS_2": ["T_INS_0"], "T_INS_3": [], "T_INS_4": ["T_INS_9"],
             "T_INS_5": []}
    paths = {"instructions": str(tmp_path / "T_instructions.json"), "images": str(tmp_path / "T.json"),
             "train_config": str(tmp_path / "T_train.json")}
    json.dump({"meta": {"version": "0"}, "data": data}, open(paths["instructions"], "w"))
    json.dump(images, open(paths["images"], "w"))
    json.dump(train, open(paths["train_config"], "w"))
    return paths, png, jpg


def test_convert_handwritten_legacy_json_skips_and_counts(handwritten, tmp_path, capsys):
    paths, png, jpg = handwritten
    out = str(tmp_path / "out")
    rc = main(["convert", "mimicit", "--instructions", paths["instructions"], "--images", paths["images"],
               "--train-config", paths["train_config"], "--out", out])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "wrote 2 episodes" in printed
    for reason in ("missing_image: 1", "bad_base64: 1", "missing_instruction: 1", "unknown_image_format: 1"):
        assert reason in printed, printed
    stats = read_manifest(out)["stats"]
    assert stats["skipped"] == {"bad_base64": 1, "missing_image": 1, "missing_instruction": 1, "unknown_image_format": 1}
    assert (stats["num_read"], stats["num_written"]) == (6, 2)

    samples, order = _read_shards(out)
    assert order == ["T_INS_1", "T_INS_0"]
    rec = json.loads(samples["T_INS_1"]["json"])
    assert rec == {"id": "T_INS_1", "source": "t", "turns": [
        {"instruction": "What color?", "answer": "green", "images": ["0.png"]},
        {"instruction": "Two images?", "answer": "yes", "images": ["1.jpg", "2.png"]},
    ]}
    assert samples["T_INS_1"]["0.png"] == png and samples["T_INS_1"]["2.png"] == png
    assert samples["T_INS_1"]["1.jpg"] == jpg
    assert _decode(samples["T_INS_1"]["0.png"])[0, 0].tolist() == [10, 200, 30]
    assert json.loads(samples["T_INS_0"]["json"])["turns"][0]["images"] == ["0.png"]


def test_convert_is_idempotent_and_rebuilds_on_change(shapes, tmp_path):
    out = str(tmp_path / "out")
    args = dict(instructions_path=shapes["instructions"], images_paths=[shapes["images"]], out_dir=out,
                train_config_path=shapes["train_config"], shard_samples=15)
    first = convert_mimicit(**args)
    assert not first.up_to_date and first.num_shards == 3
    names = sorted(os.listdir(out))
    before = {n: (os.stat(os.path.join(out, n)).st_mtime_ns, _sha256(os.path.join(out, n))) for n in names}

    again = convert_mimicit(**args)
    assert again.up_to_date and again.num_samples == 40 and again.num_shards == 3
    assert sorted(os.listdir(out)) == names
    assert {n: (os.stat(os.path.join(out, n)).st_mtime_ns, _sha256(os.path.join(out, n))) for n in names} == before

    # A different option rebuilds, and shards of the old, larger layout disappear.
    changed = convert_mimicit(**{**args, "shard_samples": 100})
    assert not changed.up_to_date and changed.num_shards == 1
    assert sorted(n for n in os.listdir(out) if n.startswith("shard-")) == ["shard-000000.tar"]
    assert read_manifest(out)["num_samples"] == 40

    # A tampered shard is noticed and the output rebuilt.
    with open(os.path.join(out, "shard-000000.tar"), "ab") as f:
        f.write(b"\0" * 512)
    assert not convert_mimicit(**{**args, "shard_samples": 100}).up_to_date
    assert _sha256(os.path.join(out, "shard-000000.tar")) == read_manifest(out)["shards"][0]["sha256"]


def test_convert_is_deterministic(shapes, tmp_path):
    a = convert_mimicit(shapes["instructions"], [shapes["images"]], str(tmp_path / "a"), shapes["train_config"])
    b = convert_mimicit(shapes["instructions"], [shapes["images"]], str(tmp_path / "b"), shapes["train_config"])
    assert read_manifest(a.out_dir)["shards"] == read_manifest(b.out_dir)["shards"]


def test_parquet_id_column_variants(tmp_path):
    jpg = _jpeg_bytes()
    b64 = base64.b64encode(jpg).decode()
    plain = str(tmp_path / "plain.parquet")  # no pandas metadata, pandas-style unnamed index column
    pq.write_table(pa.table({"base64": [b64], "__index_level_0__": ["I0"]}), plain)
    with_id = str(tmp_path / "id.parquet")
    pq.write_table(pa.table({"id": ["I1"], "base64": [b64]}), with_id)
    ours = str(tmp_path / "ours.parquet")
    write_images_parquet(ours, ["I2", "I3"], [b64, b64])
    index = ImageIndex([plain, with_id, ours])
    assert len(index) == 4
    assert all(base64.b64decode(index.get(i)) == jpg for i in ("I0", "I1", "I2", "I3"))
    assert index.get("I9") is None


@pytest.mark.parametrize("case", ["missing_instructions", "bad_json", "missing_images", "no_base64_column", "no_data"])
def test_convert_input_errors_name_the_file(case, handwritten, tmp_path, capsys):
    paths, _, _ = handwritten
    instructions, images = paths["instructions"], paths["images"]
    if case == "missing_instructions":
        instructions = str(tmp_path / "nope_instructions.json")
        culprit = instructions
    elif case == "bad_json":
        open(instructions, "w").write("{not json")
        culprit = instructions
    elif case == "missing_images":
        images = str(tmp_path / "nope.parquet")
        culprit = images
    elif case == "no_base64_column":
        images = str(tmp_path / "wrong.parquet")
        pq.write_table(pa.table({"id": ["a"], "jpg": ["b"]}), images)
        culprit = images
    else:
        json.dump({"meta": {}}, open(instructions, "w"))
        culprit = instructions
    out = str(tmp_path / "out")
    rc = main(["convert", "mimicit", "--instructions", instructions, "--images", images, "--out", out])
    err = capsys.readouterr().err
    assert rc == 2 and culprit in err, err
    assert not os.path.exists(os.path.join(out, "manifest.json"))


def test_convert_with_nothing_convertible_is_an_error(tmp_path):
    instr = tmp_path / "E_instructions.json"
    json.dump({"meta": {}, "data": {"E_INS_0": {"instruction": "q", "answer": "a", "image_ids": ["gone"]}}},
              open(instr, "w"))
    json.dump({}, open(tmp_path / "E.json", "w"))
    with pytest.raises(DataToolError, match="no episodes could be converted"):
        convert_mimicit(str(instr), [str(tmp_path / "E.json")], str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out" / "manifest.json")


# ---------------------------------------------------------------------------------------------
# inspect


def test_inspect_prints_counts_and_turns(handwritten, tmp_path, capsys):
    paths, _, _ = handwritten
    out = str(tmp_path / "out")
    convert_mimicit(paths["instructions"], [paths["images"]], out, paths["train_config"])
    capsys.readouterr()
    assert main(["inspect", out, "--num", "1", "--verify"]) == 0
    text = capsys.readouterr().out
    assert "kind mimicit, corpus mimicit, 1 shards, 2 samples" in text
    assert "OK" in text and "missing_image=1" in text
    assert "<image 0.png PNG 5x4>" in text and "<image 1.jpg JPEG 8x8>" in text
    assert "User: Two images? GPT: yes" in text and "[0 context]" in text and "[1 target]" in text
    assert "T_INS_0 " not in text  # --num 1: only the first sample
    assert main(["inspect", str(tmp_path / "nowhere")]) == 2


# ---------------------------------------------------------------------------------------------
# tokenizer


def test_tokenizer_round_trips_and_leaves_media_tokens_out(shapes, tmp_path):
    from transformers import AutoTokenizer

    out = str(tmp_path / "tok")
    assert main(["tokenizer", "train", "--out", out, "--instructions", shapes["instructions"], "--vocab-size", "400"]) == 0
    assert os.path.isfile(os.path.join(out, "tokenizer.json"))
    tok = AutoTokenizer.from_pretrained(out)
    assert 256 < tok.vocab_size <= 400
    assert (tok.unk_token, tok.bos_token, tok.eos_token, tok.pad_token) == ("<unk>", "<s>", "</s>", "<pad>")
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 3)
    vocab = tok.get_vocab()
    media = ["<image>", "<|endofchunk|>", "<answer>"]
    assert not any(m in vocab for m in media)
    assert len(tok) == tok.vocab_size
    assert tok.clean_up_tokenization_spaces is False  # transformers 4.x would strip spaces before punctuation

    assert tok.decode(tok.encode(" red circle", add_special_tokens=False)).strip() == "red circle"
    assert tok.decode(tok.encode(" red circle", add_special_tokens=False)) == " red circle"
    assert tok.encode("red", add_special_tokens=True)[0] == tok.bos_token_id

    tok.add_special_tokens({"additional_special_tokens": media})
    assert len(tok) == tok.vocab_size + 3
    ids = {m: tok.convert_tokens_to_ids(m) for m in media}
    assert all(i >= tok.vocab_size for i in ids.values())
    seq = tok.encode("<image>User:What color is the shape? GPT:<answer>red<|endofchunk|>", add_special_tokens=False)
    assert seq[0] == ids["<image>"]
    a, e = seq.index(ids["<answer>"]), seq.index(ids["<|endofchunk|>"])
    assert tok.decode(seq[a + 1: e]) == "red"
    assert tok.decode(seq[1:a]) == "User:What color is the shape? GPT:"
    # Arbitrary text (unseen words, unicode) survives: byte-level, lossless.
    for text in ("Describe the object. yellow cross", "  naïve 東京 ok\n", "[INST]\nq[/INST]", "is it red ? yes , it 's red ."):
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    # The learned merges make common answers short.
    assert len(tok.encode(" yellow", add_special_tokens=False)) == 1


def test_tokenizer_rejects_tiny_vocab_and_missing_file(shapes, tmp_path, capsys):
    assert main(["tokenizer", "train", "--out", str(tmp_path / "t"), "--instructions", shapes["instructions"],
                 "--vocab-size", "100"]) == 2
    assert "--vocab-size 100" in capsys.readouterr().err
    missing = str(tmp_path / "nope_instructions.json")
    assert main(["tokenizer", "train", "--out", str(tmp_path / "t"), "--instructions", missing]) == 2
    assert missing in capsys.readouterr().err
