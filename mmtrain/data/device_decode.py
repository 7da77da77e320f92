"""JPEG decoding on the training device (`data.image_decode: device`).

Why: on a CPU core the JPEG bitstream is the loader's floor. Huffman-decoding a ~50-kB q90 JPEG
costs 0.45-0.87 ms whatever the DCT scale-down (the host's cores decide), half or more of a
1-ms-per-sample budget (bench/README.md). With this option the workers read each JPEG's header only
and pass its bytes on; the training process decodes a micro-batch's JPEGs in batched nvJPEG calls
(`torchvision.io.decode_jpeg` on the device) and resizes them there, before the forward pass.

Which images still go through the workers' `decode_image` (same pixels, same skip reasons as with
`workers`): anything whose header does not show an 8-bit baseline or progressive JPEG with 1 or 3
components (not RGB-coded), an end-of-image marker and at most DEVICE_MAX_PIXELS pixels: PNG,
CMYK, lossless or arithmetic-coded JPEGs, truncated files, images over 2048x2048 (the device path
decodes at full size; the workers' path decodes those at a DCT scale-down). Device memory per
batch stays bounded (DECODE_CHUNK_IMAGES, RESIZE_CHUNK_PIXELS).

Pixels: the full-size decode resized to the square with the antialiased bicubic filter (in float,
rounded), where the workers decode at a DCT scale-down first: the two differ by 1.5-3 levels on
average (tests/gpu/test_device_decode_gpu.py).

A JPEG that passes the header check and that the device still refuses (nvJPEG raises) is decoded
once more on the CPU by `decode_image`; when that fails too its slot stays black and it is counted
as `bad_image_on_device` among the loader's skip counts. The sample is already packed by then, so
its text still trains, next to a blank image. Damage inside the entropy-coded data (a truncated
scan followed by an end marker, flipped bits) is decoded as well as the decoder can, with no error:
libjpeg does the same in the workers, with a warning.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from mmtrain.data.formats import BadSample
from mmtrain.data.images import MAX_IMAGE_PIXELS, ImageSpec, decode_image

IMAGE_DECODE_CHOICES = ("workers", "device")
DEVICE_FAILURE_REASON = "bad_image_on_device"
# The device decodes at full size; larger images go to the workers, whose DCT scale-down decodes
# a 4000x3000 JPEG at 1/8 scale for a 224-px result.
DEVICE_MAX_PIXELS = min(MAX_IMAGE_PIXELS, 2048 * 2048)
# Device memory of one decode_jpegs call stays bounded whatever the batch: at most this many images
# decoded at once (uint8, <= 32 x 12 MB), each size group resized in calls of at most this many
# pixels (float32: <= 200 MB), every decoded image released once it is in its slot.
DECODE_CHUNK_IMAGES = 32
RESIZE_CHUNK_PIXELS = 16 * 2**20

_SOI, _EOI = b"\xff\xd8", b"\xff\xd9"
# Start-of-frame markers nvJPEG takes (baseline, extended sequential, progressive; Huffman-coded).
_SOF_DEVICE = (0xC0, 0xC1, 0xC2)
# Every other start-of-frame marker (lossless, hierarchical, arithmetic-coded): workers decide.
# 0xC4 (DHT), 0xC8 (reserved JPG) and 0xCC (DAC) share the range but are not frames.
_SOF_OTHER = tuple(m for m in range(0xC3, 0xD0) if m not in (0xC4, 0xC8, 0xCC))
_STANDALONE = (0x01, *range(0xD0, 0xD8))  # TEM and RSTn carry no length
_EOI_SEARCH_BYTES = 64  # writers may pad after EOI; a truncated file has no EOI near its end


def _table_ids(data: bytes, pos: int, end: int, marker: int) -> List[int]:
    """Ids defined by a DQT ((precision, id) bytes + 64 or 128 bytes each) or a DHT ((class, id) byte +
    16 counts + that many symbols each) segment; a DHT id is class * 16 + id, as its byte reads."""
    ids: List[int] = []
    while pos < end:
        ids.append(data[pos] & 0x0F if marker == 0xDB else data[pos])
        if marker == 0xDB:
            pos += 1 + 64 * (1 + (data[pos] >> 4))
        else:
            pos += 17 + sum(data[pos + 1:pos + 17])
    return ids


def jpeg_for_device(data: bytes) -> bool:
    """True when the workers may pass these bytes on undecoded (see the module docstring).

    Walks the marker segments up to the first scan, reading a few hundred bytes and decoding
    nothing: the frame must be one nvJPEG takes, the first scan must name the frame's components,
    and every quantisation and Huffman table the frame and that scan use must be defined. nvJPEG's
    batched decode does not fail on such damage (measured on an H100: a missing table or an unknown
    component gives a wrong picture and no error), where the workers' decoder raises and skips.
    """
    if data[:2] != _SOI or data.rfind(_EOI, max(0, len(data) - _EOI_SEARCH_BYTES)) < 0:
        return False
    pos, end = 2, len(data)
    adobe_rgb = False
    quant: set = set()
    huffman: set = set()
    frame_ids: List[int] = []
    frame_tables: List[int] = []
    try:
        while pos + 4 <= end:
            if data[pos] != 0xFF:
                return False
            marker = data[pos + 1]
            if marker == 0xFF:  # fill byte
                pos += 1
                continue
            if marker in _STANDALONE:
                pos += 2
                continue
            length = int.from_bytes(data[pos + 2:pos + 4], "big")
            body, after = pos + 4, pos + 2 + length
            if length < 2 or after > end:
                return False
            if marker == 0xEE and data[body:body + 5] == b"Adobe" and length >= 14:
                adobe_rgb = data[body + 11] == 0  # transform 0: 3 components are RGB, not YCbCr
            elif marker in (0xDB, 0xC4):
                (quant if marker == 0xDB else huffman).update(_table_ids(data, body, after, marker))
            elif marker in _SOF_DEVICE:
                if frame_tables:
                    return False  # a second frame
                precision, components = data[body], data[body + 5]
                height = int.from_bytes(data[body + 1:body + 3], "big")
                width = int.from_bytes(data[body + 3:body + 5], "big")
                if (precision != 8 or components not in (1, 3) or length != 8 + 3 * components
                        or not 0 < width * height <= DEVICE_MAX_PIXELS):
                    return False
                frame_ids = [data[body + 6 + 3 * k] for k in range(components)]
                frame_tables = [data[body + 8 + 3 * k] for k in range(components)]
                if bytes(frame_ids) == b"RGB":
                    return False  # libjpeg reads ids 'R', 'G', 'B' as RGB, not YCbCr, marker or not
            elif marker == 0xDA:  # the first scan: everything it needs must be defined by now
                count = data[body]
                selectors = data[body + 1 + 2 * count:body + 3 + 2 * count]  # spectral start, end
                if not frame_tables or len(selectors) < 2 or not set(frame_tables) <= quant:
                    return False
                needed = set()
                for k in range(count):
                    if data[body + 1 + 2 * k] not in frame_ids:
                        return False  # a component the frame lacks (nvJPEG's batched decode misreads it silently)
                    tables = data[body + 2 + 2 * k]
                    if selectors[0] == 0:
                        needed.add(tables >> 4)  # DC table (class 0)
                    if selectors[1] > 0:
                        needed.add(0x10 | (tables & 0x0F))  # AC table (class 1)
                return needed <= huffman and not (adobe_rgb and len(frame_tables) == 3)
            elif marker in _SOF_OTHER or marker == 0xD9:
                return False
            pos = after
    except IndexError:  # a segment that claims more than the file holds
        return False
    return False


def pack_jpegs(slots: Sequence[Tuple[int, int]], blobs: Sequence[bytes]) -> Dict[str, torch.Tensor]:
    """The batch's `jpegs` field: every JPEG's bytes in one uint8 tensor (one shared-memory block
    between processes, not one per image), with `offsets` [M + 1] and `slots` [M, 2] (row, image)."""
    offsets = np.zeros(len(blobs) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in blobs], out=offsets[1:])
    data = np.frombuffer(b"".join(blobs), dtype=np.uint8).copy()  # writable: torch wants it
    return {"data": torch.from_numpy(data), "offsets": torch.from_numpy(offsets),
            "slots": torch.tensor(list(slots), dtype=torch.long).view(-1, 2)}


def _decode_all(blobs: List[torch.Tensor], device: torch.device) -> List[Any]:
    """nvJPEG (or libjpeg on a CPU device) over the list; None where an image will not decode."""
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return list(decode_jpeg(blobs, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:
        pass  # the batched call fails as a whole: find the culprits one by one
    decoded: List[Any] = []
    for blob in blobs:
        try:
            decoded.append(decode_jpeg(blob, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            decoded.append(None)
    return decoded


def decode_jpegs(images: torch.Tensor, jpegs: Dict[str, torch.Tensor], spec: ImageSpec) -> Counter:
    """Decode the batch's `jpegs` into their slots of `images` (uint8 [B, N, 3, S, S], on the device
    that decodes) in place; returns the images that could not be decoded, by skip reason."""
    device = images.device
    size = spec.size_px
    offsets = jpegs["offsets"].tolist()
    slots = jpegs["slots"].tolist()
    data = jpegs["data"].cpu()
    failed: Counter = Counter()
    for start in range(0, len(slots), DECODE_CHUNK_IMAGES):
        chunk = list(range(start, min(start + DECODE_CHUNK_IMAGES, len(slots))))
        blobs = [data[offsets[i]:offsets[i + 1]] for i in chunk]
        decoded = _decode_all(blobs, device)
        groups: Dict[Tuple[int, int], List[int]] = {}
        for k, pixels in enumerate(decoded):
            if pixels is not None:
                groups.setdefault(tuple(pixels.shape[-2:]), []).append(k)
                continue
            try:
                # The CPU decoder tolerates some damage nvJPEG refuses; its result is already resized.
                row, col = slots[chunk[k]]
                images[row, col] = decode_image(blobs[k].numpy().tobytes(), spec).to(device)
            except BadSample:
                failed[DEVICE_FAILURE_REASON] += 1
        for (height, width), members in groups.items():
            per_call = max(1, RESIZE_CHUNK_PIXELS // (height * width))
            for first in range(0, len(members), per_call):
                part = members[first:first + per_call]
                batch = torch.stack([decoded[k] for k in part])
                for k in part:
                    decoded[k] = None
                if (height, width) != (size, size):
                    batch = F.interpolate(batch.float(), size=(size, size), mode="bicubic", antialias=True)
                    batch = batch.round_().clamp_(0, 255).to(torch.uint8)
                index = torch.tensor([slots[chunk[k]] for k in part], dtype=torch.long, device=device)
                images[index[:, 0], index[:, 1]] = batch
    return failed
