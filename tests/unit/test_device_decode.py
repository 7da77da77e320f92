"""JPEG decoding on the training device (data.image_decode=device, mmtrain.data.device_decode).

On CPU here (torchvision's libjpeg path stands in for nvJPEG: the same plumbing, the same failure
handling); tests/gpu/test_device_decode_gpu.py runs it on CUDA.

* the header check passes plain JPEGs on and leaves everything else to the workers, and never
  raises, whatever the bytes;
* a loader with image_decode=device gives the batches of image_decode=workers: same samples,
  tokens and labels, images within a level or so, and exact resume, with 0 and 2 workers;
* on a CPU device the pixels are the full-size decode resized (a reference computed apart);
* JPEGs with damaged headers stay in the workers and are skipped as there; a batched failure is
  retried image by image, and an image no decoder takes (simulated) leaves a black slot, counted
  as bad_image_on_device, and the count survives the loader state;
* Fuyu's patch layout refuses the option with a clear error.
"""

import json
import zlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from jpeg_samples import (
    encode,
    full_size_reference,
    picture,
    with_frame_size,
    with_unknown_scan_component,
    without_quant_tables,
    without_segment,
    write_docs,
)

from mmtrain.data import device_decode
from mmtrain.data import stream as stream_mod
from mmtrain.data.device_decode import (
    DEVICE_FAILURE_REASON,
    DEVICE_MAX_PIXELS,
    decode_jpegs,
    jpeg_for_device,
    pack_jpegs,
)
from mmtrain.data.formats import BadSample
from mmtrain.data.images import ImageSpec, decode_image
from mmtrain.data.patches import PatchSpec
from mmtrain.data.stream import build_train_loader

SPEC = ImageSpec(size_px=24)
BASE = encode(picture(0), quality=90)


@pytest.mark.parametrize("name, data, passed_on", [
    ("baseline", BASE, True),
    ("progressive", encode(picture(0), quality=90, progressive=True), True),
    ("grayscale", encode(picture(0), mode="L"), True),
    ("padded after EOI", BASE + b"\0" * 20, True),
    ("CMYK", encode(picture(0), mode="CMYK"), False),
    ("PNG", encode(picture(0), fmt="PNG"), False),
    ("truncated", BASE[: len(BASE) // 2], False),
    ("empty", b"", False),
    ("SOI only", b"\xff\xd8\xff\xd9", False),
    ("over DEVICE_MAX_PIXELS", with_frame_size(BASE, 4096, DEVICE_MAX_PIXELS // 4096 + 1), False),
    ("20000x20000", with_frame_size(BASE, 20000, 20000), False),
    ("no quantisation tables", without_quant_tables(BASE), False),
    ("unknown scan component", with_unknown_scan_component(BASE), False),
    ("RGB-coded (Adobe marker)", encode(picture(0), keep_rgb=True), False),
    ("RGB-coded (component ids R, G, B only)", without_segment(encode(picture(0), keep_rgb=True), 0xEE), False),
])
def test_header_check(name, data, passed_on):
    assert jpeg_for_device(data) is passed_on, name


def test_what_the_workers_keep_gets_their_usual_skip_reason():
    with pytest.raises(BadSample) as e:
        decode_image(with_frame_size(BASE, 20000, 20000), SPEC)
    assert e.value.reason == "image_too_large"
    with pytest.raises(BadSample) as e:
        decode_image(BASE[: len(BASE) // 2] + b"\0" * 8, SPEC)
    assert e.value.reason == "bad_image"


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=300),
                 st.tuples(st.integers(0, len(BASE)), st.binary(max_size=40)).map(lambda c: BASE[:c[0]] + c[1]),
                 st.tuples(st.integers(2, len(BASE) - 1), st.integers(0, 255)).map(
                     lambda c: BASE[:c[0]] + bytes([c[1]]) + BASE[c[0] + 1:])))
def test_header_check_never_raises(data):
    assert jpeg_for_device(data) in (True, False)


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    root = tmp_path_factory.mktemp("device_decode")
    return {"good": write_docs(root / "good", 20),
            "broken": write_docs(root / "broken", 8, broken={3: "scan", 5: "scan", 6: "tables"})}


def loader(tok, ids, path, **kw):
    args = dict(template="simple", max_seq_tokens=256, max_images=6, micro_batch_size=2, seed=3, rank=0,
                world_size=1, num_workers=0, shuffle_buffer_samples=8, packing=True, decode_device=torch.device("cpu"))
    args.update(kw)
    return build_train_loader([{"name": "docs", "path": path, "kind": "interleaved"}], tok, ids, SPEC, **args)


def take(lo, n):
    it = iter(lo)
    batches = [next(it) for _ in range(n)]
    lo.close()
    return batches


def spy_on_device_decoding(monkeypatch):
    """Counts the images the training process decodes (the workers passed them on)."""
    decoded = []
    real = stream_mod.decode_jpegs
    monkeypatch.setattr(stream_mod, "decode_jpegs", lambda images, jpegs, spec: decoded.append(len(jpegs["slots"]))
                        or real(images, jpegs, spec))
    return decoded


def jpeg_images(batches):
    """Images of these batches that are JPEGs: all but the PNG of every fifth document (write_docs)."""
    pngs = sum(int(sid[3:]) % 5 == 4 for b in batches for sid in b["meta"]["sample_ids"])
    return sum(int(b["num_images"].sum()) for b in batches) - pngs


@pytest.mark.parametrize("num_workers", [0, 2])
def test_device_decode_gives_the_workers_batches(tok, ids, docs, num_workers, monkeypatch):
    on_workers = take(loader(tok, ids, docs["good"], num_workers=num_workers), 6)
    decoded = spy_on_device_decoding(monkeypatch)
    on_device = take(loader(tok, ids, docs["good"], num_workers=num_workers, image_decode="device"), 6)
    assert len(decoded) == 6 and sum(decoded) == jpeg_images(on_device) > 0  # every JPEG, no PNG
    errors = []
    for a, b in zip(on_workers, on_device):
        assert a["meta"]["sample_ids"] == b["meta"]["sample_ids"]
        assert "jpegs" not in b and set(a) == set(b)
        for key in ("input_ids", "labels", "attention_mask", "position_ids", "num_images"):
            assert torch.equal(a[key], b[key]), key
        assert a["images"].shape == b["images"].shape and b["images"].dtype == torch.uint8
        for row, count in enumerate(b["num_images"].tolist()):
            assert (b["images"][row, count:] == 0).all()  # unused slots stay black
            assert (b["images"][row, :count].flatten(1).amax(1) > 0).all()  # every used slot was filled
        errors.append((a["images"].float() - b["images"].float()).abs())
    errors = torch.cat([e.flatten() for e in errors])
    # Full-size decode vs the workers' DCT scale-down, both then bicubic: about a level apart.
    assert 0.5 < errors.mean() < 2.5 and errors.max() < 64, (float(errors.mean()), float(errors.max()))


def test_device_decode_resumes_exactly(tok, ids, docs, monkeypatch):
    decoded = spy_on_device_decoding(monkeypatch)
    reference = take(loader(tok, ids, docs["good"], image_decode="device"), 7)
    assert sum(decoded) == jpeg_images(reference) > 0
    first = loader(tok, ids, docs["good"], image_decode="device")
    take(first, 3)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = loader(tok, ids, docs["good"], image_decode="device")
    resumed.load_state_dict(state)
    for a, b in zip(take(resumed, 4), reference[3:]):
        assert a["meta"]["sample_ids"] == b["meta"]["sample_ids"]
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["input_ids"], b["input_ids"])


def test_damaged_headers_are_skipped_as_in_the_workers(tok, ids, docs):
    # Documents 3, 5 and 6 hold a JPEG with damaged headers: the check keeps it in the workers,
    # whose decoder skips the document (bad_image) in both modes alike.
    batches = {mode: take(loader(tok, ids, docs["broken"], image_decode=mode, packing=False), 3)
               for mode in ("workers", "device")}  # 6 samples: the 5 good documents, then one more
    for mode, got in batches.items():
        assert sorted([sid for b in got for sid in b["meta"]["sample_ids"]][:5]) == [
            f"doc{i:03d}" for i in (0, 1, 2, 4, 7)], mode
        assert set(got[-1]["meta"]["skipped"]) == {"bad_image"} and got[-1]["meta"]["skipped"]["bad_image"] >= 3, mode
    assert [b["meta"]["skipped"] for b in batches["workers"]] == [b["meta"]["skipped"] for b in batches["device"]]
    assert (batches["workers"][0]["images"] != batches["device"][0]["images"]).any()  # the good JPEGs went to the device


def test_a_batched_failure_is_retried_image_by_image(monkeypatch):
    """nvJPEG's batched call fails as a whole; the images it then refuses alone go to the CPU decoder."""
    import torchvision.io

    real = torchvision.io.decode_jpeg
    refused = encode(picture(7), quality=90)

    def device_decoder(blobs, **kw):  # stands in for a device that will not take `refused`
        if any(bytes(b.numpy()) == refused for b in (blobs if isinstance(blobs, list) else [blobs])):
            raise RuntimeError("simulated nvJPEG failure")
        return real(blobs, **kw)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", device_decoder)
    blobs = [BASE, refused, encode(picture(8), quality=80)]
    images = torch.zeros(1, 3, 3, 24, 24, dtype=torch.uint8)
    assert decode_jpegs(images, pack_jpegs([(0, 0), (0, 1), (0, 2)], blobs), SPEC) == {}
    for j, data in enumerate(blobs):  # the refused one as the workers decode it, the others as the device does
        expected = decode_image(data, SPEC) if data == refused else full_size_reference(data, 24)
        assert torch.equal(images[0, j], expected), j


def test_images_no_decoder_takes_leave_a_black_slot_and_are_counted(tok, ids, docs, monkeypatch):
    """Images that both the device and the CPU refuse (simulated: none of the test JPEGs is damaged
    that way) keep their sample, black, and are counted in the loader state."""
    def refuse(blob: bytes) -> bool:
        return zlib.crc32(blob) % 3 == 0

    real_decode_all = device_decode._decode_all
    monkeypatch.setattr(device_decode, "_decode_all", lambda blobs, device: [
        None if refuse(bytes(b.numpy())) else out for b, out in zip(blobs, real_decode_all(blobs, device))])
    real_decode_image = device_decode.decode_image

    def cpu_decoder(data, spec):
        if refuse(data):
            raise BadSample("bad_image", "simulated")
        return real_decode_image(data, spec)

    monkeypatch.setattr(device_decode, "decode_image", cpu_decoder)
    lo = loader(tok, ids, docs["good"], image_decode="device")
    batches = take(lo, 5)
    black = sum(int((b["images"][row, :n].flatten(1).amax(1) == 0).sum())
                for b in batches for row, n in enumerate(b["num_images"].tolist()))
    assert black >= 2 and lo.skipped == {DEVICE_FAILURE_REASON: black} == batches[-1]["meta"]["skipped"]
    resumed = loader(tok, ids, docs["good"], image_decode="device")
    resumed.load_state_dict(json.loads(json.dumps(lo.state_dict())))
    assert resumed.skipped == {DEVICE_FAILURE_REASON: black}


def test_device_path_is_the_full_size_decode_resized(monkeypatch):
    """On a CPU device the decode is libjpeg's, as Pillow's: the result is the reference exactly,
    also when the batch is decoded and resized in several chunks (the device memory bound)."""
    monkeypatch.setattr(device_decode, "DECODE_CHUNK_IMAGES", 3)
    monkeypatch.setattr(device_decode, "RESIZE_CHUNK_PIXELS", 2 * 64 * 48)
    blobs = [encode(picture(seed, size=(64, 48) if seed % 2 else (40, 56)), quality=75 + seed) for seed in range(8)]
    slots = [(seed % 2, seed // 2) for seed in range(8)]
    images = torch.zeros(2, 4, 3, 24, 24, dtype=torch.uint8)
    assert decode_jpegs(images, pack_jpegs(slots, blobs), SPEC) == {}
    for (row, col), data in zip(slots, blobs):
        assert torch.equal(images[row, col], full_size_reference(data, 24)), (row, col)


def test_patch_layout_refuses_device_decode(tok, ids, docs):
    with pytest.raises(ValueError, match="data.image_decode"):
        build_train_loader([{"name": "docs", "path": docs["good"], "kind": "interleaved"}], tok, ids, PatchSpec(),
                           template="fuyu", max_seq_tokens=64, max_images=1, micro_batch_size=1, seed=0,
                           image_decode="device")
    with pytest.raises(ValueError, match="data.image_decode"):
        loader(tok, ids, docs["good"], image_decode="gpu")
