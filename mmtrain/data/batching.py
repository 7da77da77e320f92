"""Samples -> micro-batches: optional packing of several samples per row, and collation.

Without packing each of the B rows of a micro-batch holds one sample. With packing, samples go
first-fit into the B rows (a row holds at most `max_seq_tokens` tokens and, for square images,
`max_images` images); the first sample that fits no row closes the batch and opens the next one.
Nothing is cut or split, so every document stays whole.

Packed documents never see each other: `position_ids` restart at 0 for every document, and the
models read the boundaries from them (block-diagonal causal self-attention; the image mask resets
at each document start). Padding continues the last document's positions, so a row holding one
document has plain 0..T-1 positions and keeps the fast causal-attention path.

The batch (docs/architecture.md): `input_ids`, `labels` (-100 ignored), `attention_mask`,
`position_ids` [B, T], right-padded to the longest row, and the images in the model's layout:
square images `images` uint8 [B, N, 3, S, S] (N >= 1, black in unused slots) with `num_images` [B];
Fuyu patches `image_patches` uint8 [B, P, patch_dim] (P >= 1) with `image_patch_indices` [B, T]
(the patch that replaces each placeholder token, -1 elsewhere). With `data.image_decode: device`
the square images that are JPEG bytes still (mmtrain.data.device_decode) stay black in `images`
and travel in `jpegs` (their bytes, offsets and slots) to be decoded on the training device.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import torch

from mmtrain.data.device_decode import pack_jpegs
from mmtrain.data.episodes import IGNORE_INDEX, Sample


@dataclass
class Layout:
    """What a row may hold and how images are laid out in the batch."""

    max_seq_tokens: int
    max_images: int
    pad_id: int
    image_size_px: int = 0  # square layout
    patch_dim: int = 0  # patch layout (Fuyu); one of the two is set
    image_token_id: int = -1  # the patch placeholder id (patch layout)

    @property
    def patches(self) -> bool:
        return self.patch_dim > 0


@dataclass
class _Row:
    samples: List[Sample] = field(default_factory=list)
    num_tokens: int = 0
    num_images: int = 0


def _fits(row: _Row, sample: Sample, layout: Layout, packing: bool) -> bool:
    if not row.samples:
        return True
    if not packing:
        return False
    if row.num_tokens + len(sample.input_ids) > layout.max_seq_tokens:
        return False
    return layout.patches or row.num_images + len(sample.images) <= layout.max_images


class Packer:
    """Fills the B rows of one micro-batch; `offer` returns False when the batch is closed."""

    def __init__(self, num_rows: int, layout: Layout, packing: bool):
        self.layout, self.packing = layout, packing
        self.rows = [_Row() for _ in range(num_rows)]

    def offer(self, sample: Sample) -> bool:
        for row in self.rows:
            if _fits(row, sample, self.layout, self.packing):
                row.samples.append(sample)
                row.num_tokens += len(sample.input_ids)
                row.num_images += len(sample.images)
                return True
        return False

    @property
    def full(self) -> bool:
        """No packing: every row has its sample (with packing the batch closes on a refusal)."""
        return not self.packing and all(row.samples for row in self.rows)

    def batch(self) -> Dict[str, Any]:
        return collate([row.samples for row in self.rows if row.samples], self.layout)


def collate(rows: Sequence[Sequence[Sample]], layout: Layout) -> Dict[str, Any]:
    """Rows of samples (one or several per row) -> the batch contract of the module docstring.

    Built in numpy and wrapped at the end: no torch intra-op threads in the data path.
    """
    b = len(rows)
    t = max(sum(len(s.input_ids) for s in row) for row in rows)
    input_ids = np.full((b, t), layout.pad_id, dtype=np.int64)
    labels = np.full((b, t), IGNORE_INDEX, dtype=np.int64)
    attention = np.zeros((b, t), dtype=np.int64)
    positions = np.zeros((b, t), dtype=np.int64)
    for i, row in enumerate(rows):
        start = 0
        for s in row:
            n = len(s.input_ids)
            input_ids[i, start:start + n] = s.input_ids
            labels[i, start:start + n] = s.labels
            positions[i, start:start + n] = np.arange(n)
            start += n
        attention[i, :start] = 1
        last = len(row[-1].input_ids)
        positions[i, start:] = np.arange(last, last + t - start)
    batch: Dict[str, Any] = {
        "input_ids": torch.from_numpy(input_ids),
        "labels": torch.from_numpy(labels),
        "attention_mask": torch.from_numpy(attention),
        "position_ids": torch.from_numpy(positions),
    }
    batch.update(_patch_fields(rows, input_ids, layout) if layout.patches else _square_fields(rows, layout))
    return batch


def _square_fields(rows: Sequence[Sequence[Sample]], layout: Layout) -> Dict[str, Any]:
    counts = [sum(len(s.images) for s in row) for row in rows]
    size = layout.image_size_px
    images = np.zeros((len(rows), max(1, max(counts)), 3, size, size), dtype=np.uint8)
    jpeg_slots: List[Tuple[int, int]] = []
    jpeg_blobs: List[bytes] = []
    for i, row in enumerate(rows):
        j = 0
        for s in row:
            for image in s.images:
                if isinstance(image, bytes):  # left for the device to decode (data.image_decode=device)
                    jpeg_slots.append((i, j))
                    jpeg_blobs.append(image)
                else:
                    images[i, j] = image.numpy() if isinstance(image, torch.Tensor) else image
                j += 1
    fields: Dict[str, Any] = {"images": torch.from_numpy(images), "num_images": torch.tensor(counts, dtype=torch.long)}
    if jpeg_blobs:
        fields["jpegs"] = pack_jpegs(jpeg_slots, jpeg_blobs)
    return fields


def _patch_fields(rows: Sequence[Sequence[Sample]], input_ids: np.ndarray, layout: Layout) -> Dict[str, torch.Tensor]:
    per_row = [[p for s in row for p in s.images] for row in rows]
    counts = [sum(len(p) for p in patches) for patches in per_row]
    patches = np.zeros((len(rows), max(1, max(counts)), layout.patch_dim), dtype=np.uint8)
    for i, row_patches in enumerate(per_row):
        if row_patches:
            patches[i, : counts[i]] = np.concatenate(row_patches)
    is_patch = input_ids == layout.image_token_id
    indices = np.where(is_patch, np.cumsum(is_patch, axis=1) - 1, -1)
    for i, count in enumerate(counts):
        if int(is_patch[i].sum()) != count:
            raise ValueError(f"row {i}: {int(is_patch[i].sum())} patch placeholders but {count} patches")
    return {"image_patches": torch.from_numpy(patches), "image_patch_indices": torch.from_numpy(indices)}


def packing_stats(batch: Dict[str, Any], num_samples: int) -> Dict[str, float]:
    """Non-pad fraction of the batch's token slots, and samples per row."""
    mask = batch["attention_mask"]
    return {"packing_efficiency": float(mask.sum()) / max(1, mask.numel()),
            "samples_per_row": num_samples / max(1, mask.shape[0])}


