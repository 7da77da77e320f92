"""Image decoding: bytes from a shard -> uint8 pixel tensor [3, size_px, size_px].

What to resize to comes from the model (`ModelSpec.image_spec(config)`), never from the data. The
mean/std travel with the spec but are applied by the model on its device: uint8 batches are 4x
smaller to build, to pass between loader processes and to copy to the GPU.

Speed (bench/loader.py, `image_only`, per CPU second on one AMD EPYC core; 512x384 q90 ~50-kB JPEG
-> 224 px): PIL's full decode plus its bicubic resize runs ~330 images/s; decode_image ~1,200/s with
simplejpeg and ~1,000/s with Pillow's decoder; its result ~44 dB PSNR from the full-decode one (mean
error ~1 level), through:

* reduced-size decoding: libjpeg scales the DCT by 1/2, 1/4 or 1/8 while decoding, so a 512x384
  JPEG comes out as 256x192 with no full-size pass (see `_DRAFT_MIN_RATIO`);
* the optional accelerator: simplejpeg (extra `fast-jpeg`) calls libjpeg-turbo's TurboJPEG API
  directly, 10-30% faster than Pillow's decoder for the same pixels (same IDCT and upsampling
  settings; tested equal). It is used when importable (`set_jpeg_decoder`, MMTRAIN_JPEG_DECODER),
  for JPEGs only; anything it will not take goes to Pillow, so broken images get the same reasons;
* the resize runs in torch's uint8 antialiased bicubic kernel (AVX2/AVX-512, a port of Pillow-SIMD's),
  ~4x faster than Pillow's own and within 1 level of it, on a channels-last view it takes as it is.
  It splits work over the batch dimension only, so one image never wakes torch's intra-op thread
  pool. Where torch has no such kernel (`_TORCH_RESIZE` false: ARM, old x86) its generic one is
  2x slower than Pillow, so Pillow resizes.

What is left is libjpeg-turbo's Huffman decoding: at 1/8 scale (DC only, no real IDCT) a 50-kB q90
JPEG still decodes at only ~2,200/s (0.45 ms), against ~1,780/s (0.56 ms) at 1/2 scale; the resize
and CHW layout add ~0.2 ms. bench/README.md has the per-sample budget.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Tuple, Union

import numpy as np
import PIL
import torch
import torch.nn.functional as F
from PIL import Image

from mmtrain.data.formats import BadSample

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# A JPEG is decoded at the largest DCT scale-down (1/2, 1/4, 1/8) that keeps both sides >= this
# times size_px; the resize then upsamples by at most 1/_DRAFT_MIN_RATIO (1.33x) on the short side.
# At 1.0 (or the 2x rule this replaced) a 512x384 JPEG is decoded in full for 224 px. The trade:
# detail between 0.75 and 1.0 of the target's Nyquist frequency on that side is gone; measured
# against full decode + bicubic on the bench images the result is at ~44 dB PSNR (mean abs
# error ~1 level), where decoding at DCT scale 1/4 (0.43x) would fall to ~40 dB.
_DRAFT_MIN_RATIO = 0.75
_DRAFT_SCALES = (8, 4, 2)
# torch's vectorised uint8 resize exists for these CPU capabilities only.
_TORCH_RESIZE = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
# Larger images are skipped unread (`image_too_large`): a 20000x20000 scan would take ~1.2 GB and
# seconds to decode for a 224-px result. 8192x8192 passes.
MAX_IMAGE_PIXELS = 8192 * 8192
# The optional accelerator (set_jpeg_decoder): simplejpeg, when importable, decodes JPEGs.
JPEG_DECODERS = ("auto", "pillow", "simplejpeg")
JPEG_DECODER_ENV = "MMTRAIN_JPEG_DECODER"
_JPEG_SOI = b"\xff\xd8"  # every JPEG starts with this marker; anything else goes straight to Pillow
_simplejpeg: Any = None


@dataclass(frozen=True)
class ImageSpec:
    """What the vision tower expects: square side in pixels and per-channel mean/std (0-1 scale)."""

    size_px: int = 224
    mean: Tuple[float, float, float] = CLIP_MEAN
    std: Tuple[float, float, float] = CLIP_STD

    def __post_init__(self):
        if self.size_px < 1:
            raise ValueError(f"ImageSpec.size_px must be >= 1, got {self.size_px}")
        object.__setattr__(self, "mean", tuple(float(x) for x in self.mean))
        object.__setattr__(self, "std", tuple(float(x) for x in self.std))
        if len(self.mean) != 3 or len(self.std) != 3 or any(s <= 0 for s in self.std):
            raise ValueError(f"ImageSpec needs 3 means and 3 positive stds, got {self.mean}, {self.std}")

    @classmethod
    def coerce(cls, spec: Union["ImageSpec", Mapping[str, Any]]) -> "ImageSpec":
        """Accept an ImageSpec or the dict `ModelSpec.image_spec(config)` returns."""
        if isinstance(spec, cls):
            return spec
        return cls(size_px=int(spec["size_px"]), mean=tuple(spec["mean"]), std=tuple(spec["std"]))

    def blank(self, n: int = 1) -> torch.Tensor:
        """`n` black uint8 images [n, 3, H, W] (what an unused image slot holds)."""
        return torch.zeros(n, 3, self.size_px, self.size_px, dtype=torch.uint8)


def check_image_size(img: Image.Image) -> None:
    """Raise BadSample("image_too_large") from the header alone, before any pixel is decoded."""
    width, height = img.size
    if width * height > MAX_IMAGE_PIXELS:
        raise BadSample("image_too_large", f"{width}x{height} is over {MAX_IMAGE_PIXELS} pixels")


def _draft_scale(width: int, height: int, size: int) -> int:
    """The DCT scale-down (8, 4, 2 or 1) for a JPEG of this size (see _DRAFT_MIN_RATIO)."""
    for scale in _DRAFT_SCALES:
        # max(scale, ...): a reduced side must keep at least one pixel (tiny targets, tiny images).
        if min(width, height) >= max(scale, _DRAFT_MIN_RATIO * size * scale):
            return scale
    return 1


def _load_simplejpeg(choice: str):
    if choice == "pillow":
        return None
    try:
        import simplejpeg
    except ImportError:
        if choice == "simplejpeg":
            raise ImportError(f"{JPEG_DECODER_ENV}=simplejpeg, but simplejpeg is not installed; "
                              "pip install 'mmtrain[fast-jpeg]'") from None
        return None
    return simplejpeg


def set_jpeg_decoder(choice: str = "auto") -> str:
    """Choose the JPEG decoder of this process: "auto" (simplejpeg when importable, else Pillow),
    "pillow" or "simplejpeg" (an error when it is not installed). Returns `jpeg_decoder()`.
    The environment variable MMTRAIN_JPEG_DECODER sets it at import (DataLoader workers inherit it)."""
    global _simplejpeg
    if choice not in JPEG_DECODERS:
        raise ValueError(f"{JPEG_DECODER_ENV} / set_jpeg_decoder: {choice!r} is not one of {', '.join(JPEG_DECODERS)}")
    _simplejpeg = _load_simplejpeg(choice)
    return jpeg_decoder()


def jpeg_decoder() -> str:
    """Which library decodes JPEGs in this process, with its version (logged by the loader)."""
    if _simplejpeg is not None:
        return f"simplejpeg {getattr(_simplejpeg, '__version__', '?')} (libjpeg-turbo; Pillow for the rest)"
    return f"Pillow {PIL.__version__}"


def _decode_jpeg_fast(data: bytes, size: int) -> Optional[np.ndarray]:
    """simplejpeg's decode at _draft_scale, HWC uint8 RGB; None where Pillow must decide.

    Pixel for pixel what Pillow's draft decode gives (the same libjpeg-turbo settings: accurate
    integer IDCT, fancy upsampling, same scale; tested). Every JPEG it will not take (CMYK, over
    MAX_IMAGE_PIXELS, corrupt or truncated: strict mode raises on any libjpeg warning) goes to the
    Pillow path, so what is decoded and which BadSample reason a broken image gets do not depend
    on the decoder.
    """
    try:
        height, width, colorspace, _ = _simplejpeg.decode_jpeg_header(data)
    except Exception:
        return None
    if colorspace not in ("YCbCr", "Gray") or width * height > MAX_IMAGE_PIXELS:
        return None
    scale = _draft_scale(width, height, size)
    try:
        # The only scale n/8 with both sides >= ceil(side/scale) and a factor >= scale is 1/scale.
        return _simplejpeg.decode_jpeg(data, "RGB", min_height=-(-height // scale), min_width=-(-width // scale),
                                       min_factor=scale)
    except Exception:
        return None


def _pil_to_hwc(img: Image.Image) -> np.ndarray:
    """A decoded RGB image -> writable uint8 [H, W, 3] (torch wants a writable buffer; one copy)."""
    width, height = img.size
    raw = bytearray(img.tobytes())
    if len(raw) != width * height * 3:
        raise BadSample("bad_image", f"decoded {len(raw)} bytes for a {width}x{height} RGB image")
    return np.frombuffer(raw, dtype=np.uint8).reshape(height, width, 3)


def _to_chw(pixels: np.ndarray, size: int) -> torch.Tensor:
    """RGB uint8 [H, W, 3] -> uint8 [3, size, size], contiguous (bicubic, antialiased when shrinking)."""
    if pixels.shape[:2] != (size, size) and not _TORCH_RESIZE:
        pixels = _pil_to_hwc(Image.fromarray(pixels).resize((size, size), Image.Resampling.BICUBIC))
    # unsqueeze before permute: a [1, 3, H, W] view with channels-last strides, which torch's
    # uint8 kernel takes as it is (permute-then-unsqueeze strides cost it ~60 us of conversion).
    nchw = torch.from_numpy(pixels).unsqueeze(0).permute(0, 3, 1, 2)
    if pixels.shape[:2] != (size, size):
        nchw = F.interpolate(nchw, size=(size, size), mode="bicubic", antialias=True)
    # The result is channels-last; numpy's strided copy makes it [3, S, S] ~25% faster than .contiguous().
    return torch.from_numpy(np.ascontiguousarray(nchw[0].numpy()))


def _decode_with_pillow(data: bytes, size: int) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as img:
            check_image_size(img)
            if img.format in ("JPEG", "MPO"):  # MPO: a camera's JPEG with extra frames; frame 0 is decoded
                scale = _draft_scale(img.size[0], img.size[1], size)
                if scale > 1:
                    # PIL picks scale min(w // (w // s), h // (h // s)) == s, rounded to 8/4/2/1.
                    img.draft("RGB", (img.size[0] // scale, img.size[1] // scale))
            if img.mode != "RGB":
                img = img.convert("RGBA").convert("RGB") if "transparency" in img.info else img.convert("RGB")
            else:
                img.load()
            return _pil_to_hwc(img)
    except BadSample:
        raise
    except Image.DecompressionBombError as e:  # PIL's own limit, hit in Image.open for the largest
        raise BadSample("image_too_large", str(e)) from None
    except Exception as e:  # PIL raises many types (OSError, ValueError, SyntaxError, DecompressionBombError, ...)
        raise BadSample("bad_image", f"{type(e).__name__}: {e}") from None


def decode_image(data: bytes, spec: ImageSpec) -> torch.Tensor:
    """Decode image bytes to a uint8 tensor [3, size_px, size_px].

    RGB; bicubic resize to the square (no crop, as Otter), from a reduced-size JPEG decode where the
    image is large enough (module docstring); raises BadSample("bad_image") on bytes PIL cannot
    decode (corrupt, truncated, not an image) and BadSample("image_too_large") on huge ones.
    """
    size = spec.size_px
    pixels = _decode_jpeg_fast(data, size) if _simplejpeg is not None and data[:2] == _JPEG_SOI else None
    if pixels is None:
        pixels = _decode_with_pillow(data, size)
    return _to_chw(pixels, size)


set_jpeg_decoder(os.environ.get(JPEG_DECODER_ENV, "auto"))
