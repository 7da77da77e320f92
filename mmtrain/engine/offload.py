"""ZeRO-3 optimizer offload: the gradient clip folded into the host AdamW, and the upload of
updated weights from pinned host memory.

Under `deepspeed.offload_optimizer` DeepSpeed ZeRO-3 (0.19) keeps the fp32 master partitions in
ordinary pageable host memory and, after the CPU Adam update of each sub-group, copies them into the
GPU's bf16 partitions with one blocking `copy_`. torch does that cross-dtype copy by converting to a
fresh, pageable bf16 tensor on the host and uploading it from pageable memory. On one H100 with
IDEFICS-9B's 1.56B trainable parameters that upload took 356 ms of the 1.33 s that each optimizer
step adds under offload (torch.profiler: "Memcpy HtoD (Pageable -> Device)" at 8.7 GB/s;
bench/results/perf_idefics9b_1xh100_cap24gib_offload_ga2.json), more than the CPU Adam itself.

`install_pinned_upload(optimizer)` replaces that copy on one engine's optimizer. Each offloaded
sub-group's fp32 master partition is moved into pinned host memory when it is installed, before
training (the same bytes, now page-locked), and every update is uploaded from there as fp32 with
asynchronous copies, in chunks of UPLOAD_CHUNK_ELEMENTS, and rounded to bf16 on the GPU. The host thus neither converts (a pass over 6
bytes per parameter that took 84 ms per 400M parameters on 16 cores, bench/results/
host_adamw_h100host.json) nor waits for the transfer: the upload of one sub-group runs while the
host updates the next. The rounding is the same round-to-nearest-even the host did, so the weights
are bit-identical. The last sub-group waits for every upload, so when the step returns the GPU
weights are as current as before (other streams, e.g. the all-gather of persistent parameters, may
read them), and the host writes the masters again only in the next step. The master is then
page-locked: 4 bytes per trainable parameter of the rank that the OS can no longer swap out, each
sub-group's buffer rounded up to a power of two bytes by torch's pinned allocator (`mmtrain plan`
counts that slack; it is less than the bf16 staging buffers this replaced, which were rounded the
same way and came on top of the pageable master). Once freed (the engine gone), torch keeps those
blocks cached for later pinned requests rather than handing them back to the OS: one engine per
process, as a training run has, is what this is for. On the GPU it takes one chunk of fp32 at a time.

It changes nothing where the copy is not a host-to-GPU one (CPU runs, parameter offload, no
offload) and nothing on a DeepSpeed whose ZeRO-3 optimizer lacks the method it replaces.

`install_folded_clip(optimizer)`: before each sub-group's update, DeepSpeed ZeRO-3 multiplies its
fp32 gradients on the host by 1/(loss scale x clip factor), always, also when that factor is 1: one
more read and write of 8 bytes per trainable parameter (107 ms of the step on the H100 host above,
for 1.56B parameters). Where the host AdamW is torch's fused one, the factor goes to it instead, as
the `grad_scale` its kernel divides every gradient by while it reads it (the hook torch's GradScaler
uses), and is left out where it is 1. The factor itself is DeepSpeed's: its own method computes it,
on a one-element stand-in for the gradients. The update then differs from DeepSpeed's by the
rounding of x/s against x*(1/s) (one ulp of the gradient at most) where the clip acts, and not at
all where it does not.

`tune_offload` also sets each rank's host threads: torchrun leaves OMP_NUM_THREADS=1 in every rank
of a multi-rank host, which ran the host update on one thread (2x slower end to end on 2 H200,
docs/performance.md).
"""

from __future__ import annotations

import os
import socket
from types import SimpleNamespace
from typing import Dict, FrozenSet, List, Optional, Sequence, Tuple

import torch

from mmtrain.config.schema import DeepSpeedConfig

# The ZeRO-3 optimizer method replaced, and the attributes the replacement reads.
_METHOD = "_reassign_or_swap_out_partitioned_parameters"
_NEEDS = (_METHOD, "_unflatten_partitioned_parameters", "fp16_partitioned_groups_flat",
          "fp32_partitioned_groups_flat", "fp16_groups")


# Elements per asynchronous fp32 copy of the upload: the GPU holds one such chunk (128 MiB) at a
# time before rounding it into the bf16 partition.
UPLOAD_CHUNK_ELEMENTS = 1 << 25


def upload_rounded(high: torch.Tensor, low: torch.Tensor, chunk_elements: int) -> None:
    """Copy the flat `high` (fp32, on the host) into the flat `low` (lower precision, on `low`'s
    device), chunk by chunk: each chunk travels in `high`'s dtype (asynchronously, from pinned
    memory) and is rounded where `low` lives."""
    for start in range(0, high.numel(), chunk_elements):
        chunk = high[start:start + chunk_elements].to(low.device, non_blocking=True)
        low[start:start + chunk.numel()].copy_(chunk)


class _PinnedUpload:
    def __init__(self, optimizer) -> None:
        self.optimizer = optimizer
        self.original = getattr(optimizer, _METHOD)
        # Recorded after each upload; all go in order on the current stream, so when the last one
        # is done, every one is.
        self.last_upload: Optional[torch.cuda.Event] = None

    def applies(self, sub_group_id: int) -> bool:
        low = self.optimizer.fp16_partitioned_groups_flat[sub_group_id]
        high = self.optimizer.fp32_partitioned_groups_flat[sub_group_id]
        return (low is not None and low.is_cuda and high.device.type == "cpu"
                and low.dtype != high.dtype and low.numel() == high.numel())

    def __call__(self, sub_group_id: int) -> None:
        if self.applies(sub_group_id):
            self._upload(sub_group_id)
        else:
            self.original(sub_group_id)
        # DeepSpeed walks every sub-group in order (the step, checkpoint loads): after the last one
        # nothing of this step is still in flight, as with DeepSpeed's blocking copy.
        if sub_group_id == len(self.optimizer.fp16_groups) - 1 and self.last_upload is not None:
            self.last_upload.synchronize()

    def pin_masters(self) -> None:
        """Move every offloaded sub-group's fp32 master into pinned memory, before training: each
        briefly exists twice on the host while it is copied. Assigning .data keeps the tensor that
        the AdamW state, DeepSpeed's checkpoints and the reshard are keyed by."""
        for sub_group_id, high in enumerate(self.optimizer.fp32_partitioned_groups_flat):
            if self.applies(sub_group_id) and not high.is_pinned():
                high.data = high.data.pin_memory()

    def _upload(self, sub_group_id: int) -> None:
        low = self.optimizer.fp16_partitioned_groups_flat[sub_group_id]
        high = self.optimizer.fp32_partitioned_groups_flat[sub_group_id]
        upload_rounded(high.data, low.data, UPLOAD_CHUNK_ELEMENTS)
        if self.last_upload is None:
            self.last_upload = torch.cuda.Event()
        self.last_upload.record(torch.cuda.current_stream(low.device))
        self.optimizer._unflatten_partitioned_parameters(sub_group_id)


def install_pinned_upload(optimizer) -> bool:
    """Give a DeepSpeed ZeRO-3 optimizer the pinned, asynchronous upload described above, where it
    offloads the optimizer to the host of a CUDA run. Returns whether it was installed."""
    if not all(hasattr(optimizer, name) for name in _NEEDS):
        return False
    if not getattr(optimizer, "offload_optimizer", False) or not torch.cuda.is_available():
        return False
    upload = _PinnedUpload(optimizer)
    if not any(upload.applies(i) for i in range(len(optimizer.fp16_partitioned_groups_flat))):
        return False
    upload.pin_masters()
    setattr(optimizer, _METHOD, upload)
    return True


# The ZeRO-3 optimizer methods the folded clip replaces, and the attributes it reads.
_CLIP, _STEP = "unscale_and_clip_grads", "_optimizer_step"
_CLIP_NEEDS = (_CLIP, _STEP, "fp32_partitioned_groups_flat", "optimizer", "subgroup_to_device")


def _fused_torch_adamw(optimizer) -> bool:
    return isinstance(optimizer, torch.optim.AdamW) and bool(optimizer.defaults.get("fused"))


class _FoldedClip:
    def __init__(self, optimizer) -> None:
        self.optimizer = optimizer
        self.original_clip = getattr(optimizer, _CLIP)
        self.original_step = getattr(optimizer, _STEP)
        self.pending: Dict[int, float] = {}  # sub-group → the factor DeepSpeed would have multiplied by

    def applies(self, sub_group_id: int) -> bool:
        flat = self.optimizer.fp32_partitioned_groups_flat[sub_group_id]
        # Not under torch autocast's GradScaler, which sets grad_scale itself.
        return (self.optimizer.subgroup_to_device.get(sub_group_id) == "cpu" and flat.device.type == "cpu"
                and _fused_torch_adamw(self.optimizer.optimizer)
                and not getattr(self.optimizer, "torch_autocast_gradscaler", None))

    def clip(self, sub_group_id: int, total_norm) -> None:
        if not self.applies(sub_group_id):
            return self.original_clip(sub_group_id, total_norm)
        # DeepSpeed's own rule (loss scale, clip threshold, its epsilon), run on a stand-in.
        stand_in = SimpleNamespace(grad=torch.ones(1, dtype=torch.float64))
        flats = self.optimizer.fp32_partitioned_groups_flat
        real, flats[sub_group_id] = flats[sub_group_id], stand_in
        try:
            self.original_clip(sub_group_id, total_norm)
        finally:
            flats[sub_group_id] = real
        self.pending[sub_group_id] = float(stand_in.grad)

    def step(self, sub_group_id: int) -> None:
        factor = self.pending.pop(sub_group_id, None)
        adamw = self.optimizer.optimizer
        if factor is None or factor == 1.0:
            return self.original_step(sub_group_id)
        adamw.grad_scale = torch.tensor(1.0 / factor, dtype=torch.float32)
        try:
            self.original_step(sub_group_id)
        finally:
            del adamw.grad_scale


def install_folded_clip(optimizer) -> bool:
    """Fold a DeepSpeed ZeRO-3 optimizer's gradient clip into its host AdamW, as described above,
    where it offloads the optimizer to torch's fused AdamW. Returns whether it was installed."""
    if not all(hasattr(optimizer, name) for name in _CLIP_NEEDS):
        return False
    if not getattr(optimizer, "offload_optimizer", False) or not _fused_torch_adamw(optimizer.optimizer):
        return False
    folded = _FoldedClip(optimizer)
    if not any(folded.applies(i) for i in range(len(optimizer.fp32_partitioned_groups_flat))):
        return False
    setattr(optimizer, _CLIP, folded.clip)
    setattr(optimizer, _STEP, folded.step)
    return True


def host_threads(requested: int, sharing_ranks: int) -> int:
    """Threads for one rank's host AdamW (`deepspeed.offload_host_threads`): `requested` when set,
    else the cores this process may run on, shared among the ranks of this host that may run on
    them too (`ranks_sharing_cores`)."""
    if requested > 0:
        return requested
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, allowed // max(1, sharing_ranks))


def ranks_sharing_cores(mine: Tuple[str, FrozenSet[int]], everyone: Sequence[Tuple[str, FrozenSet[int]]]) -> int:
    """How many ranks (this one included) may run on some core this rank may run on: (hostname,
    allowed cores) of this rank against every rank's. One where the launcher bound each rank to its
    own cores (deepspeed --bind_cores_to_rank, srun's per-task binding); every rank of the host where
    they share the host's cores (torchrun) or one allocation (torchrun inside an sbatch job)."""
    host, cores = mine
    return max(1, sum(1 for other_host, other in everyone if other_host == host and other & cores))


def _sharing_ranks(local_world_size: int) -> int:
    """ranks_sharing_cores over the process group (one all_gather at start-up); without a group or
    an affinity mask, the host's ranks."""
    if not (hasattr(os, "sched_getaffinity") and torch.distributed.is_available() and torch.distributed.is_initialized()):
        return local_world_size
    mine = (socket.gethostname(), frozenset(os.sched_getaffinity(0)))
    everyone: List[Tuple[str, FrozenSet[int]]] = [None] * torch.distributed.get_world_size()  # type: ignore[list-item]
    torch.distributed.all_gather_object(everyone, mine)
    return ranks_sharing_cores(mine, everyone)


def tune_offload(engine, ds: DeepSpeedConfig, device: torch.device, local_world_size: int) -> Dict[str, object]:
    """What a run does after deepspeed.initialize where the recipe asks for optimizer offload: the
    folded clip (host AdamW `torch_fused`, the default), the pinned upload
    (`deepspeed.offload_pinned_upload`, the default) and, on GPU runs, the host threads
    (`deepspeed.offload_host_threads`; CPU runs keep the threads init_distributed gave them).
    Returns which are on and the threads set (None: left as they were)."""
    if not ds.offload_optimizer:
        return {"folded_clip": False, "pinned_upload": False, "host_threads": None}
    threads = None
    if device.type == "cuda":  # alike on every rank, so all or none take part in the gather
        sharing = _sharing_ranks(local_world_size) if ds.offload_host_threads == 0 else 1
        threads = host_threads(ds.offload_host_threads, sharing)
        torch.set_num_threads(threads)  # DeepSpeed's CPU Adam follows it too (the same OpenMP runtime)
    return {"folded_clip": install_folded_clip(engine.optimizer),
            "pinned_upload": ds.offload_pinned_upload and install_pinned_upload(engine.optimizer),
            "host_threads": threads}
