"""Data: on-disk sample formats, tokenizer and media tokens, samples -> tokens and labels, packing,
the streaming loader.

Imports no `models` or `engine` (docs/architecture.md).
"""

from mmtrain.data.batching import Layout, Packer, collate
from mmtrain.data.documents import build_document, build_pair
from mmtrain.data.episodes import (
    IGNORE_INDEX,
    TEMPLATES,
    Prompt,
    Sample,
    build_prompt,
    build_sample,
    otter_labels,
    render_text,
)
from mmtrain.data.formats import BadSample, FormatError, ShardWriter, read_manifest, validate_document, validate_episode
from mmtrain.data.images import ImageSpec, decode_image
from mmtrain.data.patches import PatchSpec, image_to_patches
from mmtrain.data.stream import TrainLoader, build_train_loader, iter_eval_prompts, iter_shard_samples
from mmtrain.data.tokenizer import MEDIA_TOKENS, TokenIds, load_tokenizer, train_tiny_tokenizer

__all__ = [
    "BadSample", "FormatError", "IGNORE_INDEX", "ImageSpec", "Layout", "MEDIA_TOKENS", "Packer", "PatchSpec", "Prompt",
    "Sample", "ShardWriter", "TEMPLATES", "TokenIds", "TrainLoader", "build_document", "build_pair", "build_prompt",
    "build_sample", "build_train_loader", "collate", "decode_image", "image_to_patches", "iter_eval_prompts",
    "iter_shard_samples", "load_tokenizer", "otter_labels", "read_manifest", "render_text", "train_tiny_tokenizer",
    "validate_document", "validate_episode",
]
