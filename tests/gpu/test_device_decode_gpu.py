"""data.image_decode=device on CUDA: nvJPEG (torchvision.io.decode_jpeg) decodes what the workers
pass on, and the batches match the workers' own decoding (tests/unit/test_device_decode.py runs the
same plumbing on CPU)."""

import pytest
import torch
from jpeg_samples import (
    encode,
    full_size_reference,
    picture,
    segments,
    with_unknown_scan_component,
    without_quant_tables,
    write_docs,
)

from mmtrain.data.device_decode import decode_jpegs, jpeg_for_device, pack_jpegs
from mmtrain.data.images import ImageSpec, decode_image
from mmtrain.data.stream import build_train_loader

pytestmark = pytest.mark.gpu
SPEC = ImageSpec(size_px=224)
CUDA = torch.device("cuda")


def test_every_kind_the_header_check_passes_decodes_on_the_gpu():
    big = picture(1, size=(512, 384))
    kinds = {
        "baseline q90": encode(big, quality=90),
        "baseline q75, 4:2:0": encode(big, quality=75, subsampling=2),
        "4:4:4": encode(big, quality=90, subsampling=0),
        "progressive": encode(big, quality=90, progressive=True),
        "grayscale": encode(big, mode="L"),
        "small (upscaled)": encode(picture(2, size=(100, 80)), quality=90),
        "padded after EOI": encode(big, quality=90) + b"\0" * 20,
    }
    assert all(jpeg_for_device(data) for data in kinds.values())
    images = torch.zeros(1, len(kinds), 3, 224, 224, dtype=torch.uint8, device=CUDA)
    failed = decode_jpegs(images, pack_jpegs([(0, j) for j in range(len(kinds))], list(kinds.values())), SPEC)
    assert not failed
    # Against the same computation on the CPU (libjpeg's full decode, same resize): equal where no
    # chroma was subsampled; with 4:2:0 chroma nvJPEG's upsampling (not libjpeg's "fancy" one) costs
    # about a level, more where the image is enlarged. Against the workers' DCT scale-down: 1.5-3.
    to_reference, to_workers = {}, {}
    for j, (name, data) in enumerate(kinds.items()):
        got = images[0, j].cpu().float()
        to_reference[name] = round(float((got - full_size_reference(data, 224).float()).abs().mean()), 3)
        to_workers[name] = round(float((got - decode_image(data, SPEC).float()).abs().mean()), 3)
    print("mean |device - reference|, levels:", to_reference, "\nmean |device - workers|, levels:", to_workers)
    full_chroma = ("4:4:4", "grayscale")
    assert all(to_reference[name] < 0.05 for name in full_chroma), to_reference
    # Measured on an H100: 0.81-0.90 shrinking to 224, 1.94 for the 100x80 image grown 2.8x.
    assert all(d < (2.5 if name.startswith("small") else 1.0) for name, d in to_reference.items()), to_reference
    assert all(d < 4.0 for d in to_workers.values()), to_workers


def test_damaged_jpegs_stay_off_the_device_and_entropy_damage_does_not_spoil_the_batch():
    good = encode(picture(3, size=(512, 384)), quality=90)
    # nvJPEG's batched decode returns a wrong picture, and no error, for these: the check stops them.
    assert not jpeg_for_device(without_quant_tables(good)) and not jpeg_for_device(with_unknown_scan_component(good))
    (scan,) = [pos for marker, pos, _ in segments(good) if marker == 0xDA]
    cut = good[:scan + (len(good) - scan) // 2] + b"\xff\xd9"  # a scan cut short, then an end marker
    assert jpeg_for_device(cut)
    images = torch.zeros(1, 3, 3, 224, 224, dtype=torch.uint8, device=CUDA)
    decode_jpegs(images, pack_jpegs([(0, 0), (0, 1), (0, 2)], [good, cut, good]), SPEC)
    assert torch.equal(images[0, 0], images[0, 2])
    assert (images[0, 0].cpu().float() - full_size_reference(good, 224).float()).abs().mean() < 1.0


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_batches_match_the_workers_decoding(tok, ids, tmp_path, num_workers):
    path = write_docs(tmp_path / "docs", 16)
    common = dict(template="simple", max_seq_tokens=256, max_images=6, micro_batch_size=2, seed=3,
                  num_workers=num_workers, shuffle_buffer_samples=8, packing=True)
    source = [{"name": "docs", "path": path, "kind": "interleaved"}]
    spec = ImageSpec(size_px=24)
    batches = {}
    for mode in ("workers", "device"):
        lo = build_train_loader(source, tok, ids, spec, image_decode=mode, **common)
        it = iter(lo)
        batches[mode] = [next(it) for _ in range(5)]
        lo.close()
    for a, b in zip(batches["workers"], batches["device"]):
        assert a["meta"]["sample_ids"] == b["meta"]["sample_ids"] and torch.equal(a["input_ids"], b["input_ids"])
        assert b["images"].is_cuda and b["images"].shape == a["images"].shape
        assert (a["images"].float() - b["images"].cpu().float()).abs().mean() < 3.0
