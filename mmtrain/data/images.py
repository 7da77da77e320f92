"""Image decoding: bytes from a shard -> normalised float tensor [3, size_px, size_px].

What to resize and normalise to comes from the model (`ModelSpec.image_spec(config)`), never from the data.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Mapping, Tuple, Union

import numpy as np
import torch
from PIL import Image

from mmtrain.data.formats import BadSample

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# JPEGs at least this many times the target side are decoded at a reduced DCT scale (Image.draft):
# several times faster and the bicubic resize after it still starts from >= size_px pixels.
_DRAFT_FACTOR = 2


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
        """`n` zero images [n, 3, H, W] (what a missing image slot holds)."""
        return torch.zeros(n, 3, self.size_px, self.size_px, dtype=torch.float32)


def decode_image(data: bytes, spec: ImageSpec) -> torch.Tensor:
    """Decode image bytes to a normalised float32 tensor [3, size_px, size_px].

    RGB; bicubic resize to the square (no crop, as Otter); raises BadSample("bad_image") on bytes
    PIL cannot decode (corrupt, truncated, not an image).
    """
    size = spec.size_px
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format == "JPEG" and min(img.size) >= _DRAFT_FACTOR * size:
                # Picks the largest DCT scale-down that keeps both sides >= size.
                img.draft("RGB", (size, size))
            if img.mode != "RGB":
                img = img.convert("RGBA").convert("RGB") if "transparency" in img.info else img.convert("RGB")
            else:
                img.load()
            if img.size != (size, size):
                img = img.resize((size, size), Image.Resampling.BICUBIC)
            pixels = np.asarray(img, dtype=np.uint8)
    except Exception as e:  # PIL raises many types (OSError, ValueError, SyntaxError, DecompressionBombError, ...)
        raise BadSample("bad_image", f"{type(e).__name__}: {e}") from None
    if pixels.shape != (size, size, 3):
        raise BadSample("bad_image", f"decoded to shape {pixels.shape}")
    # numpy, not torch: per-image elementwise work is tiny, and torch's intra-op thread pool makes it
    # orders of magnitude slower when the training process's cores are busy.
    scale = np.asarray(spec.std, dtype=np.float32) * 255.0
    shift = np.asarray(spec.mean, dtype=np.float32) / np.asarray(spec.std, dtype=np.float32)
    out = pixels.astype(np.float32) / scale - shift  # == (pixels / 255 - mean) / std
    return torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1)))
