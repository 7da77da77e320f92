"""Atomic checkpoints: a checkpoint exists only once its COMPLETE marker does.

Layout under <run_dir>/checkpoints/:

    step_0000200/                 DeepSpeed ZeRO shards (model + optimizer + scheduler), written by all ranks
        rank_00000.pt ...         per-rank state: RNG streams and the data-loader cursor
        trainer_state.json        step and counters (rank 0)
        config.yaml               the resolved recipe of the run
        mmtrain_model.json        model config, for export without the recipe
        COMPLETE
    latest                        text file naming the newest complete checkpoint

Every rank writes into `step_X.partial/`; after a barrier rank 0 writes trainer state and
COMPLETE, fsyncs, renames the directory to its final name, then rewrites `latest` (tmp + rename) and
prunes old checkpoints. A crash at any point leaves the previous complete checkpoint loadable.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from mmtrain.engine import distributed

COMPLETE = "COMPLETE"
LATEST = "latest"
_STEP_DIR = re.compile(r"^step_(\d{7})$")


class CheckpointError(RuntimeError):
    pass


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: str) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(root)


def _write_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> Dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def complete_checkpoints(ckpt_root: str) -> List[str]:
    """Complete checkpoint directories, oldest first."""
    if not os.path.isdir(ckpt_root):
        return []
    found = []
    for name in os.listdir(ckpt_root):
        m = _STEP_DIR.match(name)
        if m and os.path.isfile(os.path.join(ckpt_root, name, COMPLETE)):
            found.append((int(m.group(1)), os.path.join(ckpt_root, name)))
    return [path for _, path in sorted(found)]


def latest_checkpoint(ckpt_root: str) -> Optional[str]:
    """The newest complete checkpoint; `latest` is a hint, the COMPLETE markers are the truth."""
    done = complete_checkpoints(ckpt_root)
    return done[-1] if done else None


def resolve_checkpoint(path: str) -> str:
    """A run directory, a checkpoints/ directory or one checkpoint → one complete checkpoint directory."""
    for candidate_root in (os.path.join(path, "checkpoints"), path):
        found = latest_checkpoint(candidate_root)
        if found:
            return found
    if os.path.isfile(os.path.join(path, COMPLETE)):
        return path
    if os.path.isdir(path) and _STEP_DIR.match(os.path.basename(os.path.normpath(path))):
        raise CheckpointError(f"{path} has no {COMPLETE} marker: it was never finished and is not loaded")
    raise CheckpointError(f"no complete checkpoint under {path}")


def save(
    engine,
    ckpt_root: str,
    step: int,
    rank: int,
    world_size: int,
    rank_state: Dict[str, Any],
    trainer_state: Dict[str, Any],
    extra_files: Dict[str, str],
    keep_last: int,
) -> str:
    """Collective: every rank must call it. Returns the final checkpoint directory."""
    final_name = step_dir_name(step)
    partial_name = final_name + ".partial"
    partial = os.path.join(ckpt_root, partial_name)
    if rank == 0:
        os.makedirs(ckpt_root, exist_ok=True)
        if os.path.exists(partial):
            shutil.rmtree(partial)
    distributed.barrier()
    engine.save_checkpoint(ckpt_root, tag=partial_name, save_latest=False)
    torch.save({**rank_state, "world_size": world_size}, os.path.join(partial, f"rank_{rank:05d}.pt"))
    distributed.barrier()
    final = os.path.join(ckpt_root, final_name)
    if rank == 0:
        with open(os.path.join(partial, "trainer_state.json"), "w") as f:
            json.dump({**trainer_state, "world_size": world_size}, f, indent=1)
        for name, text in extra_files.items():
            with open(os.path.join(partial, name), "w") as f:
                f.write(text)
        _fsync_tree(partial)
        with open(os.path.join(partial, COMPLETE), "w") as f:
            f.write(f"{step}\n")
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(final):  # a re-save of the same step after a rollback
            shutil.rmtree(final)
        os.replace(partial, final)
        _fsync_dir(ckpt_root)
        _write_atomic(os.path.join(ckpt_root, LATEST), final_name + "\n")
        for old in complete_checkpoints(ckpt_root)[:-keep_last]:
            shutil.rmtree(old)
    distributed.barrier()
    return final


def load(engine, ckpt_dir: str, rank: int, world_size: int) -> Dict[str, Any]:
    """Collective. Restores engine (weights, optimizer, scheduler) and returns this rank's state
    merged with the trainer state."""
    if not os.path.isfile(os.path.join(ckpt_dir, COMPLETE)):
        raise CheckpointError(f"{ckpt_dir} has no {COMPLETE} marker: refusing to load an unfinished checkpoint")
    with open(os.path.join(ckpt_dir, "trainer_state.json")) as f:
        trainer_state = json.load(f)
    if trainer_state["world_size"] != world_size:
        raise CheckpointError(
            f"{ckpt_dir} was saved by {trainer_state['world_size']} ranks and this run has {world_size}; "
            "resuming on another topology is not supported yet"
        )
    root, tag = os.path.split(os.path.normpath(ckpt_dir))
    # DeepSpeed recorded the shards under their .partial tag; the directory was renamed after.
    loaded, _ = engine.load_checkpoint(root, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
    if loaded is None:
        raise CheckpointError(f"DeepSpeed loaded nothing from {ckpt_dir}")
    rank_state = torch.load(os.path.join(ckpt_dir, f"rank_{rank:05d}.pt"), weights_only=False)
    return {"trainer": trainer_state, **rank_state}
