"""Atomic checkpoints: a checkpoint exists only once its COMPLETE marker does.

Layout under <run_dir>/checkpoints/:

    step_0000200/                 DeepSpeed ZeRO shards (model + optimizer + scheduler), written by all ranks
        rank_00000.pt ...         per-rank state: RNG streams and the data-loader cursor
        trainer_state.json        step, world size, trainable groups (rank 0)
        config.yaml               the resolved recipe of the run
        mmtrain_model.json        model config, for export without the recipe
        COMPLETE
        topology_free/            made on the first resume that needs it (see mmtrain.engine.reshard)
    latest                        text file naming the newest complete checkpoint

Saving: every rank writes (and fsyncs) its files into `step_X.partial/`; the ranks then agree on
whether every write succeeded; rank 0 writes trainer state and COMPLETE, fsyncs, renames the
directory to its final name, rewrites `latest` (tmp + rename) and prunes old checkpoints; the ranks
agree again. A failed write (a full disk, say) raises CheckpointError on every rank, naming the rank,
the file and the cause; the .partial directory is removed where possible and neither the previous
checkpoint nor `latest` is touched. A crash at any point leaves the previous complete checkpoint
loadable, and a directory without COMPLETE is never loaded.

Loading: with the saving run's world size and trainable groups, DeepSpeed's own (rigid) load, which
is bit-exact. Otherwise the topology-free layout (per-parameter fp32 master and Adam moments) is
made from the shards once, cached inside the checkpoint, and loaded into the new partitioning;
the data cursor is remapped by :func:`remap_data_cursor`.
"""

from __future__ import annotations

import errno
import filecmp
import json
import os
import random
import re
import shutil
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from mmtrain.engine import distributed

COMPLETE = "COMPLETE"
LATEST = "latest"
PARTIAL_SUFFIX = ".partial"
_STEP_DIR = re.compile(r"^step_(\d{7})$")
_PARTIAL_DIR = re.compile(r"^step_\d{7}\.partial$")
# Less free space than this after a failed write: call the disk full (torch.save reports a full
# disk as "unexpected pos", not as ENOSPC).
_FULL_BELOW_BYTES = 2**20


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


def _fsync_file(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_tree(path: str) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            _fsync_file(os.path.join(root, name))
        _fsync_dir(root)


def _write_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _describe_failure(path: str, exc: BaseException) -> str:
    """What failed and why, with the free space left where the file was going (a full disk often
    surfaces as a bare 'file write failed' from torch.save)."""
    where = os.path.dirname(path) or "."
    try:
        free_bytes = shutil.disk_usage(where).free
        free = f"; {free_bytes / 2**20:.1f} MiB free there"
        if getattr(exc, "errno", None) == errno.ENOSPC or free_bytes < _FULL_BELOW_BYTES:
            free += " (the disk is full)"
    except OSError:
        free = ""
    return f"writing {path}: {type(exc).__name__}: {exc}{free}"


def agree(error: Optional[str], what: str) -> None:
    """Collective: every rank passes its own error (None when fine); if any rank failed, every rank
    raises one CheckpointError naming each failed rank and its cause. No rank is left waiting in a
    barrier for a rank that gave up."""
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    errors: List[Optional[str]] = [error]
    if world > 1:
        errors = [None] * world
        torch.distributed.all_gather_object(errors, error)
    failed = [f"rank {rank}: {e}" for rank, e in enumerate(errors) if e]
    if failed:
        raise CheckpointError(f"{what} failed on {len(failed)} of {world} ranks: " + " | ".join(failed))


class _DeferredErrors:
    """Wraps DeepSpeed's checkpoint engine for one save: each file is fsynced after writing, and the
    first write error is recorded instead of raised, so this rank still takes part in the
    collectives DeepSpeed runs after its writes (an exception there would leave the other ranks
    blocked in them); the ranks then compare errors in :func:`agree`."""

    def __init__(self, inner):
        self.inner = inner
        self.error: Optional[str] = None

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def guarded(self, path: str, write: Callable[[], None]) -> None:
        if self.error is not None:
            return
        try:
            write()
            if os.path.isfile(path):
                _fsync_file(path)
        except Exception as e:  # noqa: BLE001 -- any failure of this rank's write is reported to all ranks
            self.error = _describe_failure(path, e)

    def save(self, state_dict, path: str):
        self.guarded(path, lambda: self.inner.save(state_dict, path))

    def makedirs(self, path: str, exist_ok: bool = False):
        self.guarded(path, lambda: self.inner.makedirs(path, exist_ok=exist_ok))


class _RecoveryScriptCopier:
    """Stands in for DeepSpeed's `_copy_recovery_script` during one save. DeepSpeed copies its
    conversion scripts (zero_to_fp32.py, ...) into the checkpoint root on every save, on rank 0, with
    a plain copyfile outside its checkpoint engine: on a full disk that raised on rank 0 alone,
    mid-save, leaving rank 1 in the next collective and a truncated script behind (seen in CI). Here
    DeepSpeed's own copy goes into a staging directory inside the .partial checkpoint, and each script
    is renamed into the root only where it differs from the copy already there, so an existing copy is
    never truncated; a failure is deferred like every other write of the save."""

    def __init__(self, deepspeed_copy: Callable[[str], None], partial: str, writer: _DeferredErrors):
        self.deepspeed_copy, self.partial, self.writer = deepspeed_copy, partial, writer

    def __call__(self, save_path: str) -> None:
        staging = os.path.join(self.partial, "recovery_scripts.staging")
        try:
            self.writer.guarded(staging, lambda: self._install(staging, save_path))
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _install(self, staging: str, save_path: str) -> None:
        os.makedirs(staging, exist_ok=True)
        self.deepspeed_copy(staging)
        for name in sorted(os.listdir(staging)):
            staged, installed = os.path.join(staging, name), os.path.join(save_path, name)
            if not (os.path.isfile(installed) and filecmp.cmp(staged, installed, shallow=False)):
                _fsync_file(staged)
                os.replace(staged, installed)


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
    name = os.path.basename(os.path.normpath(path))
    if os.path.isdir(path) and (_STEP_DIR.match(name) or _PARTIAL_DIR.match(name)):
        raise CheckpointError(f"{path} has no {COMPLETE} marker: it was never finished and is not loaded")
    raise CheckpointError(f"no complete checkpoint under {path}")


def remove_partials(ckpt_root: str) -> List[str]:
    """Delete the `.partial` directories that killed saves left behind (never loadable); returns them."""
    if not os.path.isdir(ckpt_root):
        return []
    removed = []
    for name in sorted(os.listdir(ckpt_root)):
        if _PARTIAL_DIR.match(name):
            shutil.rmtree(os.path.join(ckpt_root, name), ignore_errors=True)
            removed.append(name)
    return removed


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
    """Collective: every rank must call it. Returns the final checkpoint directory; raises
    CheckpointError on every rank when any rank failed (see the module docstring)."""
    final_name = step_dir_name(step)
    partial = os.path.join(ckpt_root, final_name + PARTIAL_SUFFIX)
    final = os.path.join(ckpt_root, final_name)
    error = None
    if rank == 0:
        try:
            os.makedirs(ckpt_root, exist_ok=True)
            remove_partials(ckpt_root)
            os.makedirs(partial)
        except OSError as e:
            error = _describe_failure(partial, e)
    agree(error, f"checkpoint {partial}: creating the directory")

    writer = _DeferredErrors(engine.checkpoint_engine)
    engine.checkpoint_engine = writer
    deepspeed_copy = getattr(engine, "_copy_recovery_script", None)  # DeepSpeed's private method
    if deepspeed_copy is not None:
        engine._copy_recovery_script = _RecoveryScriptCopier(deepspeed_copy, partial, writer)
    try:
        engine.save_checkpoint(ckpt_root, tag=os.path.basename(partial), save_latest=False)
    finally:
        engine.checkpoint_engine = writer.inner
        if deepspeed_copy is not None:
            del engine._copy_recovery_script  # the class's method again
    rank_file = os.path.join(partial, f"rank_{rank:05d}.pt")
    writer.guarded(rank_file, lambda: torch.save({**rank_state, "world_size": world_size}, rank_file))
    try:
        agree(writer.error, f"checkpoint {partial}: writing shards")
    except CheckpointError:
        if rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
        raise

    error = None
    if rank == 0:
        error = _finish(partial, final, step, world_size, trainer_state, extra_files)
    agree(error, f"checkpoint {final}: completing it")
    if rank == 0:
        _prune(ckpt_root, keep_last)
    distributed.barrier()
    return final


def _finish(partial: str, final: str, step: int, world_size: int, trainer_state: Dict[str, Any],
            extra_files: Dict[str, str]) -> Optional[str]:
    """Rank 0: trainer state, COMPLETE, rename, `latest`. Returns an error description or None.
    Before the rename a failure removes the .partial directory and leaves everything as it was."""
    ckpt_root = os.path.dirname(partial)
    path = partial
    try:
        files = {"trainer_state.json": json.dumps({**trainer_state, "world_size": world_size}, indent=1), **extra_files}
        for name, text in files.items():
            path = os.path.join(partial, name)
            with open(path, "w") as f:
                f.write(text)
        path = partial
        fsync_tree(partial)
        path = os.path.join(partial, COMPLETE)
        with open(path, "w") as f:
            f.write(f"{step}\n")
            f.flush()
            os.fsync(f.fileno())
        path = final
        if os.path.exists(final):  # a re-save of the same step after a rollback
            shutil.rmtree(final)
        os.replace(partial, final)
        _fsync_dir(ckpt_root)
    except Exception as e:  # noqa: BLE001 -- reported to every rank by agree()
        shutil.rmtree(partial, ignore_errors=True)
        return _describe_failure(path, e)
    latest = os.path.join(ckpt_root, LATEST)
    try:
        _write_atomic(latest, os.path.basename(final) + "\n")
    except Exception as e:  # noqa: BLE001
        # The new checkpoint is complete (resume=auto finds it by its marker); `latest` still names
        # the previous one, which is intact.
        return _describe_failure(latest, e)
    return None


def _prune(ckpt_root: str, keep_last: int) -> None:
    """Keep the newest `keep_last` complete checkpoints. A deletion that fails is logged, not fatal:
    the new checkpoint is already complete."""
    import logging

    for old in complete_checkpoints(ckpt_root)[:-keep_last] if keep_last > 0 else []:
        # The marker goes first, so a half-deleted directory is never taken for a complete one.
        try:
            os.remove(os.path.join(old, COMPLETE))
            shutil.rmtree(old)
        except OSError as e:
            logging.getLogger("mmtrain").warning("could not delete old checkpoint %s: %s", old, e)


def read_trainer_state(ckpt_dir: str) -> Dict[str, Any]:
    if not os.path.isfile(os.path.join(ckpt_dir, COMPLETE)):
        raise CheckpointError(f"{ckpt_dir} has no {COMPLETE} marker: refusing to load an unfinished checkpoint")
    with open(os.path.join(ckpt_dir, "trainer_state.json")) as f:
        return json.load(f)


def load(engine, ckpt_dir: str, rank: int, world_size: int,
         trainable_groups: Optional[Sequence[str]] = None, log=None) -> Dict[str, Any]:
    """Collective. Restores engine (weights, optimizer, scheduler) and returns
    {"trainer": trainer state, "exact": bool, "rng": ..., "data": ...}.

    exact: same world size and trainable groups as the saving run; DeepSpeed's own load, and "data"
    / "rng" are this rank's saved cursor and RNG streams. Otherwise the topology-free path; "data" is
    the list of every saved rank's cursor (for remap_data_cursor) and "rng" this rank's streams, or
    on another world size rank 0's (every rank starts from the same seed, so they are alike)."""
    trainer_state = read_trainer_state(ckpt_dir)
    saved_world = int(trainer_state["world_size"])
    saved_groups = trainer_state.get("trainable_groups")
    same_groups = trainable_groups is None or saved_groups is None or list(saved_groups) == list(trainable_groups)
    if saved_world == world_size and same_groups:
        root, tag = os.path.split(os.path.normpath(ckpt_dir))
        loaded, _ = engine.load_checkpoint(root, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
        if loaded is None:
            raise CheckpointError(f"DeepSpeed loaded nothing from {ckpt_dir}")
        rank_state = torch.load(os.path.join(ckpt_dir, f"rank_{rank:05d}.pt"), weights_only=False)
        return {"trainer": trainer_state, "exact": True, **rank_state}

    from mmtrain.engine import reshard

    if log is not None:
        log.info("checkpoint %s was saved by %d ranks training %s; this run has %d ranks training %s: "
                 "loading its topology-free layout", ckpt_dir, saved_world, saved_groups, world_size,
                 list(trainable_groups or []))
    free_dir = reshard.ensure_topology_free(ckpt_dir, rank)
    reshard.load_topology_free(engine, free_dir, log=log)
    saved = [torch.load(os.path.join(ckpt_dir, f"rank_{r:05d}.pt"), weights_only=False) for r in range(saved_world)]
    rng = saved[rank if saved_world == world_size else 0]["rng"]
    return {"trainer": trainer_state, "exact": False, "rng": rng, "data": [s["data"] for s in saved]}


def remap_data_cursor(saved: Sequence[Dict[str, Any]], fresh: Dict[str, Any]) -> Dict[str, Any]:
    """This rank's loader state after a world-size change, from every saved rank's loader state
    and this rank's fresh one (`TrainLoader.state_dict()` before iterating).

    A cursor names positions inside one global worker's share of an epoch (shard split and shuffle
    buffer depend on the number of global workers), so it cannot be carried over to another split.
    The choice: every source restarts at a fresh epoch, one past the newest epoch any saved worker
    reached, so its permutation and shuffle are new and deterministic (seed, epoch, worker), no
    sample of the new epoch repeats, and resuming twice from the same checkpoint gives the same
    stream. The cost is the unread rest of the interrupted epoch (at most one epoch, per source).
    The source mixer continues past the most draws any saved worker made, so it does not replay
    the opening source choices; skip counts carry over as totals, on global worker 0."""
    out = json.loads(json.dumps(fresh))
    epochs: Dict[str, int] = {}
    mix_draws = 0
    skipped: Dict[str, int] = {}
    for state in saved:
        for cursor in state["workers"]:
            mix_draws = max(mix_draws, int(cursor["mix_draws"]))
            for name, pos in cursor["sources"].items():
                epochs[name] = max(epochs.get(name, 0), int(pos["epoch"]))
            for reason, count in cursor["skipped"].items():
                skipped[reason] = skipped.get(reason, 0) + int(count)
    missing = [name for name in out["sources"] if name not in epochs]
    if missing:
        raise CheckpointError(f"the checkpoint's data cursors have no position for sources {missing}; "
                              f"it was saved with sources {sorted(epochs)}")
    for worker in out["workers"]:
        worker["mix_draws"] = mix_draws
        worker["pending"] = []
        for name in worker["sources"]:
            worker["sources"][name] = {"epoch": epochs[name] + 1, "consumed": 0}
    if out["rank"] == 0:
        out["workers"][0]["skipped"] = skipped
    return out


def truncate_step_log(path: str, last_step: int) -> int:
    """Drop records with step > last_step from a JSON-lines log (metrics.jsonl, eval.jsonl), so a
    resumed run's log is its true history with each step once. Atomic (tmp + fsync + rename).
    Returns the number of records dropped; a torn last line (a kill mid-write) is dropped too."""
    if not os.path.isfile(path):
        return 0
    kept, dropped = [], 0
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                dropped += 1
                continue
            if int(record.get("step", 0)) <= last_step:
                kept.append(json.dumps(record) + "\n" if not line.endswith("\n") else line)
            else:
                dropped += 1
    if dropped:
        _write_atomic(path, "".join(kept))
    return dropped
