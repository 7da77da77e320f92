"""data_tools converters: MMC4, OBELICS, MIMIC-IT video, pairs; resume/idempotency; inspect.

Every input is built here, tiny: noise JPEGs (the big ones pass MMC4's 10 KB floor), jsonl/gz/zip
documents, parquet with small row groups (so resuming lands inside a file), img2dataset tars.
"""

import base64
import gzip
import io
import json
import os
import sys
import tarfile
import types
import zipfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import data_tools.sharding as sharding
from data_tools import DataToolError
from data_tools.cli import main
from data_tools.mimicit import ImageIndex, convert_mimicit, write_images_parquet
from data_tools.mmc4 import convert_mmc4
from data_tools.obelics import END_OF_DOCUMENT, convert_obelics
from data_tools.pairs import index_pairs
from mmtrain.data.formats import read_manifest, sha256_file, validate_document, validate_episode

# ---------------------------------------------------------------------------------------------
# helpers


def _jpeg(seed, side=128):
    """Noise JPEG: side 128 gives > 10 KB (kept by MMC4's default floor), side 16 well under."""
    pixels = np.random.default_rng(seed).integers(0, 255, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _samples(out_dir):
    """[(key, {ext: bytes})] over the manifest's shards, in order."""
    found = []
    for shard in read_manifest(out_dir)["shards"]:
        with tarfile.open(os.path.join(out_dir, shard["name"])) as tar:
            for info in tar:
                key, _, ext = os.path.basename(info.name).partition(".")
                if not found or found[-1][0] != key:
                    found.append((key, {}))
                found[-1][1][ext] = tar.extractfile(info).read()
    return found


def _records(out_dir):
    return [json.loads(m["json"]) for _, m in _samples(out_dir)]


def _files(out_dir, pattern=("shard-", "manifest.json")):
    """{name: bytes} of the shards and manifest (the journal holds mtimes, so it is not compared)."""
    return {n: open(os.path.join(out_dir, n), "rb").read() for n in sorted(os.listdir(out_dir)) if n.startswith(pattern)}


def _mtimes(out_dir):
    return {n: os.stat(os.path.join(out_dir, n)).st_mtime_ns for n in os.listdir(out_dir)}


def _write_tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


# ---------------------------------------------------------------------------------------------
# MMC4


def _mmc4_doc(url, sentences, images, sim=None):
    """images: [(info dict, matched sentence, matched sim)]."""
    info = [dict(i, matched_text_index=m, matched_sim=s, raw_url=f"http://img/{n}") for n, (i, m, s) in enumerate(images)]
    if sim is None:
        sim = [[0.1] * len(sentences) for _ in images]
    return {"url": url, "text_list": sentences, "image_info": info, "similarity_matrix": sim}


@pytest.fixture()
def mmc4(tmp_path):
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    big_a, big_e, small, dim = _jpeg(1), _jpeg(2), _jpeg(3, side=16), _jpeg(4)
    assert len(big_a) >= 10240 and len(big_e) >= 10240 and len(small) < 10240
    (images_dir / "a.jpg").write_bytes(big_a)
    (images_dir / "small.jpg").write_bytes(small)
    docs = [
        _mmc4_doc("http://page/0", ["s0.", "s1.", "s2.", "s3."], [
            ({"image_name": "a.jpg"}, 2, 0.30),                                # kept, before s2
            ({"image_name": "small.jpg"}, 0, 0.30),                            # small_image
            ({"image_base64": base64.b64encode(dim).decode()}, 1, 0.10),       # below_threshold
            ({"image_name": "gone.jpg"}, 3, 0.30),                             # missing_image
            ({"image_base64": base64.b64encode(big_e).decode()}, 0, 0.25),     # kept (inline), before s0
        ]),
        _mmc4_doc("http://page/1", ["only text."], [({"image_name": "small.jpg"}, 0, 0.9)]),  # no_image
    ]
    lines = [json.dumps(d) for d in docs] + ["{not json", json.dumps({"text_list": "not a list"})]
    path = tmp_path / "docs_shard_0_v3.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write("\n".join(lines) + "\n")
    return {"path": str(path), "images_dir": str(images_dir), "a": big_a, "e": big_e}


def test_mmc4_images_land_before_their_matched_sentence(mmc4, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert main(["convert", "mmc4", mmc4["path"], "--images-dir", mmc4["images_dir"], "--out", out, "--quiet"]) == 0
    printed = capsys.readouterr().out
    samples = _samples(out)
    assert len(samples) == 1
    key, members = samples[0]
    record = json.loads(members["json"])
    validate_document(record, key)
    assert record["parts"] == [{"image": "0.jpg"}, {"text": "s0. s1."}, {"image": "1.jpg"}, {"text": "s2. s3."}]
    assert members["0.jpg"] == mmc4["e"] and members["1.jpg"] == mmc4["a"]
    assert record["id"] == key == "docs_shard_0_v3-1" and record["source"] == "mmc4"
    assert record["meta"]["url"] == "http://page/0"
    assert [i["raw_url"] for i in record["meta"]["images"]] == ["http://img/4", "http://img/0"]

    manifest = read_manifest(out)
    assert (manifest["kind"], manifest["corpus"], manifest["num_samples"]) == ("interleaved", "mmc4", 1)
    stats = manifest["stats"]
    assert stats["skipped"] == {"bad_json": 1, "bad_record": 1, "no_image": 1}
    assert stats["dropped_images"] == {"below_threshold": 1, "missing_image": 1, "small_image": 2}
    assert (stats["num_read"], stats["num_written"]) == (4, 1)
    assert "docs_shard_0_v3.jsonl.gz:3" in stats["examples"]["bad_json"]  # file and line
    for reason in ("no_image: 1", "small_image: 2", "below_threshold: 1"):
        assert reason in printed, printed


def test_mmc4_keep_text_only_and_min_image_bytes(mmc4, tmp_path):
    r = convert_mmc4([mmc4["path"]], str(tmp_path / "out"), images_dir=mmc4["images_dir"], keep_text_only=True,
                     min_image_bytes=0, quiet=True)
    records = _records(r.out_dir)
    assert [len(rec["parts"]) for rec in records] == [5, 2]  # small images now kept
    assert records[1]["parts"] == [{"image": "0.jpg"}, {"text": "only text."}]
    assert r.stats.dropped_images == {"below_threshold": 1, "missing_image": 1}


@pytest.mark.parametrize("threshold", ["30", "-1.5"])
def test_mmc4_threshold_outside_cosine_range_is_refused(mmc4, tmp_path, capsys, threshold):
    out = str(tmp_path / "out")
    assert main(["convert", "mmc4", mmc4["path"], "--out", out, "--sim-threshold", threshold]) == 2
    err = capsys.readouterr().err
    assert f"--sim-threshold {float(threshold):g}" in err and "OpenFlamingo's default of 30" in err and "0.24" in err
    assert not os.path.exists(out)


def _fake_scipy(monkeypatch):
    """scipy when installed, else a brute-force linear_sum_assignment with scipy's contract."""
    try:
        import scipy.optimize  # noqa: F401
        return
    except ImportError:
        pass
    import itertools

    def linear_sum_assignment(cost):
        cost = np.asarray(cost)
        rows, cols = cost.shape
        if rows > cols:
            c, r = linear_sum_assignment(cost.T)
            order = np.argsort(r)
            return r[order], c[order]
        best = min(itertools.permutations(range(cols), rows), key=lambda p: sum(cost[i, j] for i, j in enumerate(p)))
        return np.arange(rows), np.array(best)

    optimize = types.ModuleType("scipy.optimize")
    optimize.linear_sum_assignment = linear_sum_assignment
    monkeypatch.setitem(sys.modules, "scipy", types.ModuleType("scipy"))
    monkeypatch.setitem(sys.modules, "scipy.optimize", optimize)


def test_mmc4_hungarian_assignment_is_one_to_one(tmp_path, monkeypatch):
    a, b, c = _jpeg(5), _jpeg(6), _jpeg(7)
    # MMC4 matched both A and B to s1; the best one-to-one assignment puts A at s0 and B at s1,
    # and C (a third image for two... three sentences, all weak) lands on s2 below the threshold.
    doc = _mmc4_doc("u", ["s0.", "s1.", "s2."], [
        ({"image_base64": base64.b64encode(x).decode()}, 1, 0.35) for x in (a, b, c)],
        sim=[[0.30, 0.35, 0.00], [0.00, 0.36, 0.00], [0.10, 0.10, 0.20]])
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(doc) + "\n")

    matched = convert_mmc4([str(path)], str(tmp_path / "m"), quiet=True)
    assert _records(matched.out_dir)[0]["parts"] == [
        {"text": "s0."}, {"image": "0.jpg"}, {"image": "1.jpg"}, {"image": "2.jpg"}, {"text": "s1. s2."}]

    monkeypatch.setitem(sys.modules, "scipy", None)  # not installed: a clear error, before any output
    with pytest.raises(DataToolError, match="needs scipy"):
        convert_mmc4([str(path)], str(tmp_path / "h0"), assignment="hungarian", quiet=True)
    monkeypatch.delitem(sys.modules, "scipy")
    _fake_scipy(monkeypatch)
    hungarian = convert_mmc4([str(path)], str(tmp_path / "h"), assignment="hungarian", quiet=True)
    (key, members), = _samples(hungarian.out_dir)
    assert json.loads(members["json"])["parts"] == [{"image": "0.jpg"}, {"text": "s0."}, {"image": "1.jpg"}, {"text": "s1. s2."}]
    assert (members["0.jpg"], members["1.jpg"]) == (a, b)
    assert hungarian.stats.dropped_images == {"below_threshold": 1}


def test_mmc4_reads_zip_and_names_damaged_input(mmc4, tmp_path):
    doc = _mmc4_doc("u", ["s0."], [({"image_base64": base64.b64encode(mmc4["a"]).decode()}, 0, 0.3)])
    zipped = tmp_path / "docs_shard_7_v3.jsonl.zip"
    with zipfile.ZipFile(zipped, "w") as z:
        z.writestr("docs_shard_7_v3.jsonl", json.dumps(doc) + "\n")
    r = convert_mmc4([str(zipped)], str(tmp_path / "z"), quiet=True)
    assert [rec["id"] for rec in _records(r.out_dir)] == ["docs_shard_7_v3-1"]

    truncated = tmp_path / "cut.jsonl.gz"
    truncated.write_bytes(open(mmc4["path"], "rb").read()[:-40])
    with pytest.raises(DataToolError, match=r"cut\.jsonl\.gz: cannot read beyond line \d: the file is damaged or truncated"):
        convert_mmc4([str(truncated)], str(tmp_path / "t"), quiet=True)


# ---------------------------------------------------------------------------------------------
# OBELICS


@pytest.fixture()
def obelics(tmp_path):
    """Two parquet files (URL images; HF-style inline structs) and an img2dataset store holding
    one image in a tar and one as loose files."""
    store = tmp_path / "store"
    (store / "00001").mkdir(parents=True)
    in_tar, loose, inline = _jpeg(10, side=32), _jpeg(11, side=32), _jpeg(12, side=32)
    _write_tar(str(store / "00000.tar"), [
        ("000000000.jpg", in_tar), ("000000000.txt", b"alt"), ("000000000.json", json.dumps({"url": "http://u/1"}).encode()),
        ("000000001.txt", b"failed"), ("000000001.json", json.dumps({"url": "http://u/failed"}).encode())])
    (store / "00001" / "000010000.jpg").write_bytes(loose)
    (store / "00001" / "000010000.json").write_text(json.dumps({"url": "http://u/3", "status": "success"}))

    def meta(n):
        return json.dumps([None] * n)

    rows = [  # texts, images, page url
        (["Intro. " + END_OF_DOCUMENT, None, "Caption.", None, "End."], [None, "http://u/1", None, "http://u/gone", None], "http://p/0"),
        ([None, "Second doc."], ["http://u/3", None], "http://p/1"),
        (["misaligned"], [None, "http://u/1"], "http://p/2"),
        (["text only " + END_OF_DOCUMENT], [None], "http://p/3"),
        ([None], ["http://u/not-in-store"], "http://p/4"),  # bytes in the aligned image_bytes column
    ]
    column_bytes = _jpeg(13, side=32)
    path1 = str(tmp_path / "obelics-00000.parquet")
    pq.write_table(pa.table({
        "images": [r[1] for r in rows], "metadata": [meta(len(r[1])) for r in rows],
        "general_metadata": [json.dumps({"url": r[2], "warc_filename": "x"}) for r in rows],
        "texts": [r[0] for r in rows], "image_bytes": [[None] * len(r[1]) for r in rows[:-1]] + [[column_bytes]]}),
        path1, row_group_size=3)
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    path2 = str(tmp_path / "obelics-00001.parquet")
    pq.write_table(pa.table({
        "images": pa.array([[{"bytes": inline, "path": None}, None]], pa.list_(struct)),
        "texts": [[None, "Inline."]], "metadata": [meta(2)], "general_metadata": [json.dumps({"url": "http://p/5"})]}), path2)
    return {"paths": [path1, path2], "store": str(store), "in_tar": in_tar, "loose": loose, "inline": inline,
            "column_bytes": column_bytes}


def test_obelics_alignment_store_and_end_of_document(obelics, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert main(["convert", "obelics", *obelics["paths"], "--image-store", obelics["store"], "--out", out, "--quiet"]) == 0
    samples = _samples(out)
    records = [json.loads(m["json"]) for _, m in samples]
    assert [r["id"] for r in records] == ["obelics-00000-0", "obelics-00000-1", "obelics-00000-4", "obelics-00001-0"]
    assert records[0]["parts"] == [{"text": "Intro."}, {"image": "0.jpg"}, {"text": "Caption.\n\nEnd."}]
    assert records[0]["meta"] == {"url": "http://p/0", "image_urls": ["http://u/1"]}
    assert records[1]["parts"] == [{"image": "0.jpg"}, {"text": "Second doc."}]
    assert records[2]["parts"] == [{"image": "0.jpg"}] and records[2]["meta"]["url"] == "http://p/4"
    assert records[3]["parts"] == [{"image": "0.jpg"}, {"text": "Inline."}]
    assert [m["0.jpg"] for _, m in samples] == [obelics["in_tar"], obelics["loose"], obelics["column_bytes"],
                                                 obelics["inline"]]
    assert not any(END_OF_DOCUMENT.encode() in m["json"] for _, m in samples)
    stats = read_manifest(out)["stats"]
    assert stats["skipped"] == {"bad_record": 1, "no_image": 1}
    assert stats["dropped_images"] == {"missing_image": 1}
    assert "obelics-00000.parquet: row 2" in stats["examples"]["bad_record"]
    assert not os.path.exists(os.path.join(out, "image_store_index.sqlite"))  # removed once complete
    assert "missing_image: 1" in capsys.readouterr().out


def test_obelics_missing_image_policies(obelics, tmp_path):
    dropped = convert_obelics(obelics["paths"], str(tmp_path / "d"), image_store=obelics["store"],
                              on_missing_image="drop-document", keep_text_only=True, quiet=True)
    ids = [r["id"] for r in _records(dropped.out_dir)]
    assert ids == ["obelics-00000-1", "obelics-00000-3", "obelics-00000-4", "obelics-00001-0"]  # doc 0 lost its missing image: gone
    assert dropped.stats.skipped == {"bad_record": 1, "missing_image": 1}
    assert dropped.stats.dropped_images == {"missing_image": 1}
    assert _records(dropped.out_dir)[1]["parts"] == [{"text": "text only"}]

    no_store = convert_obelics(obelics["paths"], str(tmp_path / "n"), quiet=True)  # only inline images are had
    assert [r["id"] for r in _records(no_store.out_dir)] == ["obelics-00000-4", "obelics-00001-0"]
    assert no_store.stats.dropped_images == {"missing_image": 3}


def test_obelics_wrong_columns_name_the_file(tmp_path):
    path = str(tmp_path / "other.parquet")
    pq.write_table(pa.table({"caption": ["x"]}), path)
    with pytest.raises(DataToolError, match="other.parquet: no images, texts column"):
        convert_obelics([path], str(tmp_path / "o"), quiet=True)
    not_parquet = tmp_path / "fake.parquet"
    not_parquet.write_text("hello")
    with pytest.raises(DataToolError, match="fake.parquet: not a readable parquet file"):
        convert_obelics([str(not_parquet)], str(tmp_path / "o2"), quiet=True)


# ---------------------------------------------------------------------------------------------
# MIMIC-IT video frames and row-group lookup


def test_mimicit_video_frames_and_row_group_lookup(tmp_path):
    frames = [_jpeg(20 + i, side=16) for i in range(5)]
    ids = [f"V_IMG_clip_{i:06d}" for i in range(5)]
    images = str(tmp_path / "V.parquet")
    write_images_parquet(images, ids, [base64.b64encode(f).decode() for f in frames])
    pq.write_table(pq.read_table(images), images, row_group_size=2)  # 3 row groups
    instructions = str(tmp_path / "V_instructions.json")
    json.dump({"meta": {}, "data": {
        "V_INS_0": {"instruction": "What happens?", "answer": "A clip.", "image_ids": ids[:3], "rel_ins_ids": []},
        "V_INS_1": {"instruction": "And then?", "answer": "More.", "image_ids": ids[2:], "rel_ins_ids": ["V_INS_0"]},
    }}, open(instructions, "w"))
    r = convert_mimicit(instructions, [images], str(tmp_path / "out"), in_context="rel-ins", video=True, quiet=True)
    (k0, m0), (k1, m1) = _samples(r.out_dir)
    rec = json.loads(m1["json"])
    validate_episode(rec, k1)
    assert rec["turns"] == [
        {"instruction": "What happens?", "answer": "A clip.", "frames": ["0.jpg", "1.jpg", "2.jpg"]},
        {"instruction": "And then?", "answer": "More.", "frames": ["3.jpg", "4.jpg", "5.jpg"]}]
    assert [m1[f"{i}.jpg"] for i in range(6)] == frames[:3] + frames[2:]
    assert json.loads(m0["json"])["turns"][0]["frames"] == ["0.jpg", "1.jpg", "2.jpg"]

    index = ImageIndex([images])
    assert index._files[0].num_row_groups == 3
    assert [base64.b64decode(index.get(i)) for i in reversed(ids)] == frames[::-1]
    assert len(index._groups) == 2  # row groups are read on demand, two kept


# ---------------------------------------------------------------------------------------------
# Resume and idempotency, for every converter


@pytest.fixture()
def many(tmp_path):
    """A builder per converter over 12 records (one with no usable image; MMC4 also has a bad line)
    whose output spans several shards."""
    jpegs = [_jpeg(30 + i, side=16) for i in range(12)]
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps(_mmc4_doc(f"u{i}", [f"s{i}."], [
        ({"image_base64": base64.b64encode(j).decode()}, 0, 0.1 if i == 6 else 0.3)])) + "\n" + ("{bad\n" if i == 4 else "")
        for i, j in enumerate(jpegs)))
    rows = str(tmp_path / "rows.parquet")
    pq.write_table(pa.table({"texts": [[f"t{i}", None] for i in range(12)],
                             "images": [[None, None if i == 6 else f"http://u/{i}"] for i in range(12)]}),
                   rows, row_group_size=5)
    store = str(tmp_path / "store")
    os.makedirs(store)
    _write_tar(os.path.join(store, "00000.tar"), [m for i, j in enumerate(jpegs) for m in (
        (f"{i:09d}.jpg", j), (f"{i:09d}.json", json.dumps({"url": f"http://u/{i}"}).encode()))])
    ids = [f"R_IMG_{i}" for i in range(12)]
    images = str(tmp_path / "R.parquet")
    write_images_parquet(images, ids, [base64.b64encode(j).decode() for j in jpegs])
    instructions = str(tmp_path / "R_instructions.json")
    json.dump({"meta": {}, "data": {f"R_INS_{i}": {"instruction": f"q{i}", "answer": f"a{i}",
                                                    "image_ids": [ids[i] if i != 8 else "nope"]} for i in range(12)}},
              open(instructions, "w"))
    return {
        "mmc4": lambda out, **kw: convert_mmc4([str(docs)], out, min_image_bytes=0, **kw),
        "obelics": lambda out, **kw: convert_obelics([rows], out, image_store=store, **kw),
        "mimicit": lambda out, **kw: convert_mimicit(instructions, [images], out, **kw),
    }


@pytest.mark.parametrize("corpus", ["mmc4", "obelics", "mimicit"])
def test_resume_after_crash_is_byte_identical(many, tmp_path, monkeypatch, corpus):
    convert = many[corpus]
    whole = convert(str(tmp_path / "whole"), shard_samples=3, quiet=True)
    assert whole.num_shards == 4 and whole.num_samples == 11 and sum(whole.stats.skipped.values()) == 1 + (corpus == "mmc4")

    out = str(tmp_path / "crashed")
    real_add, calls = sharding.Journal.add, []

    def add_then_crash(self, shard, position, stats):
        real_add(self, shard, position, stats)
        calls.append(position)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated crash after 2 shards")

    monkeypatch.setattr(sharding.Journal, "add", add_then_crash)
    with pytest.raises(KeyboardInterrupt):
        convert(out, shard_samples=3, quiet=True)
    monkeypatch.setattr(sharding.Journal, "add", real_add)
    assert sorted(n for n in os.listdir(out) if n.startswith("shard-")) == ["shard-000000.tar", "shard-000001.tar"]
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    # What a kill -9 leaves behind: a half-written shard, and a shard the journal never recorded.
    open(os.path.join(out, "shard-000002.tar.tmp"), "wb").write(b"partial")
    open(os.path.join(out, "shard-000003.tar"), "wb").write(b"unrecorded")
    kept = {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in ("shard-000000.tar", "shard-000001.tar")}

    read_records = []
    real_count = sharding.Stats.count
    monkeypatch.setattr(sharding.Stats, "count", lambda self, rec: (read_records.append(rec.position), real_count(self, rec)))
    resumed = convert(out, shard_samples=3, quiet=True)
    assert resumed.resumed_shards == 2 and not resumed.up_to_date
    assert read_records[0] > calls[1]  # it continued after the last journaled record, not from the start
    assert {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in kept} == kept  # kept shards not rewritten
    assert _files(out) == _files(whole.out_dir)  # shards and manifest byte-identical
    assert resumed.stats.to_json() == whole.stats.to_json()


def test_rerun_is_a_no_op_and_force_or_changes_start_over(many, tmp_path):
    out = str(tmp_path / "out")
    first = many["mmc4"](out, shard_samples=3, quiet=True)
    before = _mtimes(out)
    again = many["mmc4"](out, shard_samples=3, quiet=True)
    assert again.up_to_date and "up to date" in again.summary() and again.num_samples == first.num_samples
    assert _mtimes(out) == before

    forced = many["mmc4"](out, shard_samples=3, quiet=True, force=True)
    assert not forced.up_to_date and forced.resumed_shards == 0
    assert os.stat(os.path.join(out, "shard-000000.tar")).st_mtime_ns != before["shard-000000.tar"]

    changed = many["mmc4"](out, shard_samples=100, quiet=True)  # other options: the old layout goes
    assert changed.num_shards == 1 and sorted(n for n in os.listdir(out) if n.startswith("shard-")) == ["shard-000000.tar"]


def test_shard_mib_is_a_target_size(many, tmp_path):
    r = many["mimicit"](str(tmp_path / "out"), shard_samples=None, shard_mib=2000 / (1 << 20), quiet=True)
    sizes = [sum(len(v) for v in m.values()) for _, m in _samples(r.out_dir)]
    counts = [s.num_samples for s in r.shards]
    assert len(counts) > 1 and sum(counts) == 11
    start = 0
    for n in counts[:-1]:  # each shard closed by the sample that reached the target, not before
        assert sum(sizes[start: start + n]) >= 2000 > sum(sizes[start: start + n - 1])
        start += n


def test_progress_bar_only_on_a_terminal(monkeypatch):
    assert sharding.progress(10, 0, "docs", quiet=False).disable  # pytest's stderr is not a TTY
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    bar = sharding.progress(10, 0, "docs", quiet=False)
    assert not bar.disable
    bar.close()
    assert sharding.progress(10, 0, "docs", quiet=True).disable


# ---------------------------------------------------------------------------------------------
# pairs


@pytest.fixture()
def laion(tmp_path):
    folder = tmp_path / "laion"
    folder.mkdir()
    a, b = _jpeg(40, side=24), _jpeg(41, side=24)
    _write_tar(str(folder / "00000.tar"), [
        ("000000000.jpg", a), ("000000000.txt", b"a cat"), ("000000000.json", b"{}"),
        ("000000001.jpg", b), ("000000001.txt", b"a dog"),
        ("000000002.jpg", a), ("000000002.json", b"{}")])  # no caption
    _write_tar(str(folder / "00001.tar"), [
        ("000010000.png", b), ("000010000.txt", b"a png"), ("000010001.txt", b"no image")])
    return folder


def test_pairs_manifest_lists_existing_tars_without_rewriting(laion, tmp_path, capsys):
    tars = sorted(str(p) for p in laion.iterdir())
    before = {t: (os.stat(t).st_mtime_ns, sha256_file(t)) for t in tars}
    out = str(tmp_path / "manifests" / "laion")
    assert main(["convert", "pairs", str(laion), "--out", out, "--quiet"]) == 0
    assert "listed 3 pairs in 2 shards" in capsys.readouterr().out
    manifest = read_manifest(out)  # checks ../../laion/0000N.tar exist relative to `out`
    assert (manifest["kind"], manifest["corpus"]) == ("pairs", "pairs")
    assert [(s["name"], s["num_samples"]) for s in manifest["shards"]] == [
        ("../../laion/00000.tar", 2), ("../../laion/00001.tar", 1)]
    assert [s["sha256"] for s in manifest["shards"]] == [before[t][1] for t in tars]
    assert manifest["stats"]["skipped"] == {"missing_caption": 1, "missing_image": 1}
    assert {t: (os.stat(t).st_mtime_ns, sha256_file(t)) for t in tars} == before
    assert sorted(os.listdir(out)) == ["convert_journal.jsonl", "manifest.json"]  # nothing copied
    assert index_pairs([str(laion)], out, quiet=True).up_to_date

    here = index_pairs([str(laion)], quiet=True)  # default: beside the tars
    assert here.out_dir == str(laion) and [s["name"] for s in read_manifest(str(laion))["shards"]] == ["00000.tar", "00001.tar"]


# ---------------------------------------------------------------------------------------------
# inspect


def test_inspect_renders_every_kind_as_text_html_and_png(mmc4, laion, many, tmp_path, capsys):
    interleaved = convert_mmc4([mmc4["path"]], str(tmp_path / "i"), images_dir=mmc4["images_dir"], quiet=True).out_dir
    episodes = many["mimicit"](str(tmp_path / "e"), quiet=True).out_dir
    index_pairs([str(laion)], quiet=True)
    for data_dir, expected in ((interleaved, ["<image 0.jpg JPEG 128x128> s0. s1. <image 1.jpg JPEG 128x128> s2. s3.",
                                              "corpus mmc4", "sources in the first 1 shard(s): mmc4=1",
                                              "skipped at conversion: bad_json=1, bad_record=1, no_image=1"]),
                               (episodes, ["[0 target] <image 0.jpg JPEG 16x16> User: q0 GPT: a0", "r=11"]),
                               (str(laion), ["<image jpg JPEG 24x24> a cat", "pairs=3"])):
        html_path, png_path = str(tmp_path / "s.html"), str(tmp_path / "s.png")
        assert main(["inspect", data_dir, "--num", "2", "--html", html_path, "--png", png_path]) == 0
        text = capsys.readouterr().out
        for snippet in expected:
            assert snippet in text, (snippet, text)
        page = open(html_path).read()
        assert page.count("<img src='data:image/jpeg;base64,") >= 2
        with Image.open(png_path) as sheet:
            assert sheet.width == 960 and sheet.height > 100
        assert expected[0].split("> ")[-1] in page  # the text, beside its images


def test_inspect_html_escapes_text_and_keeps_reading_order(tmp_path):
    doc = _mmc4_doc("u", ["<b>bold?</b>", "after"], [({"image_base64": base64.b64encode(_jpeg(50)).decode()}, 1, 0.3)])
    (tmp_path / "d.jsonl").write_text(json.dumps(doc) + "\n")
    out = convert_mmc4([str(tmp_path / "d.jsonl")], str(tmp_path / "o"), quiet=True).out_dir
    html_path = str(tmp_path / "p.html")
    assert main(["inspect", out, "--html", html_path]) == 0
    page = open(html_path).read()
    body = page.split("<body>")[1]
    assert "&lt;b&gt;bold?&lt;/b&gt;" in body and "<b>bold" not in body
    assert body.index("bold?") < body.index("<img src=") < body.index("after")
