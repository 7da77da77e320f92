"""Image decoding: bytes from a shard -> uint8 pixel tensor [3, size_px, size_px].

What to resize to comes from the model (`ModelSpec.image_spec(config)`), never from the data. The
mean/std travel with the spec but are applied by the model on its device: uint8 batches are 4x
smaller to build, to pass between loader processes and to copy to the GPU.

Speed (bench/loader.py, `image_only`; one core, 512x384 q90 ~50-kB JPEG -> 224 px): PIL's full
decode plus its bicubic resize runs 250-350 images/s; decode_image runs 570-1050/s (2.3-2.9x, AMD
EPYC and Xeon hosts), its result ~44 dB PSNR from the old one (mean error ~1 level), through:

* reduced-size decoding: libjpeg scales the DCT by 1/2, 1/4 or 1/8 while decoding (`Image.draft`),
  so a 512x384 JPEG comes out as 256x192 with no full-size pass (see `_DRAFT_MIN_RATIO`);
* the resize runs in torch's uint8 antialiased bicubic kernel (AVX2/AVX-512, a port of Pillow-SIMD's),
  ~4x faster than Pillow's own and within 1 level of it. It splits work over the batch dimension
  only, so one image never wakes torch's intra-op thread pool. Where torch has no such kernel
  (`_TORCH_RESIZE` false: ARM, old x86) its generic one is 2x slower than Pillow, so Pillow resizes.

What is left is libjpeg-turbo's Huffman decoding (~0.8 ms for 50 kB, the same at any DCT scale):
the half-scale decode alone runs only 800-1,300/s.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Mapping, Tuple, Union

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


def _to_chw(img: Image.Image, size: int) -> torch.Tensor:
    """An RGB image -> uint8 [3, size, size], contiguous (bicubic, antialiased when shrinking)."""
    if img.size != (size, size) and not _TORCH_RESIZE:
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    width, height = img.size
    # bytearray: torch wants a writable buffer (a bytes object would warn); one ~150-kB copy.
    raw = bytearray(img.tobytes())
    if len(raw) != width * height * 3:
        raise BadSample("bad_image", f"decoded {len(raw)} bytes for a {width}x{height} RGB image")
    chw = torch.frombuffer(raw, dtype=torch.uint8).view(height, width, 3).permute(2, 0, 1)  # channels-last view
    if (height, width) != (size, size):
        chw = F.interpolate(chw.unsqueeze(0), size=(size, size), mode="bicubic", antialias=True)[0]
    return chw.contiguous()


def decode_image(data: bytes, spec: ImageSpec) -> torch.Tensor:
    """Decode image bytes to a uint8 tensor [3, size_px, size_px].

    RGB; bicubic resize to the square (no crop, as Otter), from a reduced-size JPEG decode where the
    image is large enough (module docstring); raises BadSample("bad_image") on bytes PIL cannot
    decode (corrupt, truncated, not an image) and BadSample("image_too_large") on huge ones.
    """
    size = spec.size_px
    try:
        with Image.open(io.BytesIO(data)) as img:
            check_image_size(img)
            if img.format == "JPEG":
                scale = _draft_scale(img.size[0], img.size[1], size)
                if scale > 1:
                    # PIL picks scale min(w // (w // s), h // (h // s)) == s, rounded to 8/4/2/1.
                    img.draft("RGB", (img.size[0] // scale, img.size[1] // scale))
            if img.mode != "RGB":
                img = img.convert("RGBA").convert("RGB") if "transparency" in img.info else img.convert("RGB")
            else:
                img.load()
            return _to_chw(img, size)
    except BadSample:
        raise
    except Image.DecompressionBombError as e:  # PIL's own limit, hit in Image.open for the largest
        raise BadSample("image_too_large", str(e)) from None
    except Exception as e:  # PIL raises many types (OSError, ValueError, SyntaxError, DecompressionBombError, ...)
        raise BadSample("bad_image", f"{type(e).__name__}: {e}") from None
