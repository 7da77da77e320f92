"""`mmtrain plan`: per-GPU memory of a recipe under ZeRO stages 0-3 and offload, and the cheapest
configuration that fits a given GPU.

The arithmetic (everything below `count_model`) needs no torch: it works on :class:`ModelCounts`,
which `count_model` fills by building the flavour on the meta device (no memory is allocated; the
80B flavour builds in seconds). All sizes are bytes unless a name says `_gib`.

What one rank holds on its GPU, for N = gpus x nodes ranks, P parameters of which P_t train,
w = 2 B (bf16; 4 B in fp32) per weight or gradient element and o = 12 B of Adam state per trainable
parameter (fp32 master, m, v; 8 B in fp32, where the weight is its own master):

  stage  weights           gradients      optimizer    communication buffers
  0      w P               w P_t          o P_t        w reduce_bucket
  1      w P               w P_t          o P_t / N    w (reduce + allgather) x 4.5 with overlap_comm
  2      w P               w P_t / N      o P_t / N    as stage 1
  3      w P / N           w P_t / N      o P_t / N    w reduce x (2 with overlap_comm)
         + w P_persist (1 - 1/N): parameters of at most `param_persistence_threshold_elements`
           elements stay gathered on every rank
         + w (largest module + prefetch bucket): the gathered layer and what is prefetched behind it
         + w (largest trainable module): its full gradient before the reduce-scatter

Adam in mixed precision is thus 16 B per trainable parameter (2 + 2 + 12) before partitioning, and a
frozen parameter 2 B. 4.5 is DeepSpeed's documented footprint of `overlap_comm` at stages 1-2 (its
double-buffered gradient and all-gather buckets); each bucket is capped at the parameters it can
hold. Optimizer offload (stage >= 2) moves the Adam state and DeepSpeed's fp32 gradient partition
to the host, with one more 16-bit buffer (w B per element): 18 B x P_t / N per rank in bf16, laid
out in the partitions DeepSpeed makes (one per AdamW group at stage 2, its sub-groups at stage 3;
`offload_partitions`), and leaves only the buckets on the GPU for gradients. The pinned ones among
those buffers (`offload_host_bytes`) take a power of two bytes each, as torch's pinned allocator
rounds them; for IDEFICS-9B on one rank that is 2.7 GB on top of 28.1. Parameter offload (stage 3)
moves the weight partitions to the host too (w P / N per rank there; their rounding is not counted).

Activations (see :func:`activation_bytes`) come from the recipe's micro-batch, `data.max_seq_tokens`,
`data.max_images` and `model.activation_checkpointing`. On top, every configuration gets a CUDA
context and library workspace allowance (CONTEXT_GIB) and 5% for allocator fragmentation, and a
configuration fits when that total stays under (1 - HEADROOM) of the GPU's memory.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from mmtrain.config.schema import ConfigError

GIB = 2**30
ADAM_STATE_BYTES_MIXED = 12  # fp32 master + m + v
ADAM_STATE_BYTES_FP32 = 8  # m + v; the fp32 weight is its own master
OVERLAP_COMM_FACTOR_Z12 = 4.5  # DeepSpeed's docs: overlap_comm costs 4.5x the buckets at stages 1-2
CONTEXT_GIB = 1.0  # CUDA context, cuBLAS/cuDNN workspaces, NCCL buffers
FRAGMENTATION = 0.05  # caching-allocator slack on top of what the tensors need
HEADROOM = 0.10  # recommend only what leaves this share of the GPU free
LOSS_BYTES_PER_LOGIT = 2 + 4 + 4  # bf16 logits, their fp32 copy for the loss, its fp32 gradient
DEFAULT_ALLGATHER_BUCKET_ELEMENTS = 500_000_000  # DeepSpeed's default; the recipe sets it via deepspeed.extra
DEFAULT_SUB_GROUP_ELEMENTS = 1_000_000_000  # DeepSpeed ZeRO-3's default sub_group_size; the same way
MAX_MICRO_BATCH = 1024

# Cheapest first: lowest stage, then no offload before optimizer offload before parameter offload.
CANDIDATES: Tuple[Tuple[int, bool, bool], ...] = (
    (0, False, False), (1, False, False), (2, False, False), (3, False, False),
    (2, True, False), (3, True, False), (3, True, True),
)


@dataclass(frozen=True)
class ActivationShape:
    """The sizes the activation estimate needs, read from the flavour's config."""

    hidden_size: int
    num_layers: int
    """Decoder layers."""
    num_cross_attn_layers: int
    """Gated cross-attention blocks (counted as decoder-sized layers); 0 for Fuyu."""
    kv_hidden_size: int
    """num_key_value_heads x head_dim."""
    mlp_elements_per_token: int
    """Stored MLP elements per token: 4 x intermediate (SwiGLU: gate, up, act, product) or
    2 x intermediate (GELU / squared ReLU: fc1 output and activation)."""
    num_heads: int
    vocab_size: int
    attention_stores_scores: bool
    """Eager attention (or MPT's, which has no other kernel) keeps heads x seq^2 scores and probabilities."""
    vision_width: int = 0
    vision_layers: int = 0
    vision_mlp_ratio: float = 4.0
    vision_tokens_per_image: int = 0
    perceiver_layers: int = 0
    perceiver_ff_mult: int = 4
    perceiver_latents: int = 0


@dataclass(frozen=True)
class ModelCounts:
    """Parameter counts of a recipe's model, as `count_model` finds them on the meta device."""

    flavour: str
    groups: Dict[str, Tuple[int, int]]
    """Parameter group → (parameters, trainable parameters) under the recipe's `model.trainable`."""
    largest_module_params: int
    """Most parameters held directly by one module: what ZeRO-3 gathers at once (the embedding
    table or LM head, usually)."""
    largest_trainable_module_params: int
    persistent_params: int
    """Parameters in tensors of at most the recipe's persistence threshold (kept whole under ZeRO-3)."""
    shape: ActivationShape
    vision_trainable: bool = False
    perceiver_trainable: bool = False
    adamw_group_numels: Tuple[Tuple[int, ...], ...] = ()
    """Per AdamW group (mmtrain.engine.optim.adamw_param_groups), its trainable parameters' sizes in
    order: how DeepSpeed lays out the host partitions under optimizer offload. Empty: one group of
    one tensor."""

    @property
    def total_params(self) -> int:
        return sum(total for total, _ in self.groups.values())

    @property
    def trainable_params(self) -> int:
        return sum(trainable for _, trainable in self.groups.values())

    @property
    def frozen_params(self) -> int:
        return self.total_params - self.trainable_params


@dataclass(frozen=True)
class Workload:
    """What the recipe asks of each rank, apart from the model."""

    micro_batch_size: int
    seq_tokens: int
    images_per_seq: int
    activation_checkpointing: bool = True
    checkpoint_every_n_layers: int = 1
    precision: str = "bf16"
    reduce_bucket_elements: int = 50_000_000
    prefetch_bucket_elements: int = 50_000_000
    allgather_bucket_elements: int = DEFAULT_ALLGATHER_BUCKET_ELEMENTS
    overlap_comm: bool = True
    sub_group_elements: int = DEFAULT_SUB_GROUP_ELEMENTS
    pinned_upload: bool = True


@dataclass(frozen=True)
class Estimate:
    """One configuration's per-GPU bytes by component, and per-rank host bytes."""

    zero_stage: int
    offload_optimizer: bool
    offload_params: bool
    micro_batch_size: int
    gpu_bytes: Dict[str, float]
    host_bytes_per_rank: float

    @property
    def gpu_total_bytes(self) -> float:
        return sum(self.gpu_bytes.values())

    @property
    def offload(self) -> str:
        if self.offload_params:
            return "optimizer+params"
        return "optimizer" if self.offload_optimizer else "none"


# --- model counting (imports torch) ---------------------------------------------------------------

def activation_shape(config: Any, attention: str) -> ActivationShape:
    """Sizes for the activation estimate from a flavour's config dataclass: its `decoder` section
    (transformers field names), and where the family has them, `vision` (a ViT), `perceiver` and
    gated cross-attention blocks (`cross_attn_layer_indices`). The vocabulary is what the model's
    LM head has (bound from the token ids)."""
    dec = config.decoder
    heads = dec.num_attention_heads
    head_dim = dec.hidden_size // heads
    kv_heads = getattr(dec, "num_key_value_heads", heads) or heads
    kind = getattr(dec, "kind", None)
    # Squared ReLU (Persimmon) and MPT's GELU MLP are two-matrix MLPs; LLaMA's SwiGLU has three.
    gated = getattr(dec, "hidden_act", "silu") not in ("relu2", "gelu") and kind != "mpt"
    vocab = getattr(config, "vocab_size", None) or (
        (getattr(config, "base_vocab_size", None) or 0) + (getattr(config, "num_added_tokens", None) or 0))
    cross_layers = len(config.cross_attn_layer_indices()) if hasattr(config, "cross_attn_layer_indices") else 0
    vision = getattr(config, "vision", None)
    perceiver = getattr(config, "perceiver", None)
    return ActivationShape(
        hidden_size=dec.hidden_size,
        num_layers=dec.num_hidden_layers,
        num_cross_attn_layers=cross_layers,
        kv_hidden_size=kv_heads * head_dim,
        mlp_elements_per_token=(4 if gated else 2) * dec.intermediate_size,
        num_heads=heads,
        vocab_size=int(vocab),
        attention_stores_scores=attention == "eager",
        vision_width=vision.width if vision is not None else 0,
        vision_layers=vision.num_layers if vision is not None else 0,
        vision_mlp_ratio=float(vision.mlp_ratio) if vision is not None else 4.0,
        vision_tokens_per_image=vision.num_patches + 1 if vision is not None else 0,
        perceiver_layers=perceiver.depth if perceiver is not None else 0,
        perceiver_ff_mult=perceiver.ff_mult if perceiver is not None else 4,
        perceiver_latents=perceiver.num_latents if perceiver is not None else 0,
    )


def count_model(cfg, persistence_threshold_elements: Optional[int] = None) -> ModelCounts:
    """Build the recipe's model on the meta device (no memory) and count its parameters per group
    under the recipe's trainable set. The vocabulary is the flavour's published one (as `mmtrain ls`),
    since the recipe's tokenizer may be a hub id this machine cannot reach."""
    import torch

    from mmtrain.engine.offline import flavour_nominal_token_ids
    from mmtrain.engine.optim import adamw_param_groups, apply_freeze_policy, check_model_section
    from mmtrain.models.registry import build_model, get_spec

    _, trainable = check_model_section(cfg.model.name, cfg.model.trainable, cfg.optim.group_lr)
    spec = get_spec(cfg.model.name)
    overrides = dict(cfg.model.overrides or {})
    try:
        with torch.device("meta"):
            model = build_model(spec.name, overrides, flavour_nominal_token_ids(spec), init_deferred=False)
    except ValueError as e:
        raise ConfigError("model.overrides", str(e)) from None
    table = apply_freeze_policy(model, trainable)
    groups = {name: (row["num_params"], row["num_trainable"]) for name, row in table.items()}
    largest, largest_trainable = 0, 0
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        largest = max(largest, sum(p.numel() for p in own))
        largest_trainable = max(largest_trainable, sum(p.numel() for p in own if p.requires_grad))
    threshold = (cfg.deepspeed.param_persistence_threshold_elements
                 if persistence_threshold_elements is None else persistence_threshold_elements)
    persistent = sum(p.numel() for p in model.parameters() if p.numel() <= threshold)
    config = model.config
    return ModelCounts(
        flavour=spec.name,
        groups=groups,
        largest_module_params=largest,
        largest_trainable_module_params=largest_trainable,
        persistent_params=persistent,
        shape=activation_shape(config, cfg.model.attention),
        vision_trainable="vision" in trainable and hasattr(config, "vision"),
        perceiver_trainable="perceiver" in trainable and hasattr(config, "perceiver"),
        adamw_group_numels=tuple(tuple(p.numel() for p in group["params"])
                                 for group in adamw_param_groups(model, cfg.optim)),
    )


# --- arithmetic (no torch) -------------------------------------------------------------------------

def activation_bytes(counts: ModelCounts, work: Workload) -> float:
    """Activation bytes of one micro-batch on one rank.

    With T = micro_batch x seq tokens, h the hidden size, kv the key/value width and f the stored
    MLP elements per token (4 x intermediate for SwiGLU, 2 x for two-matrix MLPs), one decoder
    layer stores per token  A = 6h + 2kv + f  elements (norm inputs and outputs 4h, q/k/v h + 2kv,
    attention output h, the MLP's f), plus heads x seq x 2 for eager attention (scores and
    probabilities; flash/SDPA kernels keep only row statistics). Gated cross-attention blocks are
    counted as decoder layers. Over the decoder's L layers and X blocks:

      checkpointing off:  T (L + X) A
      checkpointing on:   T (L + X) h  (each layer's input)  +  T A  (one layer recomputed in backward)
      every n-th layer:   T (K h + (L + X - K) A + A),  K = ceil((L + X) / n) layers recomputed

    plus 2 T h for the embedding output and final norm, and the loss: micro_batch x seq x vocab
    x (2 + 4 + 4) B (bf16 logits, their fp32 copy, its fp32 gradient). The vision tower (ViT of
    width w, mlp ratio r, layers per image of p tokens: 8w + 2rw per token and layer) stores its
    layers only when it trains; frozen, it runs without autograd state, so one layer's working set
    is what it needs. The perceiver likewise, per image and layer (p + n) 3w (normed tokens and
    latents, keys, values) + n (8w + 2 ff w) (the n latents' queries, attention output, norms and
    feed-forward of ff_mult x w). Multiplied by 2 B per
    element (4 B in fp32). The decoder always stores: some parameter below its top trains in every
    recipe (cross-attention blocks, new token rows, or the decoder itself).
    """
    s = counts.shape
    element_bytes = 2 if work.precision == "bf16" else 4
    tokens = work.micro_batch_size * work.seq_tokens
    per_layer = 6 * s.hidden_size + 2 * s.kv_hidden_size + s.mlp_elements_per_token
    if s.attention_stores_scores:
        per_layer += 2 * s.num_heads * work.seq_tokens
    layers = s.num_layers + s.num_cross_attn_layers
    if work.activation_checkpointing:
        # Selective (every n-th layer recomputed): the others store all of theirs.
        recomputed = -(-layers // work.checkpoint_every_n_layers)
        decoder = tokens * (recomputed * s.hidden_size + (layers - recomputed) * per_layer + per_layer)
    else:
        decoder = tokens * layers * per_layer
    decoder += 2 * tokens * s.hidden_size
    images = work.micro_batch_size * work.images_per_seq
    vision = 0.0
    if s.vision_layers and images:
        w = s.vision_width
        per_vit_layer = images * s.vision_tokens_per_image * (8 * w + 2 * s.vision_mlp_ratio * w)
        vision = per_vit_layer * (s.vision_layers if counts.vision_trainable else 1)
        # Perceiver: the normed image tokens and latents with their keys and values (3w each), then
        # the latents' queries, attention output, norms and feed-forward (8w + 2 ff w).
        latents = s.perceiver_latents
        per_perceiver_layer = images * ((s.vision_tokens_per_image + latents) * 3 * w
                                        + latents * (8 * w + 2 * s.perceiver_ff_mult * w))
        vision += per_perceiver_layer * (s.perceiver_layers if counts.perceiver_trainable else 1)
    loss = work.micro_batch_size * work.seq_tokens * s.vocab_size * LOSS_BYTES_PER_LOGIT
    return (decoder + vision) * element_bytes + loss


def pinned_bytes(nbytes: int) -> int:
    """Host memory a pinned buffer of `nbytes` takes: torch's pinned allocator rounds every request up
    to a power of two bytes."""
    return 1 << (nbytes - 1).bit_length() if nbytes > 0 else 0


def offload_partitions(counts: ModelCounts, num_ranks: int, zero_stage: int, sub_group_elements: int) -> List[int]:
    """Elements of each fp32 partition one rank's host AdamW updates under optimizer offload. Stage 2:
    one per AdamW group, its flattened parameters split N ways. Stage 3: DeepSpeed's sub-groups, made
    per AdamW group from each parameter's 1/N share (rounded up), in order, a sub-group closing at the
    first parameter that brings it to `sub_group_size` (one sub-group where the group is no larger)."""
    groups = counts.adamw_group_numels or ((counts.trainable_params,),)
    parts: List[int] = []
    for numels in groups:
        if zero_stage < 3:
            parts.append(-(-sum(numels) // num_ranks))
            continue
        shares = [-(-numel // num_ranks) for numel in numels]
        if sum(shares) <= sub_group_elements:
            parts.append(sum(shares))
            continue
        open_elements = 0
        for share in shares:
            open_elements += share
            if open_elements >= sub_group_elements:
                parts.append(open_elements)
                open_elements = 0
        if open_elements:
            parts.append(open_elements)
    return [part for part in parts if part]


def offload_host_bytes(parts: Sequence[int], zero_stage: int, element_bytes: int, master_pinned: bool,
                       pinned=pinned_bytes) -> int:
    """One rank's host bytes under optimizer offload, for its fp32 partitions `parts`
    (`offload_partitions`), as DeepSpeed 0.19 allocates them with `offload_optimizer.pin_memory`
    (which mmtrain always sets): per partition the fp32 master weights, Adam's m and v (pageable),
    and the fp32 gradient (pinned); at stage 2 a pinned 16-bit copy of the weights per partition,
    at stage 3 one pinned 16-bit buffer of all the rank's gradient partitions. The stage-3 master is
    pinned where mmtrain's upload pins it (`master_pinned`); stage 2 pins it itself. `pinned` maps a
    pinned request to what it takes (identity on a CPU run, where nothing is pinned)."""
    total = 0
    for part in parts:
        fp32 = 4 * part
        total += 2 * fp32 + pinned(fp32)  # m and v; the gradient
        total += pinned(fp32) if (master_pinned or zero_stage < 3) else fp32
        if zero_stage < 3:
            total += pinned(element_bytes * part)
    if zero_stage == 3:
        total += pinned(element_bytes * sum(parts))
    return total


def estimate(counts: ModelCounts, work: Workload, num_ranks: int, zero_stage: int,
             offload_optimizer: bool = False, offload_params: bool = False) -> Estimate:
    """Per-GPU bytes of one configuration, by component (the rules in the module docstring)."""
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0-3, got {zero_stage}")
    if offload_optimizer and zero_stage < 2:
        raise ValueError("optimizer offload needs ZeRO stage >= 2")
    if offload_params and zero_stage != 3:
        raise ValueError("parameter offload needs ZeRO stage 3")
    n = num_ranks
    total, trainable = counts.total_params, counts.trainable_params
    w = 2 if work.precision == "bf16" else 4
    adam = ADAM_STATE_BYTES_MIXED if work.precision == "bf16" else ADAM_STATE_BYTES_FP32
    reduce_elements = min(work.reduce_bucket_elements, trainable)
    gpu: Dict[str, float] = {}
    gpu["weights"] = w * total / (n if zero_stage == 3 else 1)
    gpu["gradients"] = w * trainable / (n if zero_stage >= 2 else 1)
    gpu["optimizer"] = adam * trainable / (n if zero_stage >= 1 else 1)
    if zero_stage == 0:
        gpu["buffers"] = w * reduce_elements
    elif zero_stage in (1, 2):
        allgather_elements = min(work.allgather_bucket_elements, total)
        factor = OVERLAP_COMM_FACTOR_Z12 if work.overlap_comm else 1.0
        gpu["buffers"] = w * (reduce_elements + allgather_elements) * factor
    else:
        gpu["buffers"] = w * reduce_elements * (2 if work.overlap_comm else 1)
        gathered = min(counts.largest_module_params + work.prefetch_bucket_elements, total)
        gpu["gathered"] = w * (counts.persistent_params * (1 - 1 / n) + gathered
                               + counts.largest_trainable_module_params)
    host = 0.0
    if offload_optimizer:
        master_pinned = zero_stage == 3 and not offload_params and work.precision == "bf16" and work.pinned_upload
        host += offload_host_bytes(offload_partitions(counts, n, zero_stage, work.sub_group_elements),
                                   zero_stage, w, master_pinned)
        gpu["optimizer"] = 0.0
        gpu["gradients"] = 0.0
    if offload_params:
        host += gpu["weights"]
        gpu["weights"] = 0.0
    gpu["activations"] = activation_bytes(counts, work)
    gpu["allowance"] = CONTEXT_GIB * GIB + FRAGMENTATION * sum(gpu.values())
    return Estimate(zero_stage, offload_optimizer, offload_params, work.micro_batch_size, gpu, host)


@dataclass
class Plan:
    """What `mmtrain plan` reports: the estimates at the recipe's micro-batch, the recommendation
    (None when nothing fits) with its overrides, and, when nothing fits, what would."""

    counts: ModelCounts
    num_gpus: int
    num_nodes: int
    gpu_mem_gib: float
    host_mem_gib: Optional[float]
    global_batch_size: int
    table: List[Estimate]
    recommended: Optional[Estimate] = None
    grad_accum_steps: Optional[int] = None
    overrides: List[str] = field(default_factory=list)
    advice: List[str] = field(default_factory=list)

    @property
    def num_ranks(self) -> int:
        return self.num_gpus * self.num_nodes


def fits(est: Estimate, gpu_mem_gib: float, host_mem_gib: Optional[float], ranks_per_node: int) -> bool:
    """Under (1 - HEADROOM) of the GPU, and, when the host's memory is known, of the host for all
    of this node's ranks."""
    if est.gpu_total_bytes > (1 - HEADROOM) * gpu_mem_gib * GIB:
        return False
    if host_mem_gib is not None and est.host_bytes_per_rank * ranks_per_node > (1 - HEADROOM) * host_mem_gib * GIB:
        return False
    return True


def _micro_batches(global_batch_size: int, num_ranks: int) -> List[int]:
    """Powers of two, largest first, that keep the global batch whole: micro x accum x ranks = global."""
    out, micro = [], 1
    while micro <= MAX_MICRO_BATCH and micro * num_ranks <= global_batch_size:
        if global_batch_size % (micro * num_ranks) == 0:
            out.append(micro)
        micro *= 2
    return out[::-1]


def make_plan(counts: ModelCounts, work: Workload, num_gpus: int, gpu_mem_gib: float, global_batch_size: int,
              num_nodes: int = 1, host_mem_gib: Optional[float] = None, recipe_grad_accum: bool = False) -> Plan:
    """Estimate every candidate at the recipe's micro-batch, then recommend the first candidate (cheapest
    first: CANDIDATES) that fits at some power-of-two micro-batch, with the largest such micro-batch and
    the accumulation that keeps `global_batch_size`. With the recipe's checkpointing off and nothing
    fitting, checkpointing on is tried too."""
    if num_gpus < 1 or num_nodes < 1:
        raise ValueError(f"--gpus and --nodes must be >= 1, got {num_gpus} and {num_nodes}")
    if gpu_mem_gib <= 0:
        raise ValueError(f"--gpu-mem-gib must be > 0, got {gpu_mem_gib}")
    ranks = num_gpus * num_nodes
    table = [estimate(counts, work, ranks, *c) for c in CANDIDATES]
    plan = Plan(counts, num_gpus, num_nodes, gpu_mem_gib, host_mem_gib, global_batch_size, table)
    micros = _micro_batches(global_batch_size, ranks)
    if not micros:
        plan.advice.append(
            f"the recipe's global batch ({global_batch_size} sequences) is smaller than the {ranks} ranks, or not a "
            f"multiple of them: set train.global_batch_size to a multiple of {ranks}")
        return plan
    tries = [work] if work.activation_checkpointing else [work, dataclasses.replace(work, activation_checkpointing=True)]
    for attempt in tries:
        for stage, off_opt, off_par in CANDIDATES:
            for micro in micros:
                est = estimate(counts, dataclasses.replace(attempt, micro_batch_size=micro), ranks, stage, off_opt, off_par)
                if fits(est, gpu_mem_gib, host_mem_gib, num_gpus):
                    plan.recommended = est
                    plan.grad_accum_steps = global_batch_size // (micro * ranks)
                    plan.overrides = [
                        f"deepspeed.zero_stage={stage}",
                        f"deepspeed.offload_optimizer={str(off_opt).lower()}",
                        f"deepspeed.offload_params={str(off_par).lower()}",
                        f"train.micro_batch_size={micro}",
                        # Whichever of the two the recipe gave, state it so the batch stays as it was.
                        f"train.grad_accum_steps={plan.grad_accum_steps}" if recipe_grad_accum
                        else f"train.global_batch_size={global_batch_size}",
                    ]
                    if attempt.activation_checkpointing != work.activation_checkpointing:
                        plan.overrides.append("model.activation_checkpointing=true")
                    return plan
    plan.advice = _what_would_fit(counts, work, num_gpus, num_nodes, gpu_mem_gib, host_mem_gib)
    return plan


def _fits_somehow(counts: ModelCounts, work: Workload, ranks: int, gpus_per_node: int, gpu_mem_gib: float,
                  host_mem_gib: Optional[float]) -> Optional[Estimate]:
    for stage, off_opt, off_par in CANDIDATES:
        est = estimate(counts, work, ranks, stage, off_opt, off_par)
        if fits(est, gpu_mem_gib, host_mem_gib, gpus_per_node):
            return est
    return None


def _what_would_fit(counts: ModelCounts, work: Workload, num_gpus: int, num_nodes: int, gpu_mem_gib: float,
                    host_mem_gib: Optional[float]) -> List[str]:
    """Ways out when nothing fits at micro-batch 1, each checked with the same arithmetic."""
    smallest = dataclasses.replace(work, micro_batch_size=1, activation_checkpointing=True)
    advice = []
    no_offload = [c for c in CANDIDATES if not c[1]]
    ranks = num_gpus * num_nodes
    for more in (2, 4, 8, 16, 32, 64, 128):
        bigger = ranks * more
        for stage, off_opt, off_par in no_offload:
            if fits(estimate(counts, smallest, bigger, stage, off_opt, off_par), gpu_mem_gib, host_mem_gib, num_gpus):
                advice.append(f"more GPUs: {bigger} ranks of {gpu_mem_gib:g} GiB fit at ZeRO-{stage} without offload "
                              f"(--gpus/--nodes giving {bigger})")
                break
        else:
            continue
        break
    offloaded = estimate(counts, smallest, ranks, 3, True, True)
    if offloaded.gpu_total_bytes <= (1 - HEADROOM) * gpu_mem_gib * GIB:
        need_gib = offloaded.host_bytes_per_rank * num_gpus / GIB / (1 - HEADROOM)
        advice.append(f"offload: ZeRO-3 with optimizer and parameter offload fits the GPU but needs about "
                      f"{need_gib:.0f} GiB of host memory per node (--host-mem-gib {host_mem_gib:g} is less)"
                      if host_mem_gib is not None else
                      f"offload: ZeRO-3 with optimizer and parameter offload fits with about {need_gib:.0f} GiB of host "
                      "memory per node")
    seq = work.seq_tokens // 2
    while seq >= 64:
        est = _fits_somehow(counts, dataclasses.replace(smallest, seq_tokens=seq), ranks, num_gpus, gpu_mem_gib,
                            host_mem_gib)
        if est is not None:
            advice.append(f"shorter sequences: data.max_seq_tokens={seq} fits (recipe: {work.seq_tokens}) at ZeRO-"
                          f"{est.zero_stage}, offload {est.offload}, micro-batch 1")
            break
        seq //= 2
    if not advice:
        advice.append("nothing tried fits: freeze more parameter groups (model.trainable) or use larger GPUs")
    return advice


# --- output ----------------------------------------------------------------------------------------

COMPONENTS = ("weights", "gradients", "optimizer", "buffers", "gathered", "activations", "allowance")


def plan_text(plan: Plan) -> str:
    counts = plan.counts
    lines = [f"model {counts.flavour}: {counts.total_params:,} parameters, {counts.trainable_params:,} trainable, "
             f"{counts.frozen_params:,} frozen",
             f"{'group':<12} {'params':>16} {'trainable':>16}"]
    for name, (total, trainable) in counts.groups.items():
        lines.append(f"{name:<12} {total:>16,} {trainable:>16,}")
    micro = plan.table[0].micro_batch_size
    lines.append("")
    lines.append(f"per-GPU GiB at micro-batch {micro} on {plan.num_ranks} ranks ({plan.num_gpus} GPUs x "
                 f"{plan.num_nodes} nodes) of {plan.gpu_mem_gib:g} GiB; fits = under {100 * (1 - HEADROOM):.0f}%")
    header = f"{'zero':>4} {'offload':<17}" + "".join(f"{c:>12}" for c in COMPONENTS) + f"{'total':>9}{'host/rank':>11}  fits"
    lines.append(header)
    for est in plan.table:
        ok = fits(est, plan.gpu_mem_gib, plan.host_mem_gib, plan.num_gpus)
        cells = "".join(f"{est.gpu_bytes.get(c, 0.0) / GIB:>12.2f}" for c in COMPONENTS)
        lines.append(f"{est.zero_stage:>4} {est.offload:<17}{cells}{est.gpu_total_bytes / GIB:>9.2f}"
                     f"{est.host_bytes_per_rank / GIB:>11.2f}  {'yes' if ok else 'no'}")
    lines.append("")
    rec = plan.recommended
    if rec is None:
        lines.append(f"nothing fits {plan.num_ranks} x {plan.gpu_mem_gib:g} GiB. What would:")
        lines.extend(f"  - {a}" for a in plan.advice)
    else:
        lines.append(f"recommended: ZeRO-{rec.zero_stage}, offload {rec.offload}, micro-batch {rec.micro_batch_size}, "
                     f"grad accumulation {plan.grad_accum_steps} (global batch {plan.global_batch_size}): "
                     f"{rec.gpu_total_bytes / GIB:.2f} GiB per GPU"
                     + (f", {rec.host_bytes_per_rank * plan.num_gpus / GIB:.1f} GiB host per node"
                        if rec.host_bytes_per_rank else ""))
        lines.append("overrides: " + " ".join(plan.overrides))
    return "\n".join(lines)


def plan_dict(plan: Plan) -> Dict[str, Any]:
    def est_dict(est: Estimate) -> Dict[str, Any]:
        return {"zero_stage": est.zero_stage, "offload_optimizer": est.offload_optimizer,
                "offload_params": est.offload_params, "micro_batch_size": est.micro_batch_size,
                "gpu_gib": {k: v / GIB for k, v in est.gpu_bytes.items()}, "gpu_total_gib": est.gpu_total_bytes / GIB,
                "host_gib_per_rank": est.host_bytes_per_rank / GIB,
                "fits": fits(est, plan.gpu_mem_gib, plan.host_mem_gib, plan.num_gpus)}

    counts = plan.counts
    return {
        "model": counts.flavour,
        "params": {"total": counts.total_params, "trainable": counts.trainable_params, "frozen": counts.frozen_params,
                   "groups": {k: {"params": t, "trainable": tr} for k, (t, tr) in counts.groups.items()}},
        "num_gpus": plan.num_gpus, "num_nodes": plan.num_nodes, "gpu_mem_gib": plan.gpu_mem_gib,
        "host_mem_gib": plan.host_mem_gib, "global_batch_size": plan.global_batch_size,
        "table": [est_dict(e) for e in plan.table],
        "recommended": est_dict(plan.recommended) if plan.recommended else None,
        "grad_accum_steps": plan.grad_accum_steps,
        "overrides": plan.overrides,
        "advice": plan.advice,
    }


def workload_from_config(cfg) -> Workload:
    ds = cfg.deepspeed
    extra_zero = (ds.extra or {}).get("zero_optimization", {}) if isinstance(ds.extra, Mapping) else {}
    return Workload(
        micro_batch_size=cfg.train.micro_batch_size,
        seq_tokens=cfg.data.max_seq_tokens,
        images_per_seq=cfg.data.max_images,
        activation_checkpointing=cfg.model.activation_checkpointing,
        checkpoint_every_n_layers=cfg.model.checkpoint_every_n_layers,
        precision=cfg.train.precision,
        reduce_bucket_elements=ds.reduce_bucket_elements,
        prefetch_bucket_elements=ds.prefetch_bucket_elements,
        allgather_bucket_elements=int(extra_zero.get("allgather_bucket_size", DEFAULT_ALLGATHER_BUCKET_ELEMENTS)),
        overlap_comm=ds.overlap_comm,
        sub_group_elements=int(extra_zero.get("sub_group_size", DEFAULT_SUB_GROUP_ELEMENTS)),
        pinned_upload=ds.offload_pinned_upload,
    )


def run_plan(recipe: str, overrides: Sequence[str], num_gpus: int, gpu_mem_gib: float, num_nodes: int = 1,
             host_mem_gib: Optional[float] = None, as_json: bool = False) -> Tuple[int, str]:
    """`mmtrain plan`: (exit code, text to print). Exit 1 when nothing fits."""
    from mmtrain.config import load_config

    cfg, _ = load_config(recipe, list(overrides))
    ranks = num_gpus * num_nodes
    # The recipe's global batch stays; without one, its accumulation does (at the planned world size).
    global_batch = cfg.train.global_batch_size or cfg.train.micro_batch_size * (cfg.train.grad_accum_steps or 1) * ranks
    counts = count_model(cfg)
    plan = make_plan(counts, workload_from_config(cfg), num_gpus, gpu_mem_gib, global_batch, num_nodes=num_nodes,
                     host_mem_gib=host_mem_gib,
                     recipe_grad_accum=cfg.train.global_batch_size is None and cfg.train.grad_accum_steps is not None)
    text = json.dumps(plan_dict(plan), indent=1) if as_json else plan_text(plan)
    return (0 if plan.recommended else 1), text
