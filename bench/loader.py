"""Loader throughput per CPU core: interleaved documents with 224-px images, mmtrain vs a plain baseline.

    python3 -m bench.loader                       # writes bench/results/loader_<cpu>.json
    python3 -m bench.loader --out bench/results/loader_h100host.json

What counts as a sample: one interleaved document (kind `interleaved`) made into training input,
that is its tar members read, its JSON parsed, its text tokenized with the media tokens, its
images decoded and resized to 224 px, and the document packed into a micro-batch. A document holds
`--images-per-doc` K images (512x384 q90 JPEGs, ~0.2 MP, ~50 kB) and 100-200 words of text per
image around them. Throughput is documents per second of ONE process pinned to ONE core
(`os.sched_setaffinity`, `torch.set_num_threads(1)`), so it reads as "per CPU core".

Both paths run in the same process, on the same core and the same shards, in alternating timed
rounds (so background load hits both alike); each reports the median over rounds of samples per
wall second, and also samples per second of the process's own CPU time (robust on a shared host).

* mmtrain: `mmtrain.data.stream.build_train_loader(..., num_workers=0, packing=True,
  template="simple", max_seq_tokens=2048)`; samples counted from `batch["meta"]["sample_ids"]`.
  JPEGs go through simplejpeg where it is installed, else Pillow (`mmtrain.jpeg_decoder` in the JSON).
* baseline, the way OpenFlamingo's MMC4 pipeline does it: `webdataset.WebDataset(urls)` -> json
  decode -> per image `PIL.Image.open(...).convert("RGB")` and open_clip's
  `image_transform(224, is_train=False)` (Resize 224 bicubic, CenterCrop, ToTensor, Normalize) ->
  the text with `<|endofchunk|><image>` inserted, tokenized by the HF tokenizer's `__call__` with
  `padding="max_length", truncation=True` (OpenFlamingo's `preprocess_interleaved`) -> batches by
  `torch.stack`. It does not pad every sample to 6 images as OpenFlamingo does (that would only
  make the baseline slower). Without webdataset or open_clip installed (a bare GPU node) it uses a
  tarfile reader and the same transform built from torchvision; the JSON says which.

The headline is K=1 with q90 JPEGs. Extra rows, each labelled by its `variant`: other K
(--extra-images-per-doc), the same pictures at other JPEG qualities (--extra-jpeg-quality, 75: a
typical web quality), mmtrain alone with a forced JPEG decoder (--extra-decoders pillow), and,
where CUDA is available, the JPEGs decoded on the GPU (--extra-image-decode device,
`data.image_decode: device`): the pinned core then reads, tokenizes and packs, checks each JPEG's
header and drives the GPU's batched nvJPEG decode and resize, each batch counted once synchronised.

The data (shards, a tokenizer) is generated once into --data-dir and reused. No network.
The tokenizer is mmtrain's tiny byte-level BPE trained on the generated text with a 4096 vocab (no
LLaMA tokenizer can be had offline); the JSON names it.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import functools
import io
import json
import os
import platform
import pstats
import re
import shlex
import socket
import statistics
import sys
import tarfile
import time
from typing import Any, Dict, Iterator, List, Optional, Tuple

GEN_VERSION = 1
IMAGE_W, IMAGE_H, JPEG_QUALITY = 512, 384, 90
WORDS_PER_IMAGE = (100, 200)
OF_MAX_TOKENS = 256  # OpenFlamingo's MMC4 default max_tokens
_COMMON = (
    "the of and a to in is was it for on that with as by at from his her they this are be an or had "
    "which one were but not their have all new more first two can into after its there other some "
    "when time than also many over years these people made so would only may most such city where "
    "while during about world state through between small water under three white black image photo "
    "shows picture house road river light dark red green blue old young man woman child day night"
).split()


# ------------------------------------------------------------------------------------------ data


def _make_jpeg(index: int, quality: int = JPEG_QUALITY) -> bytes:
    """One 512x384 JPEG (q90 unless asked) with photo-like statistics: smooth colour field, shapes, edges, noise."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng([GEN_VERSION, 7, index])
    w, h = IMAGE_W, IMAGE_H
    field = rng.integers(0, 256, (int(rng.integers(3, 7)), int(rng.integers(3, 7)), 3), dtype=np.uint8)
    img = Image.fromarray(field).resize((w, h), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(6, 16))):
        x0, y0, s = int(rng.integers(-40, w)), int(rng.integers(-40, h)), int(rng.integers(15, 180))
        box = [x0, y0, x0 + s, y0 + int(s * rng.uniform(0.4, 1.6))]
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        kind = rng.integers(3)
        if kind == 0:
            draw.ellipse(box, fill=color)
        elif kind == 1:
            draw.rectangle(box, fill=color)
        else:
            draw.line(box, fill=color, width=int(rng.integers(1, 8)))
    img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.6, 1.4))))
    pixels = np.asarray(img, dtype=np.int16) + rng.normal(0, rng.uniform(5.5, 8.0), (h, w, 3)).astype(np.int16)
    out = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, format="JPEG", quality=quality)
    return out.getvalue()


def _vocabulary(rng) -> Tuple[List[str], Any]:
    import numpy as np

    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ai", "ou", "er", "an", "in")]
    words = list(_COMMON)
    seen = set(words)
    while len(words) < 6000:
        word = "".join(rng.choice(syllables) for _ in range(int(rng.integers(1, 4))))
        if word not in seen:
            seen.add(word)
            words.append(word)
    ranks = rng.permutation(len(words) - len(_COMMON)) + len(_COMMON)
    order = list(range(len(_COMMON))) + list(ranks)
    weights = 1.0 / (1.0 + np.arange(len(words)))  # Zipf
    return [words[i] for i in order], weights / weights.sum()


def _text(rng, vocab, probs, num_words: int) -> str:
    out, sentence = [], []
    for word in rng.choice(vocab, size=num_words, p=probs):
        if not sentence:
            word = word.capitalize()
        elif rng.random() < 0.03:
            word = str(int(rng.integers(1, 2030)))
        sentence.append(str(word))
        if len(sentence) >= 6 and rng.random() < 0.09:
            out.append(" ".join(sentence) + ".")
            sentence = []
        elif len(sentence) > 2 and rng.random() < 0.05:
            sentence[-1] += ","
    if sentence:
        out.append(" ".join(sentence) + ".")
    return " ".join(out)


def _doc_parts(rng, vocab, probs, images: List[str]) -> List[Dict[str, str]]:
    """MMC4-like: text, then each image in front of the text it matches (converters merge runs)."""
    parts: List[Dict[str, str]] = []
    for i, name in enumerate(images):
        words = int(rng.integers(WORDS_PER_IMAGE[0], WORDS_PER_IMAGE[1] + 1))
        before = int(words * rng.uniform(0.2, 0.6)) if i == 0 else 0
        if before:
            parts.append({"text": _text(rng, vocab, probs, before)})
        parts.append({"image": name})
        parts.append({"text": _text(rng, vocab, probs, words - before)})
    return parts


def _pool_map(fn, items, workers: int):
    if workers <= 1:
        return [fn(i) for i in items]
    import multiprocessing as mp

    with mp.get_context("fork").Pool(workers) as pool:
        return pool.map(fn, items, chunksize=16)


def prepare_data(data_dir: str, images_per_doc: int, num_docs: int, num_shards: int, workers: int,
                 jpeg_quality: int = JPEG_QUALITY) -> Dict[str, Any]:
    """Shards of interleaved documents under data_dir (generated once, then reused). Another JPEG
    quality gives the same pictures and text, only encoded at that quality."""
    import numpy as np

    from mmtrain.data.formats import ShardWriter

    params = {"gen_version": GEN_VERSION, "images_per_doc": images_per_doc, "num_docs": num_docs,
              "num_shards": num_shards, "image": [IMAGE_W, IMAGE_H, jpeg_quality], "words_per_image": WORDS_PER_IMAGE}
    quality_tag = "" if jpeg_quality == JPEG_QUALITY else f"_q{jpeg_quality}"
    out = os.path.join(data_dir, f"interleaved_k{images_per_doc}_n{num_docs}_s{num_shards}_g{GEN_VERSION}{quality_tag}")
    stamp = os.path.join(out, "bench_params.json")
    if os.path.isfile(stamp):
        with open(stamp) as f:
            info = json.load(f)
        if info.get("params") == json.loads(json.dumps(params)):
            return info
    t0 = time.time()
    num_images = num_docs * images_per_doc
    print(f"generating {num_docs} documents with {num_images} images into {out} ...", flush=True)
    jpegs = _pool_map(functools.partial(_make_jpeg, quality=jpeg_quality), range(num_images), workers)
    rng = np.random.default_rng([GEN_VERSION, 11, images_per_doc])
    vocab, probs = _vocabulary(rng)
    per_shard = -(-num_docs // num_shards)
    text_chars = 0
    with ShardWriter(out, kind="interleaved", max_samples=per_shard, max_bytes=1 << 40) as writer:
        for d in range(num_docs):
            names = [f"{i}.jpg" for i in range(images_per_doc)]
            parts = _doc_parts(rng, vocab, probs, names)
            text_chars += sum(len(p.get("text", "")) for p in parts)
            record = {"id": f"bench-{d:07d}", "source": "bench", "parts": parts}
            members = {"json": json.dumps(record).encode()}
            for i, name in enumerate(names):
                members[name] = jpegs[d * images_per_doc + i]
            writer.write(f"doc{d:07d}", members)
    sizes = [len(j) for j in jpegs]
    info = {"params": params, "path": out, "num_images": num_images, "image_bytes_mean": float(np.mean(sizes)),
            "image_bytes_min": int(min(sizes)), "image_bytes_max": int(max(sizes)),
            "text_chars_per_doc_mean": text_chars / num_docs, "generate_s": round(time.time() - t0, 1)}
    with open(stamp, "w") as f:
        json.dump(info, f, indent=1)
    return info


def prepare_tokenizer(data_dir: str, vocab_size: int) -> str:
    """mmtrain's tiny byte-level BPE, trained on text drawn like the documents' text."""
    import numpy as np

    from mmtrain.data.tokenizer import train_tiny_tokenizer

    out = os.path.join(data_dir, f"tokenizer_bpe{vocab_size}_g{GEN_VERSION}")
    if os.path.isfile(os.path.join(out, "tokenizer.json")):
        return out
    rng = np.random.default_rng([GEN_VERSION, 13])
    vocab, probs = _vocabulary(np.random.default_rng([GEN_VERSION, 11, 1]))
    texts = [_text(rng, vocab, probs, 150) for _ in range(3000)]
    train_tiny_tokenizer(out, texts=texts, vocab_size=vocab_size)
    return out


# -------------------------------------------------------------------------------------- baseline


def _open_clip_transform(plain: bool = False):
    """open_clip's eval transform (what OpenFlamingo uses), or the same thing from torchvision."""
    try:
        if plain:
            raise ImportError("--baseline-without-extras")
        import open_clip

        return open_clip.image_transform(224, is_train=False), f"open_clip {open_clip.__version__} image_transform(224, is_train=False)"
    except Exception:  # not installed (bare GPU node) or broken deps
        from torchvision import transforms as T

        from mmtrain.data.images import CLIP_MEAN, CLIP_STD

        tf = T.Compose([T.Resize(224, interpolation=T.InterpolationMode.BICUBIC, antialias=True), T.CenterCrop(224),
                        T.Lambda(lambda im: im.convert("RGB") if im.mode != "RGB" else im), T.ToTensor(),
                        T.Normalize(CLIP_MEAN, CLIP_STD)])
        return tf, "torchvision Compose equal to open_clip image_transform(224, is_train=False) (open_clip not used)"


def _tar_samples(urls: List[str]) -> Iterator[Dict[str, Any]]:
    """webdataset's tar grouping (key = path up to the first '.' of the base name), streaming."""
    for url in urls:
        with tarfile.open(url, mode="r|*") as tar:
            current: Optional[Dict[str, Any]] = None
            for info in tar:
                if not info.isfile():
                    continue
                base = info.name.rsplit("/", 1)[-1]
                dot = base.find(".")
                key, ext = info.name[: len(info.name) - len(base) + dot], base[dot + 1:]
                data = tar.extractfile(info).read()
                if current is None or current["__key__"] != key:
                    if current is not None:
                        yield current
                    current = {"__key__": key, "__url__": url}
                current[ext] = data
            if current is not None:
                yield current


class Baseline:
    """OpenFlamingo-style pipeline (see the module docstring), looping over the shards forever."""

    def __init__(self, urls: List[str], tokenizer, batch_size: int, max_tokens: int, plain: bool = False):
        self.urls, self.tokenizer, self.batch_size, self.max_tokens = urls, tokenizer, batch_size, max_tokens
        self.transform, self.transform_name = _open_clip_transform(plain)
        self.media_id = tokenizer.convert_tokens_to_ids("<image>")
        try:
            if plain:
                raise ImportError("--baseline-without-extras")
            import webdataset as wds

            self.wds = wds
            self.reader = f"webdataset {getattr(wds, '__version__', '?')} WebDataset(urls).map(preprocess).batched(B)"
        except Exception:
            self.wds = None
            self.reader = "tarfile streaming reader with webdataset's grouping (webdataset not used)"

    def preprocess(self, sample: Dict[str, Any]):
        import torch
        from PIL import Image

        info = json.loads(sample["json"])
        sentences, images, pending = [], [], False
        for part in info["parts"]:
            if "image" in part:
                images.append(Image.open(io.BytesIO(sample[part["image"]])).convert("RGB"))
                pending = True
            else:
                sentences.append(f"<|endofchunk|><image>{part['text']}" if pending else part["text"])
                pending = False
        images_tensors = torch.cat([self.transform(im).unsqueeze(0) for im in images], dim=0)
        # preprocess_interleaved's text handling, verbatim in spirit.
        text = " ".join(sentences)
        text = text.replace("<|endofchunk|>", "", 1)
        text = text.replace(" <|endofchunk|>", "<|endofchunk|>").replace("<image> ", "<image>").replace(" <image>", "<image>")
        text = f"{text}<|endofchunk|>{self.tokenizer.eos_token}"
        self.tokenizer.padding_side = "right"
        text_tensor = self.tokenizer(text, max_length=self.max_tokens, truncation=True, padding="max_length",
                                     return_tensors="pt")
        num_images = torch.count_nonzero(text_tensor["input_ids"] == self.media_id)  # OF rejects docs with too few
        return images_tensors, text_tensor["input_ids"][0], text_tensor["attention_mask"][0], int(num_images)

    def _batches_once(self) -> Iterator[Tuple[Any, ...]]:
        import torch

        if self.wds is not None:
            yield from self.wds.WebDataset(self.urls, shardshuffle=False, empty_check=False).map(self.preprocess).batched(
                self.batch_size, partial=False)
            return
        buf = []
        for sample in _tar_samples(self.urls):
            buf.append(self.preprocess(sample))
            if len(buf) == self.batch_size:
                yield tuple(torch.stack(list(x)) if isinstance(x[0], torch.Tensor) else list(x) for x in zip(*buf))
                buf = []

    def __iter__(self):
        while True:
            yield from self._batches_once()


# --------------------------------------------------------------------------------------- timing


def _timed(it: Iterator, count, min_samples: int) -> Tuple[int, float, float, Dict[str, float]]:
    """Pull batches until >= min_samples samples; (samples, wall s, cpu s, extra sums)."""
    samples, extra = 0, {}
    w0, c0 = time.perf_counter(), time.process_time()
    while samples < min_samples:
        n, e = count(next(it))
        samples += n
        for k, v in e.items():
            extra[k] = extra.get(k, 0.0) + v
    return samples, time.perf_counter() - w0, time.process_time() - c0, extra


def _mmtrain_count(batch) -> Tuple[int, Dict[str, float]]:
    if batch["images"].is_cuda:  # image_decode=device: a batch counts once its pixels are there
        import torch

        torch.cuda.synchronize()
    n = len(batch["meta"]["sample_ids"])
    return n, {"tokens": float(batch["attention_mask"].sum()), "images": float(batch["num_images"].sum()),
               "rows": float(batch["input_ids"].shape[0]), "slots": float(batch["attention_mask"].numel())}


def _baseline_count(batch) -> Tuple[int, Dict[str, float]]:
    images = batch[0]
    return int(images.shape[0]), {"images": float(images.shape[0] * images.shape[1])}


def _summary(rounds: List[Tuple[int, float, float, Dict[str, float]]]) -> Dict[str, Any]:
    wall = [n / w for n, w, _, _ in rounds]
    cpu = [n / c for n, _, c, _ in rounds if c > 0]
    n_total = sum(r[0] for r in rounds)
    images = sum(r[3].get("images", 0.0) for r in rounds)
    return {
        "samples_per_s": statistics.median(wall),
        "samples_per_cpu_s": statistics.median(cpu) if cpu else None,
        "rounds_samples_per_s": [round(x, 1) for x in wall],
        "rounds_samples_per_cpu_s": [round(x, 1) for x in cpu],
        "cpu_busy_fraction": sum(r[2] for r in rounds) / sum(r[1] for r in rounds),
        "samples_timed": n_total,
        "images_per_sample": images / n_total,
    }


def _profile(it: Iterator, count, samples: int, top: int) -> str:
    prof = cProfile.Profile()
    prof.enable()
    _timed(it, count, samples)
    prof.disable()
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out).sort_stats("tottime")
    stats.print_stats(top)
    out.write("\n---- cumulative ----\n")
    stats.sort_stats("cumulative").print_stats(top)
    return out.getvalue()


def _num_docs(args, images_per_doc: int) -> int:
    return max(args.shards, args.docs // images_per_doc)


class _Stages:
    """Wall time per pipeline stage of the mmtrain path, by wrapping the functions stream.py calls.

    The loader runs in this process (num_workers=0) and looks these names up at call time, so the
    wrappers see every call; nested stages (tokenize inside build_document) are reported inside.
    """

    def __init__(self):
        import mmtrain.data.documents as documents
        import mmtrain.data.images as images
        import mmtrain.data.stream as stream

        self.spent: Dict[str, float] = {}
        self._undo: List[Tuple[Any, str, Any]] = []
        targets = [
            (stream, "decode_image", "decode_image (decode + resize)"),
            (images, "_decode_jpeg_fast", "  of which JPEG decode, simplejpeg (1/2 scale)"),
            (images, "_decode_with_pillow", "  of which Pillow decode (where simplejpeg is not used)"),
            (images, "_to_chw", "  of which resize to 224 + CHW layout (_to_chw)"),
            (stream, "build_document", "build_document (validate, tokenize, labels)"),
            (documents, "encode_texts", "  of which tokenizer calls (encode_texts)"),
            (stream, "_parse_record", "json parse"),
            (stream._FileCache, "read", "tar member reads"),
            (stream._SourceStream, "next_ref", "tar header scan + shuffle buffer (next_ref)"),
            (stream.Packer, "batch", "collate (Packer.batch)"),
            (stream, "packing_stats", "packing_stats"),
            (stream._WorkerStream, "cursor", "cursor snapshot per batch"),
            (stream.TrainLoader, "_hand_out", "hand-out per batch: loader state copy (+ device decode) (_hand_out)"),
            (stream, "decode_jpegs", "  of which JPEG decode + resize on the device (host side; waiting for the GPU is under other)"),
        ]
        for owner, name, label in targets:
            self._wrap(owner, name, label)

    def _wrap(self, owner, name: str, label: str) -> None:
        original = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
        spent = self.spent
        spent[label] = 0.0
        clock = time.perf_counter

        def wrapper(*a, **k):
            t0 = clock()
            try:
                return original(*a, **k)
            finally:
                spent[label] += clock() - t0

        setattr(owner, name, wrapper)
        self._undo.append((owner, name, original))

    def restore(self) -> None:
        for owner, name, original in reversed(self._undo):
            setattr(owner, name, original)


def stage_breakdown(it: Iterator, samples: int) -> Dict[str, float]:
    """ms per sample in each stage over one more round (the wrappers add ~1 us per call)."""
    stages = _Stages()
    try:
        n, wall, _, _ = _timed(it, _mmtrain_count, samples)
    finally:
        stages.restore()
    out = {"total": round(wall / n * 1e3, 4)}
    out.update({k: round(v / n * 1e3, 4) for k, v in stages.spent.items()})
    top = [k for k in stages.spent if not k.startswith(" ")]
    out["other (loop, sample bookkeeping, Packer.offer, ...)"] = round((wall - sum(stages.spent[k] for k in top)) / n * 1e3, 4)
    return out


def image_micro(shard: str, reps: int = 6, plain: bool = False) -> Dict[str, Any]:
    """Per-image cost of the image step alone (CPU time, pinned core), on the shard's first 48 JPEGs."""
    from PIL import Image

    from mmtrain.data import images
    from mmtrain.data.images import ImageSpec, decode_image

    jpegs: List[bytes] = []
    with tarfile.open(shard) as tar:
        for info in tar:
            if info.name.endswith(".jpg") and len(jpegs) < 48:
                jpegs.append(tar.extractfile(info).read())
    spec = ImageSpec(size_px=224)
    transform, _ = _open_clip_transform(plain)

    def pil_full_bicubic(data):  # what decode_image did for a 512x384 JPEG before reduced-size decoding
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return img.resize((224, 224), Image.Resampling.BICUBIC).tobytes()

    def pil_draft_only(data):  # the floor: the 1/2-scale decode alone
        with Image.open(io.BytesIO(data)) as img:
            img.draft("RGB", (img.size[0] // 2, img.size[1] // 2))
            img.load()

    def pillow_decoder(data):  # decode_image as it runs without simplejpeg
        return images._to_chw(images._decode_with_pillow(data, 224), 224)

    half = {data: images._decode_with_pillow(data, 224) for data in jpegs}  # 256x192 arrays, for the resize alone

    variants = {
        "mmtrain_decode_image": lambda data: decode_image(data, spec),
        "mmtrain_decode_image_pillow_decoder": pillow_decoder,
        "pil_full_decode_bicubic": pil_full_bicubic,
        "pil_half_scale_decode_only": pil_draft_only,
        "resize_only_256x192_to_224": lambda data: images._to_chw(half[data], 224),
        "baseline_pil_open_clip_transform": lambda data: transform(Image.open(io.BytesIO(data)).convert("RGB")),
    }
    try:
        import simplejpeg

        def scaled(factor):  # libjpeg-turbo decoding alone, at 1/factor of each side
            return lambda data: simplejpeg.decode_jpeg(data, "RGB", min_height=IMAGE_H // factor,
                                                       min_width=IMAGE_W // factor, min_factor=factor)

        variants["simplejpeg_half_scale_decode_only"] = scaled(2)
        # At 1/8 only DC coefficients are transformed; all the Huffman decoding is still done: its floor.
        variants["simplejpeg_eighth_scale_decode_only_huffman_floor"] = scaled(8)
    except ImportError:
        pass
    spent = {k: 0.0 for k in variants}
    for fn in variants.values():
        for data in jpegs[:4]:
            fn(data)
    for _ in range(reps):  # interleaved, so background load hits every variant alike
        for name, fn in variants.items():
            t0 = time.process_time()
            for data in jpegs:
                fn(data)
            spent[name] += time.process_time() - t0
    return {f"{k}_per_cpu_s": round(reps * len(jpegs) / v, 1) for k, v in spent.items()}


def device_decode_micro(shard: str, device, reps: int = 20) -> Dict[str, Any]:
    """The device decode alone (data.image_decode=device): the shard's first 48 JPEGs as one batch,
    decoded and resized into a [1, 48, 3, 224, 224] tensor, per wall and per CPU second."""
    import torch

    from mmtrain.data.device_decode import decode_jpegs, pack_jpegs
    from mmtrain.data.images import ImageSpec

    jpegs: List[bytes] = []
    with tarfile.open(shard) as tar:
        for info in tar:
            if info.name.endswith(".jpg") and len(jpegs) < 48:
                jpegs.append(tar.extractfile(info).read())
    packed = pack_jpegs([(0, j) for j in range(len(jpegs))], jpegs)
    images = torch.zeros(1, len(jpegs), 3, 224, 224, dtype=torch.uint8, device=device)
    spec = ImageSpec(size_px=224)
    cuda = images.is_cuda
    for _ in range(3):
        decode_jpegs(images, packed, spec)
    if cuda:
        torch.cuda.synchronize(device)
    w0, c0 = time.perf_counter(), time.process_time()
    for _ in range(reps):
        decode_jpegs(images, packed, spec)
    if cuda:
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    n = reps * len(jpegs)
    return {"images_per_s": round(n / wall, 1), "images_per_cpu_s": round(n / cpu, 1), "batch_images": len(jpegs),
            "device": torch.cuda.get_device_name(device) if cuda else "cpu"}


def measure(args, config: Dict[str, Any], tokenizer, token_ids) -> Dict[str, Any]:
    """One entry: `config` has images_per_doc, jpeg_quality, decoder (set_jpeg_decoder), image_decode,
    baseline, variant."""
    from mmtrain.data import images
    from mmtrain.data.formats import read_manifest
    from mmtrain.data.images import ImageSpec
    from mmtrain.data.stream import build_train_loader

    images_per_doc, jpeg_quality = config["images_per_doc"], config["jpeg_quality"]
    with_baseline = config["baseline"] and not args.no_baseline
    data = prepare_data(args.data_dir, images_per_doc, _num_docs(args, images_per_doc), args.shards, args.gen_workers,
                        jpeg_quality)
    decoder = images.set_jpeg_decoder(config["decoder"])
    path = data["path"]
    manifest = read_manifest(path)
    urls = [os.path.join(path, s["name"]) for s in manifest["shards"]]
    loader = build_train_loader(
        [{"name": "bench", "path": path, "kind": "interleaved"}], tokenizer, token_ids, ImageSpec(size_px=224),
        template="simple", max_seq_tokens=args.max_seq_tokens, max_images=args.max_images,
        micro_batch_size=args.micro_batch_size, seed=0, num_workers=0, packing=True,
        shuffle_buffer_samples=args.shuffle_buffer, image_decode=config["image_decode"],
    )
    ours = iter(loader)
    baseline = Baseline(urls, tokenizer, args.baseline_batch_size, OF_MAX_TOKENS * images_per_doc,
                        plain=args.baseline_without_extras)
    base = iter(baseline)
    samples = args.samples
    _timed(ours, _mmtrain_count, max(64, samples // 5))  # warm-up: buffers filled, first shards read, caches hot
    if with_baseline:
        _timed(base, _baseline_count, max(32, samples // 10))
    ours_rounds, base_rounds = [], []
    for r in range(args.rounds):
        ours_rounds.append(_timed(ours, _mmtrain_count, samples))
        if with_baseline:
            base_rounds.append(_timed(base, _baseline_count, max(32, samples // args.baseline_fraction)))
        print(f"  {config['variant']} round {r}: mmtrain {ours_rounds[-1][0] / ours_rounds[-1][1]:.0f}/s"
              + (f", baseline {base_rounds[-1][0] / base_rounds[-1][1]:.0f}/s" if base_rounds else ""), flush=True)
    o = _summary(ours_rounds)
    tokens = sum(r[3]["tokens"] for r in ours_rounds)
    slots = sum(r[3]["slots"] for r in ours_rounds)
    rows = sum(r[3]["rows"] for r in ours_rounds)
    entry: Dict[str, Any] = {
        "variant": config["variant"],
        "images_per_doc": images_per_doc,
        "samples_per_s_per_core": round(o["samples_per_s"], 1),
        "images_per_s_per_core": round(o["samples_per_s"] * o["images_per_sample"], 1),
        "samples_per_cpu_s": round(o["samples_per_cpu_s"], 1) if o["samples_per_cpu_s"] else None,
    }
    if base_rounds:
        b = _summary(base_rounds)
        entry.update({
            "baseline_samples_per_s_per_core": round(b["samples_per_s"], 1),
            "baseline_images_per_s_per_core": round(b["samples_per_s"] * b["images_per_sample"], 1),
            "baseline_samples_per_cpu_s": round(b["samples_per_cpu_s"], 1) if b["samples_per_cpu_s"] else None,
            "speedup": round(o["samples_per_s"] / b["samples_per_s"], 2),
            "speedup_cpu_time": round(o["samples_per_cpu_s"] / b["samples_per_cpu_s"], 2)
            if o["samples_per_cpu_s"] and b["samples_per_cpu_s"] else None,
        })
    entry.update({
        "image_px": [IMAGE_W, IMAGE_H],
        "image_megapixels": round(IMAGE_W * IMAGE_H / 1e6, 3),
        "image_bytes_mean": round(data["image_bytes_mean"]),
        "image_jpeg_quality": jpeg_quality,
        "output_image_px": 224,
        "tokens_per_sample_mean": round(tokens / o["samples_timed"], 1),
        "text_chars_per_sample_mean": round(data["text_chars_per_doc_mean"], 1),
        "samples_per_row_mean": round(o["samples_timed"] / rows, 2),
        "packing_efficiency": round(tokens / slots, 3),
        "num_docs": data["params"]["num_docs"],
        "num_shards": len(urls),
        "mmtrain": {"loader": f"build_train_loader(num_workers=0, packing=True, template='simple', "
                              f"image_decode='{config['image_decode']}')",
                    "max_seq_tokens": args.max_seq_tokens, "max_images": args.max_images,
                    "micro_batch_size": args.micro_batch_size, "shuffle_buffer_samples": args.shuffle_buffer,
                    "jpeg_decoder": decoder, **o},
    })
    if base_rounds:
        entry["baseline"] = {"reader": baseline.reader, "image_transform": baseline.transform_name,
                             "tokenizer_call": f"tokenizer(text, max_length={OF_MAX_TOKENS * images_per_doc}, truncation=True, "
                                               "padding='max_length', return_tensors='pt')",
                             "batch_size": args.baseline_batch_size, "images": "float32 [K,3,224,224], normalized", **b}
    if config["image_decode"] == "device":
        entry["mmtrain"]["decode_device"] = str(loader.decode_device)
        entry["device_decode_only"] = device_decode_micro(urls[0], loader.decode_device)
    elif config["baseline"]:  # the rows of another decoder need not repeat it
        entry["image_only"] = image_micro(urls[0], plain=args.baseline_without_extras)
    entry["mmtrain_ms_per_sample_by_stage"] = stage_breakdown(ours, samples)
    if args.profile:
        print(f"---- cProfile, mmtrain path, {config['variant']} ----")
        print(_profile(ours, _mmtrain_count, samples, args.profile_top))
        if with_baseline:
            print(f"---- cProfile, baseline path, {config['variant']} ----")
            print(_profile(base, _baseline_count, max(32, samples // args.baseline_fraction), args.profile_top))
    loader.close()
    images.set_jpeg_decoder(os.environ.get(images.JPEG_DECODER_ENV, "auto"))
    return entry


# ------------------------------------------------------------------------------------------ main


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _versions() -> Dict[str, str]:
    out = {"python": platform.python_version()}
    for name, mod in (("torch", "torch"), ("Pillow", "PIL"), ("transformers", "transformers"), ("tokenizers", "tokenizers"),
                      ("numpy", "numpy"), ("webdataset", "webdataset"), ("open_clip", "open_clip"),
                      ("torchvision", "torchvision")):
        try:
            out[name] = getattr(__import__(mod), "__version__", "?")
        except Exception:
            out[name] = "not installed"
    try:
        from PIL import features

        out["libjpeg"] = f"{features.version('jpg')} (libjpeg-turbo: {bool(features.check_feature('libjpeg_turbo'))})"
    except Exception:
        pass
    return out


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(prog="python3 -m bench.loader", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="result JSON (default bench/results/loader_<cpu tag>.json)")
    p.add_argument("--data-dir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "mmtrain-bench-loader"))
    p.add_argument("--images-per-doc", type=int, default=1, help="K of the main entry")
    p.add_argument("--extra-images-per-doc", type=int, nargs="*", default=[3], help="further K, reported under 'extra'")
    p.add_argument("--extra-jpeg-quality", type=int, nargs="*", default=[75],
                   help="K=1 rows with the same pictures at these JPEG qualities (75: typical of the web), under 'extra'")
    p.add_argument("--extra-decoders", nargs="*", default=["pillow"], choices=["pillow", "simplejpeg"],
                   help="K=1 q90 rows of mmtrain alone with this JPEG decoder forced (set_jpeg_decoder), under 'extra'")
    p.add_argument("--extra-image-decode", nargs="*", default=None, choices=["device"],
                   help="K=1 q90 rows with JPEGs decoded on the GPU (data.image_decode=device), with the baseline, "
                        "under 'extra' (default: device where CUDA is available)")
    p.add_argument("--docs", type=int, default=4000, help="documents to generate (K>1: this many images)")
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--samples", type=int, default=1500, help="mmtrain samples per timed round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--baseline-fraction", type=int, default=3, help="baseline rounds time samples/this many samples")
    p.add_argument("--core", type=int, default=None, help="CPU to pin to (default: the last one allowed)")
    p.add_argument("--max-seq-tokens", type=int, default=2048)
    p.add_argument("--max-images", type=int, default=16, help="images per packed row")
    p.add_argument("--micro-batch-size", type=int, default=4, help="rows per micro-batch")
    p.add_argument("--shuffle-buffer", type=int, default=256)
    p.add_argument("--baseline-batch-size", type=int, default=32)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--gen-workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--baseline-without-extras", action="store_true",
                   help="use the tarfile reader and torchvision transform even where webdataset/open_clip exist")
    p.add_argument("--profile", action="store_true", help="print a cProfile of one more round of each path")
    p.add_argument("--profile-top", type=int, default=30)
    args = p.parse_args(argv)
    command = shlex.join(["python3", "-m", "bench.loader", *(sys.argv[1:] if argv is None else argv)])

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.makedirs(args.data_dir, exist_ok=True)
    from mmtrain.data.tokenizer import TokenIds, load_tokenizer

    tok_dir = prepare_tokenizer(args.data_dir, args.vocab_size)
    k1 = args.images_per_doc
    import torch

    if args.extra_image_decode is None:
        args.extra_image_decode = ["device"] if torch.cuda.is_available() else []
    configs = [{"images_per_doc": k1, "jpeg_quality": JPEG_QUALITY, "decoder": "auto", "baseline": True,
                "variant": f"K={k1}, q{JPEG_QUALITY} (headline)"}]
    configs += [{"images_per_doc": k, "jpeg_quality": JPEG_QUALITY, "decoder": "auto", "baseline": True,
                 "variant": f"K={k}, q{JPEG_QUALITY}"} for k in args.extra_images_per_doc if k != k1]
    configs += [{"images_per_doc": k1, "jpeg_quality": q, "decoder": "auto", "baseline": True,
                 "variant": f"K={k1}, q{q}: the same pictures at JPEG quality {q}"}
                for q in args.extra_jpeg_quality if q != JPEG_QUALITY]
    configs += [{"images_per_doc": k1, "jpeg_quality": JPEG_QUALITY, "decoder": d, "baseline": False,
                 "variant": f"K={k1}, q{JPEG_QUALITY}, mmtrain only, JPEG decoder forced to {d}"} for d in args.extra_decoders]
    configs += [{"images_per_doc": k1, "jpeg_quality": JPEG_QUALITY, "decoder": "auto", "baseline": True, "image_decode": d,
                 "variant": f"K={k1}, q{JPEG_QUALITY}, JPEGs decoded on the GPU (data.image_decode={d}); the core "
                            "does the rest and drives the GPU"} for d in args.extra_image_decode]
    for c in configs:
        c.setdefault("image_decode", "workers")
    for c in configs:  # generate everything before pinning (generation uses every core)
        prepare_data(args.data_dir, c["images_per_doc"], _num_docs(args, c["images_per_doc"]), args.shards,
                     args.gen_workers, c["jpeg_quality"])

    allowed = sorted(os.sched_getaffinity(0))
    core = allowed[-1] if args.core is None else args.core
    os.sched_setaffinity(0, {core})
    torch.set_num_threads(1)
    tokenizer = load_tokenizer(tok_dir, template="simple")
    token_ids = TokenIds.from_tokenizer(tokenizer, "simple")

    cpu = cpu_model()
    print(f"pinned to CPU {core} of {len(allowed)} ({cpu}); torch threads {torch.get_num_threads()}", flush=True)
    entries = [measure(args, c, tokenizer, token_ids) for c in configs]
    result: Dict[str, Any] = dict(entries[0])
    result.update({
        "what": "interleaved documents -> packed uint8 224-px micro-batches, one process on one core; "
                "a sample is one document (K images + 100-200 words per image)",
        "metric": "median over rounds of samples per wall second, process pinned to one core; *_per_cpu_s: per "
                  "second of the process's CPU time (less sensitive to other load on the host)",
        "tokenizer": f"mmtrain tiny byte-level BPE (train_tiny_tokenizer), vocab {args.vocab_size} + media tokens, "
                     "trained on the generated text; no LLaMA tokenizer available offline",
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "pinned_core": core,
        "host": socket.gethostname(),
        "versions": _versions(),
        "command": command,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "targets": {"samples_per_s_per_core": 1000, "speedup": 2.0},
    })
    busy = min(e["mmtrain"]["cpu_busy_fraction"] for e in entries)
    if busy < 0.95:
        result["note"] = (f"other load took the pinned core ({busy:.0%} busy at worst): the *_per_cpu_s figures are the "
                          "better per-core estimate")
    if len(entries) > 1:
        result["extra"] = entries[1:]
    out = args.out
    if out is None:
        tag = re.sub(r"[^a-z0-9]+", "_", cpu.lower()).strip("_") or "cpu"
        out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"loader_{tag}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    for e in entries:
        line = f"{e['variant']}: mmtrain {e['samples_per_s_per_core']:.0f} samples/s/core ({e['images_per_s_per_core']:.0f} img/s)"
        if "speedup" in e:
            line += f", baseline {e['baseline_samples_per_s_per_core']:.0f}/s, speedup {e['speedup']:.2f}x"
        print(line)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
