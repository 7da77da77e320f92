"""Device memory and time of `data.image_decode: device` per micro-batch (mmtrain/data/device_decode.py).

    python3 -m bench.device_decode --out bench/results/device_decode_h100.json

For each JPEG size, 48 pictures (smooth colour fields plus noise, q90, as tests/jpeg_samples.py
makes them) are decoded into an [8, 6, 3, 224, 224] uint8 batch on the GPU, as the training process
does for each micro-batch: peak device memory above the batch (torch.cuda.max_memory_allocated)
and wall time, synchronised, after one warm-up call. Needs CUDA.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import time
from typing import Any, Dict, List, Optional

SIZES_PX = ((512, 384), (1024, 768), (2048, 1536))
IMAGES = 48


def measure(width: int, height: int) -> Dict[str, Any]:
    import torch

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    from jpeg_samples import encode, picture

    from mmtrain.data.device_decode import decode_jpegs, jpeg_for_device, pack_jpegs
    from mmtrain.data.images import ImageSpec

    blobs = [encode(picture(i, size=(width, height)), quality=90) for i in range(IMAGES)]
    if not all(jpeg_for_device(b) for b in blobs):
        raise RuntimeError(f"{width}x{height}: the header check keeps these JPEGs in the workers")
    packed = pack_jpegs([(i // 6, i % 6) for i in range(IMAGES)], blobs)
    images = torch.zeros(IMAGES // 6, 6, 3, 224, 224, dtype=torch.uint8, device="cuda")
    spec = ImageSpec(size_px=224)
    decode_jpegs(images, packed, spec)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    decode_jpegs(images, packed, spec)
    torch.cuda.synchronize()
    return {"jpeg_px": [width, height], "images": IMAGES, "jpeg_bytes_mean": round(sum(map(len, blobs)) / IMAGES),
            "peak_mib_above_batch": round((torch.cuda.max_memory_allocated() - base) / 2**20, 1),
            "wall_ms": round((time.perf_counter() - start) * 1e3, 2)}


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(prog="python3 -m bench.device_decode", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    import torch
    import torchvision

    from mmtrain.data import device_decode

    result = {
        "what": __doc__.split("\n\n")[2].replace("\n", " "),
        "rows": [measure(w, h) for w, h in SIZES_PX],
        "decode_chunk_images": device_decode.DECODE_CHUNK_IMAGES,
        "resize_chunk_pixels": device_decode.RESIZE_CHUNK_PIXELS,
        "device": torch.cuda.get_device_name(),
        "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__},
        "command": shlex.join(["python3", "-m", "bench.device_decode", *(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    for row in result["rows"]:
        print(row)
    return result


if __name__ == "__main__":
    main()
