"""A tiny visual-question dataset in MIMIC-IT's raw layout, whose answers depend on the image.

Each image holds one shape (circle, square, triangle, cross) in one colour (red, green, blue,
yellow), inside one quadrant of the image at a random offset and size, on a light, mildly noisy
background. Questions, chosen uniformly: the colour, the quadrant ("top left", ...), or both
("<colour> <quadrant>"). The shape varies but is never asked: colour and position are what a tiny
model with a random frozen vision tower learns within the demo's minutes, while telling shapes
apart from such features takes it several times longer. A fraction of the episodes get 1-2
in-context examples: other instructions of the same set, each with its own image and its own
answer, so the target answer depends only on the target image.

Files written (prefix SHAPES by default), exactly what `mmtrain-data convert mimicit` reads:

    SHAPES_instructions.json   {"meta": {...}, "data": {"SHAPES_INS_000000": {...}, ...}}
    SHAPES.parquet             column `base64` (JPEG), index `id` = "SHAPES_IMG_000000", ...
    SHAPES_train.json          {ins_id: [in-context ins_ids]} for every instruction

`rel_ins_ids` of each instruction equals its train-config list, so `--in-context rel-ins` and the
train config give the same episodes. Everything is a pure function of the seed.
"""

from __future__ import annotations

import base64
import io
import json
import os
import random
from dataclasses import dataclass
from typing import Dict, List, Tuple

import numpy as np
from PIL import Image, ImageDraw

from . import DataToolError
from .mimicit import write_images_parquet

SHAPES = ("circle", "square", "triangle", "cross")
# Far apart in RGB and in hue, so each survives JPEG, resizing and the background noise.
COLORS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 40),
    "blue": (30, 70, 220),
    "yellow": (235, 200, 20),
}
# Quadrants, as (name, column, row) of the image's 2x2 grid.
POSITIONS = (("top left", 0, 0), ("top right", 1, 0), ("bottom left", 0, 1), ("bottom right", 1, 1))
QUESTION_COLOR = "What color is the shape?"
QUESTION_WHERE = "Where is the shape?"
QUESTION_DESCRIBE = "Describe the object."
QUESTIONS = (QUESTION_COLOR, QUESTION_WHERE, QUESTION_DESCRIBE)

# Shape extent as a fraction of the image side: it fits inside a quadrant with a margin, and is
# still ~9 px once resized to 32 px.
MIN_SIZE_FRACTION, MAX_SIZE_FRACTION = 0.28, 0.42
_SUPERSAMPLE = 2  # draw at 2x and downsample, for anti-aliased edges
NOISE_STD = 5.0
JPEG_QUALITY = 92


@dataclass(frozen=True)
class ShapeSpec:
    shape: str
    color: str
    position: str
    box: Tuple[int, int, int, int]  # left, top, right, bottom in output pixels (exclusive right/bottom)
    background: Tuple[int, int, int]


def answer_for(question: str, spec: ShapeSpec) -> str:
    if question == QUESTION_COLOR:
        return spec.color
    if question == QUESTION_WHERE:
        return spec.position
    return f"{spec.color} {spec.position}"


def random_spec(rng: random.Random, size_px: int) -> ShapeSpec:
    side = rng.randint(round(MIN_SIZE_FRACTION * size_px), round(MAX_SIZE_FRACTION * size_px))
    half = size_px // 2
    position, column, row = rng.choice(POSITIONS)
    left = column * half + rng.randint(1, half - side - 1)
    top = row * half + rng.randint(1, half - side - 1)
    grey = rng.randint(225, 250)
    background = tuple(min(255, grey + rng.randint(-6, 5)) for _ in range(3))
    box = (left, top, left + side, top + side)
    return ShapeSpec(rng.choice(SHAPES), rng.choice(list(COLORS)), position, box, background)


def render(spec: ShapeSpec, size_px: int, noise: np.random.Generator) -> Image.Image:
    s = _SUPERSAMPLE
    img = Image.new("RGB", (size_px * s, size_px * s), spec.background)
    draw = ImageDraw.Draw(img)
    left, top, right, bottom = (v * s for v in spec.box)
    right, bottom = right - 1, bottom - 1  # PIL boxes are inclusive
    fill = COLORS[spec.color]
    if spec.shape == "circle":
        draw.ellipse((left, top, right, bottom), fill=fill)
    elif spec.shape == "square":
        draw.rectangle((left, top, right, bottom), fill=fill)
    elif spec.shape == "triangle":  # upright, apex at the top centre
        draw.polygon([((left + right) / 2, top), (right, bottom), (left, bottom)], fill=fill)
    elif spec.shape == "cross":  # plus sign, arms a third of the extent wide
        w = (right - left) / 3
        draw.rectangle((left + w, top, right - w, bottom), fill=fill)
        draw.rectangle((left, top + w, right, bottom - w), fill=fill)
    else:
        raise ValueError(f"unknown shape {spec.shape!r}")
    img = img.resize((size_px, size_px), Image.Resampling.BOX)
    pixels = np.asarray(img, dtype=np.float32) + noise.normal(0.0, NOISE_STD, (size_px, size_px, 3)).astype(np.float32)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")


def jpeg_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def synth_shapes(
    out_dir: str,
    num_episodes: int,
    seed: int = 0,
    image_size_px: int = 64,
    context_fraction: float = 0.5,
    prefix: str = "SHAPES",
) -> Dict[str, str]:
    """Write the dataset; returns {"instructions", "images", "train_config"} paths."""
    if num_episodes < 1:
        raise DataToolError(f"--num-episodes {num_episodes}: must be at least 1")
    if image_size_px < 16:
        raise DataToolError(f"--image-size-px {image_size_px}: must be at least 16")
    if not 0.0 <= context_fraction <= 1.0:
        raise DataToolError(f"--context-fraction {context_fraction}: must be in [0, 1]")
    if not prefix or any(c in prefix for c in "./\\ "):
        raise DataToolError(f"--prefix {prefix!r}: must be non-empty with no '.', '/' or spaces")

    rng = random.Random(seed)
    noise = np.random.default_rng(seed)
    ins_ids = [f"{prefix}_INS_{i:06d}" for i in range(num_episodes)]
    image_ids = [f"{prefix}_IMG_{i:06d}" for i in range(num_episodes)]

    data: Dict[str, Dict] = {}
    train: Dict[str, List[str]] = {}
    b64s: List[str] = []
    for i in range(num_episodes):
        spec = random_spec(rng, image_size_px)
        question = rng.choice(QUESTIONS)
        context: List[str] = []
        if num_episodes > 1 and rng.random() < context_fraction:
            k = min(rng.randint(1, 2), num_episodes - 1)
            others = rng.sample(range(num_episodes - 1), k)  # indices into the ids other than i
            context = [ins_ids[j if j < i else j + 1] for j in others]
        b64s.append(base64.b64encode(jpeg_bytes(render(spec, image_size_px, noise))).decode("ascii"))
        data[ins_ids[i]] = {
            "instruction": question,
            "answer": answer_for(question, spec),
            "image_ids": [image_ids[i]],
            "rel_ins_ids": context,
        }
        train[ins_ids[i]] = context

    os.makedirs(out_dir, exist_ok=True)
    paths = {
        "instructions": os.path.join(out_dir, f"{prefix}_instructions.json"),
        "images": os.path.join(out_dir, f"{prefix}.parquet"),
        "train_config": os.path.join(out_dir, f"{prefix}_train.json"),
    }
    meta = {
        "version": "1",
        "time": f"synthetic seed={seed}",  # no wall clock: the files are a pure function of the options
        "author": "mmtrain-data synth shapes",
        "generator": {"num_episodes": num_episodes, "seed": seed, "image_size_px": image_size_px,
                      "context_fraction": context_fraction},
    }
    _write_json(paths["instructions"], {"meta": meta, "data": data})
    write_images_parquet(paths["images"], image_ids, b64s)
    _write_json(paths["train_config"], train)
    return paths


def _write_json(path: str, body) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(body, f, indent=1)
    os.replace(tmp, path)
