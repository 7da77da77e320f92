"""Data: on-disk sample format, tokenizer and media tokens, episodes -> tokens and labels, streaming loader.

Imports no `models` or `engine` (docs/architecture.md).
"""

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
from mmtrain.data.formats import BadSample, FormatError, ShardWriter, read_manifest, validate_episode
from mmtrain.data.images import ImageSpec, decode_image
from mmtrain.data.stream import TrainLoader, build_train_loader, collate, iter_eval_prompts, iter_shard_samples
from mmtrain.data.tokenizer import MEDIA_TOKENS, TokenIds, load_tokenizer, train_tiny_tokenizer

__all__ = [
    "BadSample", "FormatError", "IGNORE_INDEX", "ImageSpec", "MEDIA_TOKENS", "Prompt", "Sample", "ShardWriter",
    "TEMPLATES", "TokenIds", "TrainLoader", "build_prompt", "build_sample", "build_train_loader", "collate",
    "decode_image", "iter_eval_prompts", "iter_shard_samples", "load_tokenizer", "otter_labels", "read_manifest",
    "render_text", "train_tiny_tokenizer", "validate_episode",
]
