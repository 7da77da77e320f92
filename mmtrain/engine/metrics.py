"""Run-directory logging on rank 0: metrics.jsonl (one object per optimizer step), TensorBoard
events under tb/, and train.log. Other ranks get a logger that only prints warnings."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from typing import Any, Dict, Optional

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


def setup_logging(run_dir: Optional[str], rank: int) -> logging.Logger:
    logger = logging.getLogger("mmtrain")
    logger.handlers.clear()
    logger.propagate = False
    fmt = logging.Formatter(f"%(asctime)s [rank{rank}] %(levelname)s %(message)s", "%H:%M:%S")
    stream = logging.StreamHandler(sys.stdout)
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

    def __init__(self, run_dir: str):
        self._jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a")
        self._eval_jsonl = open(os.path.join(run_dir, "eval.jsonl"), "a")
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(os.path.join(run_dir, "tb"))

    def write(self, record: Dict[str, Any]) -> None:
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        step = record["step"]
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self._tb.add_scalar(f"train/{key}", value, step)
            elif isinstance(value, dict):
                for sub, v in value.items():
                    if isinstance(v, (int, float)):
                        self._tb.add_scalar(f"train/{key}/{sub}", v, step)

    def write_eval(self, step: int, record: Dict[str, Any]) -> None:
        self._eval_jsonl.write(json.dumps({"step": step, **record}) + "\n")
        self._eval_jsonl.flush()
        for key, value in record.items():
            if isinstance(value, (int, float)):
                self._tb.add_scalar(f"eval/{key}", value, step)

    def close(self) -> None:
        self._jsonl.close()
        self._eval_jsonl.close()
        self._tb.flush()
        self._tb.close()
