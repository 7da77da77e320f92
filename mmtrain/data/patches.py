"""Fuyu's variable-resolution images: bytes -> 30x30x3 patches, and the token rows that stand for them.

An image is scaled (aspect kept) so its longer side lies within [min_px, max_px] (the recipe's
`data.image_min_px` / `data.image_max_px`), padded at the bottom and right to whole patches with
white (Fuyu pads with 1.0 after scaling to [0, 1]: pixel 255), and cut into `patch_px` squares in
row-major order, each flattened as (y, x, channel) like transformers' FuyuImageProcessor. The
model normalises the uint8 patches on its device.

In the token stream each patch row is `cols` image placeholders (`|SPEAKER|`) and one `|NEWLINE|`,
and the whole grid comes before `<s>`: a 448x448 image is 15 rows of 15 + 1 = 240 tokens, a
1080x1920 one 36 x 65 = 2340. The k-th placeholder of a row takes the k-th patch of that row.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any, List, Mapping, Tuple, Union

import numpy as np
from PIL import Image

from mmtrain.data.episodes import IGNORE_INDEX, Sample
from mmtrain.data.formats import BadSample
from mmtrain.data.images import check_image_size
from mmtrain.data.tokenizer import TokenIds

PAD_PIXEL = 255


@dataclass(frozen=True)
class PatchSpec:
    """The patch layout a Fuyu-family model takes (from `ModelSpec.image_spec`) plus the recipe's bounds."""

    patch_px: int = 30
    min_px: int = 448
    max_px: int = 1024

    def __post_init__(self):
        if not 1 <= self.patch_px <= self.min_px <= self.max_px:
            raise ValueError(f"PatchSpec needs 1 <= patch_px <= min_px <= max_px, got {self}")

    @classmethod
    def coerce(cls, spec: Union["PatchSpec", Mapping[str, Any]]) -> "PatchSpec":
        if isinstance(spec, cls):
            return spec
        return cls(patch_px=int(spec["patch_px"]), min_px=int(spec.get("min_px", 448)), max_px=int(spec.get("max_px", 1024)))

    @property
    def patch_dim(self) -> int:
        return self.patch_px * self.patch_px * 3


def scaled_size(width: int, height: int, spec: PatchSpec) -> Tuple[int, int]:
    """(width, height) with the longer side clamped into [min_px, max_px], aspect kept."""
    longer = max(width, height)
    target = min(max(longer, spec.min_px), spec.max_px)
    if target == longer:
        return width, height
    scale = target / longer
    return max(1, round(width * scale)), max(1, round(height * scale))


def image_to_patches(data: bytes, spec: PatchSpec) -> np.ndarray:
    """Image bytes -> uint8 patches [rows, cols, patch_px * patch_px * 3]; BadSample on bad bytes."""
    p = spec.patch_px
    try:
        with Image.open(io.BytesIO(data)) as img:
            check_image_size(img)
            size = scaled_size(img.width, img.height, spec)
            if img.format == "JPEG" and size[0] * 2 <= img.width:
                img.draft("RGB", size)
            img = img.convert("RGB")
            if img.size != size:
                img = img.resize(size, Image.Resampling.BICUBIC)
            pixels = np.asarray(img, dtype=np.uint8)
    except BadSample:
        raise
    except Image.DecompressionBombError as e:  # PIL's own limit, hit in Image.open for the largest
        raise BadSample("image_too_large", str(e)) from None
    except Exception as e:  # PIL raises many types
        raise BadSample("bad_image", f"{type(e).__name__}: {e}") from None
    height, width = pixels.shape[:2]
    rows, cols = math.ceil(height / p), math.ceil(width / p)
    canvas = np.full((rows * p, cols * p, 3), PAD_PIXEL, dtype=np.uint8)
    canvas[:height, :width] = pixels
    return canvas.reshape(rows, p, cols, p, 3).transpose(0, 2, 1, 3, 4).reshape(rows, cols, p * p * 3)


def grid_tokens(rows: int, cols: int, token_ids: TokenIds) -> List[int]:
    return ([token_ids.image] * cols + [token_ids.image_newline]) * rows


def place_patches(sample: Sample, grids: List[np.ndarray], token_ids: TokenIds, max_seq_tokens: int) -> Sample:
    """Put each image's patch rows in front of the sample's ids (never targets); `sample.images`
    becomes one uint8 array [num_patches, patch_dim] in placeholder order."""
    prefix: List[int] = []
    for grid in grids:
        prefix += grid_tokens(grid.shape[0], grid.shape[1], token_ids)
    if len(prefix) + len(sample.input_ids) > max_seq_tokens:
        raise BadSample("too_long", f"{sample.sample_id}: {len(prefix)} image tokens + {len(sample.input_ids)} text tokens "
                                    f"> data.max_seq_tokens={max_seq_tokens}; lower data.image_max_px")
    sample.input_ids = prefix + sample.input_ids
    sample.labels = [IGNORE_INDEX] * len(prefix) + sample.labels
    sample.images = [np.concatenate([g.reshape(-1, g.shape[-1]) for g in grids])] if grids else []
    return sample
