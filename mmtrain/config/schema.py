"""The typed schema of a run: one dataclass per recipe section.

A recipe (YAML) is merged on top of these defaults by :mod:`mmtrain.config.load`, then overrides
from the command line. Every field carries a docstring (unit and meaning); `mmtrain validate`
and docs/recipes.md are built from them. Cross-field checks live in :func:`check`, which names
the dotted key to change. This module imports no torch: validating a recipe must stay cheap.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING, ListConfig


class ConfigError(ValueError):
    """A recipe or override is wrong; the message names the dotted key and the fix."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"{key}: {message}")


@dataclass
class ModelConfig:
    name: str = MISSING
    """Registry name of the model flavour (`mmtrain ls` lists them), e.g. `otter-tiny`."""
    tokenizer: str = MISSING
    """Hub id or local directory of the tokenizer; media tokens are added when missing."""
    pretrained: Optional[str] = None
    """Directory written by `mmtrain export` to start from; None builds the flavour with random weights."""
    init_from: Optional[Any] = None
    """Published checkpoint to start from: a directory with HF safetensors (`model.safetensors.index.json`
    and its shards, or one `model.safetensors`, e.g. a download of HuggingFaceM4/idefics-9b or
    adept/fuyu-8b, or an `mmtrain export`), or one .safetensors file. Streamed in one parameter at a
    time after the model is built (rank 0 reads; under ZeRO-3 no rank holds the whole model); keys
    go through the family's published layout; missing, unexpected or mis-shaped keys are an error
    listing them; an added-token table shorter in the file (IDEFICS has 2 rows) keeps fresh rows
    beyond it (logged). Not with `pretrained`; a resumed checkpoint replaces these weights.
    A list of sources is applied in order (a later one's parameter replaces an earlier one's) and
    together they must give every parameter (missing keys are reported over all of them); each is
    safetensors or a torch state dict (`.pt`/`.bin`, or a directory with `pytorch_model.bin[.index.json]`;
    read with `torch.load(mmap=True, weights_only=True)`). OpenFlamingo (`openflamingo-9b`, `-9b-llama`):
    `[<base LM dir, e.g. mosaicml/mpt-7b>, <open_clip ViT-L/14 state dict>, <OpenFlamingo checkpoint.pt>]`;
    Otter (`otter-9b`, `-9b-mpt`): its HF release directory. Their token tables (base + added rows)
    fill our base and added-token tables by rows."""
    trainable: Optional[List[str]] = None
    """Parameter groups that train; every other group is frozen (`mmtrain validate` shows both).
    Unset: the flavour's default (Otter/IDEFICS: perceiver, cross_attn, new_tokens; Fuyu: all)."""
    attention: str = "auto"
    """Decoder attention kernel: auto (flash-attn 2 when it is installed, the model supports it and
    the run is bf16 on CUDA; else PyTorch SDPA, which picks cuDNN, flash or memory-efficient kernels
    itself), or one of sdpa, eager, flash_attention_2. The choice is logged at start-up."""
    activation_checkpointing: bool = True
    """Recompute decoder and cross-attention blocks in backward instead of storing their activations."""
    overrides: Dict[str, Any] = field(default_factory=dict)
    """Flavour fields to replace (e.g. `{num_layers: 2}`); unknown names are an error at build time."""


@dataclass
class DataSource:
    name: str = MISSING
    """Label of the source in logs and metrics."""
    path: str = MISSING
    """Directory holding the webdataset shards and their manifest.json."""
    kind: str = "mimicit"
    """Sample kind stored in the shards: mimicit (instruction episodes), interleaved (MMC4, OBELICS
    documents) or pairs (img2dataset image-caption shards); see docs/formats.md."""
    weight: float = 1.0
    """Relative sampling weight in the mixture."""


@dataclass
class DataConfig:
    sources: List[DataSource] = field(default_factory=list)
    """Training sources, mixed by weight."""
    eval_path: Optional[str] = None
    """Shard directory of held-out samples for `eval.every_steps` and `mmtrain eval`."""
    template: str = "simple"
    """Token layout: simple (Otter) or llama2 for Flamingo models (documents use OpenFlamingo's rule),
    idefics (IDEFICS' fake tokens around images), fuyu (patch rows before <s>, Fuyu/OtterHD)."""
    max_seq_tokens: int = 2048
    """Tokens per sequence (a packed row holds several samples up to this many)."""
    max_images: int = 5
    """Images per sequence (and per packed row); episodes drop their oldest in-context turns to fit,
    documents are cut before the next image."""
    max_doc_images: int = 64
    """Documents with more images than this are skipped as `too_many_images` (galleries, spam)."""
    max_frames: int = 8
    """Frames kept per video (evenly spread), each an image of the sequence."""
    packing: bool = False
    """Pack several samples into each row (first-fit, none split); attention stays inside each one."""
    image_min_px: int = 448
    """Variable-resolution models (Fuyu): the longer image side is scaled up to at least this."""
    image_max_px: int = 1024
    """Variable-resolution models (Fuyu): the longer image side is scaled down to at most this."""
    shuffle_buffer_samples: int = 256
    """Samples held in each worker's shuffle buffer."""
    num_workers: int = 0
    """DataLoader worker processes per rank (0 reads in the training process)."""


@dataclass
class OptimConfig:
    lr: float = 1e-4
    """Peak learning rate after warmup."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay for matrices; norms, biases, gates and embeddings get none."""
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW (beta1, beta2)."""
    eps: float = 1e-8
    """AdamW epsilon."""
    warmup_steps: int = 100
    """Optimizer steps of linear warmup from 0 to `lr`."""
    schedule: str = "cosine"
    """Decay after warmup: cosine, linear or constant."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of `lr` (cosine and linear)."""
    grad_clip_norm: float = 1.0
    """Global gradient-norm clip; 0 disables."""
    group_lr: Dict[str, float] = field(default_factory=dict)
    """Peak learning rate of particular trainable groups, overriding `lr` for them (e.g. a lower
    one for an unfrozen decoder: {decoder: 1.0e-5}); the schedule shapes every group alike."""


@dataclass
class TrainConfig:
    max_steps: int = 1000
    """Optimizer steps of the whole run; the learning-rate schedule spans them."""
    stop_at_step: Optional[int] = None
    """Checkpoint and exit once this step is reached (the schedule still spans max_steps): for a run
    split over time-limited jobs, each continuing with resume=auto."""
    micro_batch_size: int = 1
    """Sequences per rank per forward pass."""
    grad_accum_steps: Optional[int] = None
    """Micro-batches per optimizer step; derived from `global_batch_size` when that is set, else 1."""
    global_batch_size: Optional[int] = None
    """Sequences per optimizer step over all ranks (= micro_batch_size x grad_accum_steps x world size)."""
    precision: str = "bf16"
    """Parameter and compute dtype: bf16 or fp32 (the loss and softmax are always fp32)."""
    z_loss_weight: float = 1e-4
    """Weight of the z-loss, mean(logsumexp(logits)^2) over supervised tokens; 0 disables."""
    log_every_steps: int = 1
    """Optimizer steps between lines in train.log (metrics.jsonl gets every step)."""
    seed: int = 42
    """Seeds model initialisation (same on every rank) and data order."""


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 3
    """ZeRO stage 0-3."""
    offload_optimizer: bool = False
    """Keep optimizer states on the host (ZeRO-Offload); needs zero_stage >= 2."""
    offload_params: bool = False
    """Keep parameters on the host between uses; needs zero_stage 3."""
    overlap_comm: bool = True
    """Overlap ZeRO communication with compute."""
    reduce_bucket_elements: int = 50_000_000
    """Elements per gradient reduce bucket."""
    prefetch_bucket_elements: int = 50_000_000
    """Elements of parameters prefetched ahead of use under ZeRO-3."""
    param_persistence_threshold_elements: int = 100_000
    """Parameters smaller than this stay gathered under ZeRO-3 (fewer, larger collectives)."""
    extra: Dict[str, Any] = field(default_factory=dict)
    """Raw keys merged last into the generated DeepSpeed JSON, for settings the schema lacks."""


@dataclass
class CheckpointConfig:
    every_steps: int = 500
    """Optimizer steps between checkpoints; 0 saves only at the end."""
    keep_last: int = 2
    """Complete checkpoints kept; older ones are deleted after a newer one completes."""


@dataclass
class EvalConfig:
    every_steps: int = 0
    """Optimizer steps between evaluations on data.eval_path; 0 evaluates only at the end (if eval_path is set)."""
    max_samples: int = 200
    """Held-out samples per evaluation."""
    max_new_tokens: int = 16
    """Tokens generated per answer."""


@dataclass
class DistConfig:
    timeout_s: int = 600
    """Collective timeout: a rank that waits longer raises instead of hanging."""


@dataclass
class RunConfig:
    run_name: str = "run"
    """Name of the run directory under output_dir."""
    output_dir: str = "runs"
    """Parent directory of run directories."""
    resume: str = "none"
    """none, auto (newest complete checkpoint of this run, if any) or a checkpoint directory."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    dist: DistConfig = field(default_factory=DistConfig)


CHOICES = {
    "train.precision": ("bf16", "fp32"),
    "optim.schedule": ("cosine", "linear", "constant"),
    "data.template": ("simple", "llama2", "idefics", "fuyu"),
}


def check(cfg: RunConfig) -> List[str]:
    """Cross-field checks. Raises ConfigError on a conflict; returns warnings for settings with no effect."""
    warnings: List[str] = []
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            raise ConfigError(key, f"{value!r} is not one of {', '.join(allowed)}")
    positive = {
        "train.max_steps": cfg.train.max_steps,
        "train.micro_batch_size": cfg.train.micro_batch_size,
        "data.max_seq_tokens": cfg.data.max_seq_tokens,
        "data.max_images": cfg.data.max_images,
        "data.max_doc_images": cfg.data.max_doc_images,
        "data.max_frames": cfg.data.max_frames,
        "data.image_min_px": cfg.data.image_min_px,
        "data.shuffle_buffer_samples": cfg.data.shuffle_buffer_samples,
        "checkpoint.keep_last": cfg.checkpoint.keep_last,
        "dist.timeout_s": cfg.dist.timeout_s,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(key, f"must be at least 1, got {value}")
    non_negative = {
        "optim.lr": cfg.optim.lr,
        "optim.weight_decay": cfg.optim.weight_decay,
        "optim.warmup_steps": cfg.optim.warmup_steps,
        "optim.grad_clip_norm": cfg.optim.grad_clip_norm,
        "train.z_loss_weight": cfg.train.z_loss_weight,
        "checkpoint.every_steps": cfg.checkpoint.every_steps,
        "eval.every_steps": cfg.eval.every_steps,
        "data.num_workers": cfg.data.num_workers,
    }
    for key, value in non_negative.items():
        if value < 0:
            raise ConfigError(key, f"must be >= 0, got {value}")
    if len(cfg.optim.betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.optim.betas):
        raise ConfigError("optim.betas", f"needs two values in [0, 1), got {list(cfg.optim.betas)}")
    if not 0.0 <= cfg.optim.min_lr_ratio <= 1.0:
        raise ConfigError("optim.min_lr_ratio", f"must be in [0, 1], got {cfg.optim.min_lr_ratio}")
    if cfg.optim.warmup_steps > cfg.train.max_steps:
        raise ConfigError(
            "optim.warmup_steps",
            f"{cfg.optim.warmup_steps} exceeds train.max_steps={cfg.train.max_steps}; the schedule would never leave warmup",
        )
    if cfg.deepspeed.zero_stage not in (0, 1, 2, 3):
        raise ConfigError("deepspeed.zero_stage", f"must be 0, 1, 2 or 3, got {cfg.deepspeed.zero_stage}")
    if cfg.deepspeed.offload_params and cfg.deepspeed.zero_stage != 3:
        raise ConfigError("deepspeed.offload_params", "needs deepspeed.zero_stage=3")
    if cfg.deepspeed.offload_optimizer and cfg.deepspeed.zero_stage < 2:
        raise ConfigError("deepspeed.offload_optimizer", "needs deepspeed.zero_stage >= 2")
    if cfg.resume not in ("none", "auto") and not cfg.resume:
        raise ConfigError("resume", "use none, auto or a checkpoint directory")
    if cfg.model.pretrained and cfg.model.init_from:
        raise ConfigError("model.init_from", "set either model.init_from or model.pretrained, not both")
    init_from = cfg.model.init_from
    if init_from is not None and not isinstance(init_from, str) and (
        not isinstance(init_from, (list, tuple, ListConfig)) or not init_from
        or not all(isinstance(p, str) and p for p in init_from)
    ):
        raise ConfigError("model.init_from", f"a path or a non-empty list of paths, got {init_from!r}")
    if not cfg.data.sources:
        raise ConfigError("data.sources", "at least one source is needed (name, path, kind, weight)")
    names = [s.name for s in cfg.data.sources]
    if len(set(names)) != len(names):
        raise ConfigError("data.sources", f"source names must be unique, got {names}")
    for i, source in enumerate(cfg.data.sources):
        if source.weight <= 0:
            raise ConfigError(f"data.sources[{i}].weight", f"must be > 0, got {source.weight}")
    if cfg.model.trainable is not None and not cfg.model.trainable:
        raise ConfigError("model.trainable", "nothing would train; list at least one parameter group")
    if cfg.model.trainable and len(set(cfg.model.trainable)) != len(cfg.model.trainable):
        raise ConfigError("model.trainable", f"has duplicates: {list(cfg.model.trainable)}")
    if cfg.train.stop_at_step is not None and not 1 <= cfg.train.stop_at_step <= cfg.train.max_steps:
        raise ConfigError("train.stop_at_step", f"must be in [1, train.max_steps={cfg.train.max_steps}], got {cfg.train.stop_at_step}")
    if cfg.checkpoint.every_steps > cfg.train.max_steps:
        warnings.append(
            f"checkpoint.every_steps={cfg.checkpoint.every_steps} exceeds train.max_steps={cfg.train.max_steps}: "
            "only the final checkpoint is written"
        )
    if cfg.eval.every_steps and not cfg.data.eval_path:
        warnings.append("eval.every_steps is set but data.eval_path is not: no evaluation will run")
    return warnings


def derive_batch(cfg: RunConfig, world_size: int) -> Dict[str, int]:
    """Resolve micro-batch, accumulation and global batch for a world size (one source of truth).

    Exactly one of train.grad_accum_steps and train.global_batch_size may be given; when neither is,
    accumulation is 1. Raises ConfigError when the global batch does not divide evenly.
    """
    micro = cfg.train.micro_batch_size
    accum, global_batch = cfg.train.grad_accum_steps, cfg.train.global_batch_size
    if accum is not None and global_batch is not None:
        if accum * micro * world_size != global_batch:
            raise ConfigError(
                "train.global_batch_size",
                f"{global_batch} conflicts with train.grad_accum_steps={accum} x micro_batch_size={micro} "
                f"x world size {world_size} = {accum * micro * world_size}; set only one of the two",
            )
    elif global_batch is not None:
        if global_batch % (micro * world_size):
            raise ConfigError(
                "train.global_batch_size",
                f"{global_batch} is not a multiple of micro_batch_size={micro} x world size {world_size}",
            )
        accum = global_batch // (micro * world_size)
    else:
        accum = accum if accum is not None else 1
    if accum < 1:
        raise ConfigError("train.grad_accum_steps", f"must be at least 1, got {accum}")
    return {
        "world_size": world_size,
        "micro_batch_size": micro,
        "grad_accum_steps": accum,
        "global_batch_size": micro * accum * world_size,
    }
