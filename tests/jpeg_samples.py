"""JPEG test data for the device-decode tests (tests/unit and tests/gpu): pictures with detail,
JPEGs damaged in known ways, and interleaved shards of them."""

import io
import json

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mmtrain.data.formats import ShardWriter


def picture(seed, size=(64, 48)):
    """Smooth colour fields plus noise: enough detail that two resize paths could disagree."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size[1], 0:size[0]]
    base = np.stack([x * 255 / size[0], y * 255 / size[1], (x + y) % 64 * 4], axis=-1)
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


def encode(array, fmt="JPEG", mode="RGB", **kw):
    out = io.BytesIO()
    Image.fromarray(array).convert(mode).save(out, format=fmt, **kw)
    return out.getvalue()


def segments(data):
    """(marker, offset, length) of the marker segments up to the first scan."""
    pos, found = 2, []
    while pos < len(data):
        marker, length = data[pos + 1], int.from_bytes(data[pos + 2:pos + 4], "big")
        found.append((marker, pos, length))
        if marker == 0xDA:
            return found
        pos += 2 + length
    return found


def without_segment(data, marker_to_drop):
    """The JPEG with every segment of this marker (before the first scan) removed."""
    for marker, pos, length in reversed(segments(data)):
        if marker == marker_to_drop:
            data = data[:pos] + data[pos + 2 + length:]
    return data


def without_quant_tables(data):
    """A JPEG whose headers look fine but that no decoder can decode (its DQT segments removed)."""
    return without_segment(data, 0xDB)


def with_unknown_scan_component(data):
    """A JPEG whose tables are all there but whose scan names a component the frame lacks."""
    (pos,) = [pos for marker, pos, _ in segments(data) if marker == 0xDA]
    return data[:pos + 5] + b"\x09" + data[pos + 6:]


def with_frame_size(data, width, height):
    """The same JPEG with its frame header claiming another size."""
    (pos,) = [pos for marker, pos, _ in segments(data) if marker in (0xC0, 0xC2)]
    return data[:pos + 5] + height.to_bytes(2, "big") + width.to_bytes(2, "big") + data[pos + 9:]


def full_size_reference(data, size):
    """What the device path computes, on the CPU: Pillow's full-size decode, the antialiased bicubic
    resize in float, rounded; uint8 [3, size, size]."""
    with Image.open(io.BytesIO(data)) as img:
        pixels = torch.from_numpy(np.asarray(img.convert("RGB")).copy()).permute(2, 0, 1)[None].float()
    resized = F.interpolate(pixels, size=(size, size), mode="bicubic", antialias=True)
    return resized.round().clamp(0, 255).to(torch.uint8)[0]


def write_docs(path, n, broken=None):
    """Interleaved documents of 1-3 pictures (some PNG). In `broken` ones the second picture is
    damaged as `broken[i]` says: "tables" (no quantisation tables) or "scan" (an unknown component)."""
    broken = broken or {}
    with ShardWriter(str(path), kind="interleaved", max_samples=4) as w:
        for i in range(n):
            images = {f"{j}.jpg": encode(picture(10 * i + j), quality=85 + j) for j in range(1 + i % 3)}
            if i % 5 == 4:  # a PNG among them: decoded by the workers in either mode
                images["0.jpg"] = encode(picture(10 * i), fmt="PNG")
            if i in broken:
                damage = without_quant_tables if broken[i] == "tables" else with_unknown_scan_component
                images["1.jpg"] = damage(images.get("1.jpg", encode(picture(0), quality=90)))
            parts = [{"text": f"Document {i}."}]
            for name in images:
                parts += [{"image": name}, {"text": f"About {name} of document {i}, in a few words."}]
            w.write(f"d{i:04d}", {"json": json.dumps({"id": f"doc{i:03d}", "parts": parts}).encode(), **images})
    return str(path)
