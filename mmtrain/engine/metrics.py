"""Run-directory logging on rank 0: metrics.jsonl (one object per optimizer step), guards.jsonl (one
object per guard decision other than ok), TensorBoard events under tb/, and train.log; on the
console a progress bar when stdout is a terminal, plain step lines otherwise. Other ranks get a
logger that only prints warnings and errors."""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import subprocess
import sys
from typing import Any, Dict, Optional, TextIO, Tuple

# Frozen-aware MFU needs the chip's dense bf16 peak; only chips we have numbers for get an MFU.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def library_versions() -> Dict[str, str]:
    """mmtrain, torch, DeepSpeed and transformers versions and the git SHA: what a run directory
    and every benchmark result record."""
    import deepspeed
    import torch
    import transformers

    from mmtrain import __version__

    out = {"mmtrain": __version__, "torch": torch.__version__, "deepspeed": deepspeed.__version__,
           "transformers": transformers.__version__}
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(__file__), timeout=5)
        if sha.returncode == 0:
            out["git_sha"] = sha.stdout.strip()
            # Measured code that differs from that commit says so (tracked files only).
            changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                     text=True, cwd=os.path.dirname(__file__), timeout=5)
            if changed.returncode == 0 and changed.stdout.strip():
                out["git_worktree"] = "modified"
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def peak_tflops() -> Optional[float]:
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return None


def max_memory_gib() -> Tuple[float, float]:
    """Peak host memory of this process (max RSS) and peak GPU memory allocated by torch (0 without
    a GPU), in GiB, since the process started."""
    import torch

    rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux
    gpu_gib = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    return rss_gib, gpu_gib


class _ConsoleHandler(logging.StreamHandler):
    """Console lines that leave a tqdm bar intact; a record logged with extra={"console": False}
    goes to train.log only (a step line while the bar shows the same numbers)."""

    def emit(self, record: logging.LogRecord) -> None:
        if not getattr(record, "console", True):
            return
        from tqdm import tqdm

        # Clears a bar on this stream, writes the line in one write (ranks share the stream), redraws.
        with tqdm.external_write_mode(file=self.stream):
            super().emit(record)


def setup_logging(run_dir: Optional[str], rank: int) -> logging.Logger:
    logger = logging.getLogger("mmtrain")
    logger.handlers.clear()
    logger.propagate = False
    fmt = logging.Formatter(f"%(asctime)s [rank{rank}] %(levelname)s %(message)s", "%H:%M:%S")
    stream = _ConsoleHandler(sys.stdout)
    stream.setFormatter(fmt)
    logger.addHandler(stream)
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    if run_dir is not None and rank == 0:
        handler = logging.FileHandler(os.path.join(run_dir, "train.log"))
        handler.setFormatter(fmt)
        logger.addHandler(handler)
    return logger


class MetricsWriter:
    """Appends to metrics.jsonl (so a resumed run continues the same file), eval.jsonl and TensorBoard."""

    def __init__(self, run_dir: str, tensorboard_dir: Optional[str] = None):
        self._run_dir = run_dir
        self._jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a")
        self._guards_jsonl: Optional[TextIO] = None
        self._eval_jsonl = open(os.path.join(run_dir, "eval.jsonl"), "a")
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(tensorboard_dir or os.path.join(run_dir, "tb"))

    def write(self, record: Dict[str, Any]) -> None:
        # A non-finite loss is written as null (strict JSON readers reject NaN); `guard` says why.
        record = _finite(record)
        self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")
        self._jsonl.flush()
        step = record["step"]
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self._tb.add_scalar(f"train/{key}", value, step)
            elif isinstance(value, dict):
                for sub, v in value.items():
                    if isinstance(v, (int, float)):
                        self._tb.add_scalar(f"train/{key}/{sub}", v, step)

    def write_guard_event(self, event: Dict[str, Any]) -> None:
        """A guard decision other than ok, with the sample ids whose update was discarded."""
        if self._guards_jsonl is None:
            self._guards_jsonl = open(os.path.join(self._run_dir, "guards.jsonl"), "a")
        self._guards_jsonl.write(json.dumps(_finite(event), allow_nan=False) + "\n")
        self._guards_jsonl.flush()

    def write_eval(self, step: int, record: Dict[str, Any]) -> None:
        self._eval_jsonl.write(json.dumps({"step": step, **record}) + "\n")
        self._eval_jsonl.flush()
        for key, value in record.items():
            if isinstance(value, (int, float)):
                self._tb.add_scalar(f"eval/{key}", value, step)

    def close(self) -> None:
        self._jsonl.close()
        self._eval_jsonl.close()
        if self._guards_jsonl is not None:
            self._guards_jsonl.close()
        self._tb.flush()
        self._tb.close()


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value


class ProgressReporter:
    """Rank 0's view of the steps on the console: a tqdm bar when `stream` is a terminal (step lines
    then go to train.log only), otherwise a plain line every `log_every_steps` (and at the last
    step, and at every bad step)."""

    def __init__(self, log: logging.Logger, max_steps: int, initial_step: int, log_every_steps: int,
                 stream: Optional[TextIO] = None):
        self.log, self.max_steps, self.log_every_steps = log, max_steps, log_every_steps
        stream = sys.stdout if stream is None else stream
        self.bar = None
        if stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=max_steps, initial=initial_step, file=stream, unit="step", dynamic_ncols=True)

    def update(self, record: Dict[str, Any]) -> None:
        step = record["step"]
        guard = record.get("guard", "ok")
        if self.bar is not None:
            self.bar.n = step  # a rollback moves the step back
            self.bar.set_postfix_str(f"loss {_num(record['loss'], '.4f')} lr {record['lr']:.3g} "
                                     f"tok/s {record['tokens_per_s']:.0f}" + ("" if guard == "ok" else f" {guard}"),
                                     refresh=False)
            self.bar.refresh()
        if step % self.log_every_steps == 0 or step == self.max_steps or guard != "ok":
            line = (f"step {step}/{self.max_steps} loss {_num(record['loss'], '.4f')} z {_num(record['z_loss'], '.3f')} "
                    f"lr {record['lr']:.3g} grad_norm {_num(record['grad_norm'], '.3f')} "
                    f"tokens/s {record['tokens_per_s']:.0f} samples/s {record['samples_per_s']:.1f} "
                    f"data_wait {record['data_wait_s']:.3f}s")
            if guard != "ok":
                line += f" | guard {guard}: {record.get('guard_reason', '')}"
            self.log.info(line, extra={"console": self.bar is None or guard != "ok"})

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _num(value: Optional[float], spec: str) -> str:
    return "n/a" if value is None else format(value, spec)
