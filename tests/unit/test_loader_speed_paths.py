"""The loader's fast paths give what the plain paths give (bench/README.md, loader section).

* tokenizer: `encode_texts` (one backend call per document) == today's per-chunk transformers call,
  on varied text, for a byte-level BPE and a SentencePiece-style (Metaspace) tokenizer, in every
  backend state and on both of its branches;
* images: the simplejpeg accelerator == the Pillow path, pixel for pixel, and the same BadSample
  reason for every broken image; and decode_image == the pipeline it replaced (Pillow draft decode,
  then torch's bicubic on a permute-then-unsqueeze view), bit for bit;
* tar scan: the plain-ustar header parser == tarfile, on every header kind and on damaged shards.
"""

import io
import sys
import tarfile

import numpy as np
import pytest
import simplejpeg  # noqa: F401  (the `test` extra installs it: both decoder paths are exercised)
import torch
import torch.nn.functional as F
from PIL import Image, ImageFile

import mmtrain.data.images as images
import mmtrain.data.stream as stream_mod
import mmtrain.data.tokenizer as tokenizer_mod
from mmtrain.data.documents import build_document, flamingo_labels
from mmtrain.data.episodes import IGNORE_INDEX, encode_text
from mmtrain.data.formats import BadSample
from mmtrain.data.images import ImageSpec, decode_image, jpeg_decoder, set_jpeg_decoder
from mmtrain.data.tokenizer import TokenIds, encode_texts, load_tokenizer

TEXTS = [
    "", " ", "A cat.", " It sleeps on a mat, 42 times!", "<image>", " <image> in text", "<|endofchunk|><image>x",
    "</s><s><pad><unk> specials as text", "<answer>", "naïve café — 日本語 🙂 Ünïcödé", "\n\tspaces   and\n\nnewlines  ",
    "x" * 700, " ".join(f"word{i % 37} {i}" for i in range(300)), "'s 're 've n't I'm", "\x04", "  leading and trailing  ",
]


def _metaspace_tokenizer(out_dir):
    """A SentencePiece-style BPE (Metaspace pre-tokenizer, byte fallback): the LLaMA tokenizers' shape."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    core.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)],
                                  show_progress=False)
    core.train_from_iterator([t for t in TEXTS if t.strip()] * 3, trainer)
    PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module", params=["byte_level", "metaspace"])
def tokenizer_and_ids(request, tok, tmp_path_factory):
    if request.param == "byte_level":
        return tok, TokenIds.from_tokenizer(tok)
    t = load_tokenizer(_metaspace_tokenizer(str(tmp_path_factory.mktemp("metaspace"))))
    return t, TokenIds.from_tokenizer(t)


def _old(t, ids, texts):
    return [encode_text(t, text, ids) for text in texts]


@pytest.mark.parametrize("parallel", ["false", None])
def test_encode_texts_gives_the_ids_of_the_per_chunk_call(tokenizer_and_ids, parallel, monkeypatch):
    t, ids = tokenizer_and_ids
    if parallel is None:
        monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)  # tokenizers' default: the per-piece branch
    else:
        monkeypatch.setenv("TOKENIZERS_PARALLELISM", parallel)
    assert tokenizer_mod._calls_backend_directly(type(t)), "the direct backend path must be the one under test"
    expected = _old(t, ids, TEXTS)
    assert any(len(e) > 100 for e in expected) and expected[0] == []
    assert encode_texts(t, TEXTS, ids) == expected
    assert encode_texts(t, [], ids) == [] and encode_texts(t, ["", ""], ids) == [[], []]
    # A padded, truncated call (the baseline's, an eval's) leaves that state on the backend.
    try:
        t("some text", padding="max_length", truncation=True, max_length=7)
        assert t._tokenizer.padding is not None
        assert encode_texts(t, TEXTS[::-1], ids) == expected[::-1]
        assert _old(t, ids, TEXTS) == expected
    finally:  # the tokenizer is shared by the whole session (the `tok` fixture)
        t._tokenizer.no_padding()
        t._tokenizer.no_truncation()


def test_encode_texts_general_path_and_bad_text(tokenizer_and_ids, monkeypatch):
    t, ids = tokenizer_and_ids
    expected = _old(t, ids, TEXTS)
    monkeypatch.setitem(tokenizer_mod._DIRECT_BACKEND, type(t), False)  # as for a tokenizer that overrides __call__
    assert encode_texts(t, TEXTS, ids) == expected
    monkeypatch.undo()
    with pytest.raises(BadSample) as e:
        encode_texts(t, ["fine", "lone \ud800 surrogate"], ids)
    assert e.value.reason == "bad_record" and "surrogate" in str(e.value)


@pytest.mark.parametrize("template", ["simple", "idefics"])
def test_build_document_ids_are_those_of_per_chunk_encoding(tok, tmp_path, template):
    t = load_tokenizer(tok.name_or_path, template)
    ids = TokenIds.from_tokenizer(t, template)
    parts = [{"text": "Intro <image> text."}, {"image": "0.jpg"}, {"image": "1.jpg"}, {"text": "  "},
             {"text": "After </s> two."}, {"text": "Joined run."}, {"image": "2.jpg"}, {"text": "Tail 🙂."}]
    sample = build_document({"id": "d", "parts": parts}, t, ids, template=template, max_seq_tokens=512, max_images=8)
    # The pre-batching rule, chunk by chunk: blank text dropped, consecutive texts joined by a space.
    kept = [p for p in parts if "image" in p or p["text"].strip()]
    expected, seen_image, previous_text, i = [ids.bos], False, False, 0
    while i < len(kept):
        if "image" in kept[i]:
            run = 1
            while i + run < len(kept) and "image" in kept[i + run]:
                run += 1
            if template == "idefics":
                expected += [ids.fake_image] + [x for _ in range(run) for x in (ids.image, ids.fake_image)]
            else:
                for _ in range(run):
                    expected += ([ids.end_of_chunk] if seen_image else []) + [ids.image]
                    seen_image = True
            i, previous_text = i + run, False
            continue
        expected += encode_text(t, (" " if previous_text else "") + kept[i]["text"], ids)
        i, previous_text = i + 1, True
    expected += [ids.end_of_chunk, ids.eos] if template == "simple" else [ids.eos]
    assert sample.input_ids == expected


def test_flamingo_labels_equal_the_token_by_token_rule(ids):
    def reference(input_ids):  # the rule as a loop over every token (the implementation before list.index)
        labels, trained = [IGNORE_INDEX] * len(input_ids), False
        for i, t in enumerate(input_ids):
            if t == ids.image:
                trained = True
            elif trained:
                labels[i] = t
                if t == ids.end_of_chunk:
                    trained = False
        return labels

    rng = np.random.default_rng(2)
    alphabet = [ids.image, ids.end_of_chunk, ids.bos, ids.eos, 5, 6, 7]
    for _ in range(400):
        seq = [int(x) for x in rng.choice(alphabet, size=int(rng.integers(0, 40)), p=[.15, .15, .05, .05, .2, .2, .2])]
        assert flamingo_labels(seq, ids) == reference(seq), seq


# ------------------------------------------------------------------------------------------ images


def _jpeg(arr, **save):
    out = io.BytesIO()
    Image.fromarray(arr).save(out, format="JPEG", **save)
    return out.getvalue()


def _photo(rng, h, w, gray=False):
    base = rng.integers(0, 256, (max(2, h // 16), max(2, w // 16), 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(base).resize((w, h), Image.Resampling.BICUBIC)).astype(np.int16)
    img = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
    return img[..., 0] if gray else img


def _jpeg_cases():
    rng = np.random.default_rng(3)
    cases = []
    for i, (h, w, size) in enumerate([(384, 512, 224), (385, 513, 224), (1200, 1601, 224), (224, 224, 224), (1, 1, 224),
                                      (97, 301, 64), (480, 640, 30), (300, 200, 448), (2000, 3000, 224)]):
        save = dict(quality=int(rng.integers(60, 98)), subsampling=i % 3, progressive=i % 4 == 1)
        cases.append((f"{w}x{h}->{size} {save}", _jpeg(_photo(rng, h, w, gray=i == 5), **save), size))
    return cases


@pytest.fixture
def decoder():
    """Restore the process's decoder choice after a test that switches it."""
    yield
    set_jpeg_decoder("auto")


def _old_decode_image(data, size):
    """decode_image before the accelerator: Pillow draft decode, torch resize of a permute-then-unsqueeze view."""
    with Image.open(io.BytesIO(data)) as img:
        scale = images._draft_scale(img.size[0], img.size[1], size)
        if scale > 1:
            img.draft("RGB", (img.size[0] // scale, img.size[1] // scale))
        img = img.convert("RGB")
        chw = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(img.size[1], img.size[0], 3).permute(2, 0, 1)
    if chw.shape[1:] != (size, size):
        chw = F.interpolate(chw.unsqueeze(0), size=(size, size), mode="bicubic", antialias=True)[0]
    return chw.contiguous()


def test_simplejpeg_and_pillow_paths_decode_the_same_pixels(decoder):
    ImageFile.MAXBLOCK = max(ImageFile.MAXBLOCK, 1 << 24)  # room to save large progressive test JPEGs
    assert jpeg_decoder().startswith("simplejpeg")
    for name, data, size in _jpeg_cases():
        spec = ImageSpec(size_px=size)
        fast = decode_image(data, spec)
        assert images._decode_jpeg_fast(data, size) is not None, f"{name}: the accelerator was not used"
        set_jpeg_decoder("pillow")
        plain = decode_image(data, spec)
        set_jpeg_decoder("auto")
        assert fast.shape == (3, size, size) and fast.dtype == torch.uint8 and fast.is_contiguous(), name
        assert torch.equal(fast, plain), f"{name}: max diff {(fast.int() - plain.int()).abs().max()}"
        assert torch.equal(fast, _old_decode_image(data, size)), name
    # A camera's MPO (a JPEG followed by more frames): frame 0, at the same reduced scale on both paths.
    rng = np.random.default_rng(4)
    frames = [Image.fromarray(_photo(rng, 384, 512)) for _ in range(2)]
    mpo = io.BytesIO()
    frames[0].save(mpo, format="MPO", save_all=True, append_images=frames[1:])
    fast = decode_image(mpo.getvalue(), ImageSpec(size_px=224))
    set_jpeg_decoder("pillow")
    assert torch.equal(fast, decode_image(mpo.getvalue(), ImageSpec(size_px=224)))


def _cmyk_jpeg():
    out = io.BytesIO()
    Image.new("CMYK", (40, 30), (10, 200, 30, 5)).save(out, format="JPEG")
    return out.getvalue()


def _huge_header_jpeg():
    """A valid small JPEG whose frame header claims 20000x20000 (both decoders read it from the header)."""
    data = bytearray(_jpeg(np.zeros((16, 16, 3), np.uint8)))
    sof = data.index(b"\xff\xc0")
    data[sof + 5: sof + 9] = (20000).to_bytes(2, "big") * 2
    return bytes(data)


def _bad_images():
    good = _jpeg(_photo(np.random.default_rng(1), 120, 160))
    corrupt = bytearray(good)
    corrupt[len(good) // 2: len(good) // 2 + 400] = bytes(400)
    return {
        "empty": b"", "soi only": b"\xff\xd8", "garbage after soi": b"\xff\xd8\xff\xe0 truncated jpeg",
        "truncated": good[: len(good) // 2], "no end marker": good[:-2], "corrupt scan data": bytes(corrupt),
        "not an image": b"GIF89a nope", "huge": _huge_header_jpeg(), "cmyk (Pillow converts)": _cmyk_jpeg(),
    }


def test_broken_images_get_the_same_reason_on_both_paths(decoder):
    outcomes = {}
    for choice in ("simplejpeg", "pillow"):
        set_jpeg_decoder(choice)
        for name, data in _bad_images().items():
            try:
                outcomes.setdefault(name, []).append(decode_image(data, ImageSpec(size_px=32)))
            except BadSample as e:
                outcomes.setdefault(name, []).append(e.reason)
    for name, (fast, plain) in outcomes.items():
        if isinstance(fast, torch.Tensor) or isinstance(plain, torch.Tensor):
            assert isinstance(fast, torch.Tensor) and isinstance(plain, torch.Tensor) and torch.equal(fast, plain), name
        else:
            assert fast == plain, f"{name}: simplejpeg path says {fast}, Pillow path {plain}"
    assert outcomes["huge"] == ["image_too_large"] * 2
    assert outcomes["truncated"] == ["bad_image"] * 2 and outcomes["empty"] == ["bad_image"] * 2
    assert isinstance(outcomes["cmyk (Pillow converts)"][0], torch.Tensor)


def test_decoder_choice(decoder, monkeypatch):
    assert set_jpeg_decoder("pillow").startswith("Pillow") and images._simplejpeg is None
    assert set_jpeg_decoder("auto").startswith("simplejpeg")
    with pytest.raises(ValueError, match="MMTRAIN_JPEG_DECODER"):
        set_jpeg_decoder("turbo")
    monkeypatch.setitem(sys.modules, "simplejpeg", None)  # as where the wheel is not installed
    assert set_jpeg_decoder("auto").startswith("Pillow")
    with pytest.raises(ImportError, match="fast-jpeg"):
        set_jpeg_decoder("simplejpeg")


# ------------------------------------------------------------------------------------------ tar scan


def _tar(path, members, fmt, dirs=()):
    with tarfile.open(path, "w", format=fmt) as tar:
        for name in dirs:
            info = tarfile.TarInfo(name)
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def _members(rng, n, names=None):
    out = []
    for i in range(n):
        key = names[i] if names else f"dir/k{i:04d}"
        for ext in ("json", "0.jpg"):
            out.append((f"{key}.{ext}", bytes(rng.integers(0, 256, int(rng.integers(0, 1500)), dtype=np.uint8))))
    return out


def _tar_variants(tmp_path):
    rng = np.random.default_rng(5)
    long_key = "a" * 120  # over ustar's 100-byte name: a prefix (ustar), a pax or a GNU long-name header
    mixed = [f"k{i:04d}" for i in range(6)] + [long_key, "ünïcode", "k9999"]
    return {
        "ustar": _tar(tmp_path / "ustar.tar", _members(rng, 30), tarfile.USTAR_FORMAT, dirs=["dir/"]),
        "gnu": _tar(tmp_path / "gnu.tar", _members(rng, 9, mixed), tarfile.GNU_FORMAT),
        "pax": _tar(tmp_path / "pax.tar", _members(rng, 9, mixed), tarfile.PAX_FORMAT),
        "ustar prefix": _tar(tmp_path / "prefix.tar", _members(rng, 3, ["k0", "p" * 90 + "/" + "q" * 30, "k2"]),
                             tarfile.USTAR_FORMAT),
    }


def _scan(path):
    return [(r.key, r.members, r.error) for r in stream_mod.scan_shard(path)]


def _scan_tarfile(path):
    return [(r.key, r.members, r.error) for r in stream_mod._scan_with_tarfile(path)]


def test_tar_scan_equals_tarfile_on_every_header_kind(tmp_path):
    for name, path in _tar_variants(tmp_path).items():
        expected = _scan_tarfile(path)
        assert len(expected) >= 3 and all(e == "" for _, _, e in expected), name
        assert _scan(path) == expected, name
    assert len(list(stream_mod._scan_plain_ustar(_tar_variants(tmp_path)["ustar"]))) == 30  # no hand-over there


def test_tar_scan_equals_tarfile_on_damaged_shards(tmp_path):
    """Cut and corrupted shards: the plain scanner, handing over to tarfile wherever it must, reads
    exactly what tarfile reads (refs, members, offsets, `truncated` and `bad_shard`)."""
    rng = np.random.default_rng(11)
    sources = _tar_variants(tmp_path)
    outcomes = set()
    for i in range(160):
        name = list(sources)[i % len(sources)]
        data = bytearray(open(sources[name], "rb").read())
        how = i % 4
        if how == 0:  # cut anywhere, headers and padding included
            data = data[: int(rng.integers(0, len(data)))]
        elif how == 1:  # cut at a block boundary
            data = data[: 512 * int(rng.integers(0, len(data) // 512))]
        elif how == 2:  # flip bytes (checksums, number fields, names, data)
            for pos in rng.integers(0, len(data), int(rng.integers(1, 4))):
                data[pos] = int(rng.integers(0, 256))
        else:  # a zeroed block: an early end of the archive when it is a header
            pos = 512 * int(rng.integers(0, len(data) // 512))
            data[pos: pos + 512] = bytes(512)
        path = tmp_path / f"damaged{i}.tar"
        path.write_bytes(bytes(data))
        expected = _scan_tarfile(str(path))
        assert _scan(str(path)) == expected, f"variant {i} ({name}, damage {how})"
        outcomes.update(e for _, _, e in expected)
    assert {"", "truncated", "bad_shard"} <= outcomes  # every kind of reading was compared


def test_without_torchs_uint8_kernel_pillow_resizes_on_both_paths(decoder, monkeypatch):
    _, data, size = _jpeg_cases()[0]
    with_torch = decode_image(data, ImageSpec(size_px=size))
    monkeypatch.setattr(images, "_TORCH_RESIZE", False)  # as on ARM or pre-AVX2 x86
    fast = decode_image(data, ImageSpec(size_px=size))
    set_jpeg_decoder("pillow")
    plain = decode_image(data, ImageSpec(size_px=size))
    assert torch.equal(fast, plain) and fast.shape == (3, size, size) and fast.is_contiguous()
    assert (fast.int() - with_torch.int()).abs().float().mean() < 1.0  # torch's kernel is a port of Pillow-SIMD's
