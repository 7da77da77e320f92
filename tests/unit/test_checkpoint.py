"""Checkpoint directory mechanics without DeepSpeed: atomic save, keep-last-N, markers, a failed
save, metrics rewinding and the data-cursor remap for another world size."""

import errno
import json
import os

import pytest
import torch

from mmtrain.engine import checkpoint


class _Writer:
    """DeepSpeed's checkpoint engine interface (save / makedirs), optionally failing like a full disk."""

    def __init__(self, fail_in=None):
        self.fail_in = fail_in

    def save(self, state, path):
        if self.fail_in and self.fail_in in path:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        torch.save(state, path)

    def makedirs(self, path, exist_ok=False):
        os.makedirs(path, exist_ok=exist_ok)


class _Engine:
    """Writes one shard per save through its checkpoint engine, as DeepSpeed's save_checkpoint does."""

    def __init__(self, fail_in=None):
        self.checkpoint_engine = _Writer(fail_in)

    def save_checkpoint(self, root, tag, save_latest):
        self.checkpoint_engine.makedirs(os.path.join(root, tag), exist_ok=True)
        self.checkpoint_engine.save({"w": torch.ones(4)}, os.path.join(root, tag, "zero_pp_rank_0_model_states.pt"))


def _save(root, step, engine=None, keep_last=2):
    return checkpoint.save(engine or _Engine(), root, step, 0, 1, rank_state={"data": {"step": step}},
                           trainer_state={"step": step}, extra_files={"config.yaml": "seed: 1\n"}, keep_last=keep_last)


def test_save_is_complete_and_keeps_the_last_n(tmp_path):
    root = str(tmp_path / "checkpoints")
    for step in (1, 2, 3):
        path = _save(root, step)
    assert path == os.path.join(root, "step_0000003")
    assert sorted(os.listdir(root)) == ["latest", "step_0000002", "step_0000003"]
    assert open(os.path.join(root, "latest")).read().strip() == "step_0000003"
    assert set(os.listdir(path)) == {"COMPLETE", "config.yaml", "trainer_state.json", "rank_00000.pt",
                                     "zero_pp_rank_0_model_states.pt"}
    assert checkpoint.read_trainer_state(path) == {"step": 3, "world_size": 1}
    assert torch.load(os.path.join(path, "rank_00000.pt"))["data"] == {"step": 3}


def test_a_checkpoint_without_its_marker_is_never_loaded(tmp_path):
    root = str(tmp_path / "checkpoints")
    _save(root, 1)
    newer = _save(root, 2)
    os.remove(os.path.join(newer, "COMPLETE"))
    os.makedirs(os.path.join(root, "step_0000003.partial"))
    assert checkpoint.latest_checkpoint(root) == os.path.join(root, "step_0000001")
    assert checkpoint.resolve_checkpoint(str(tmp_path)) == os.path.join(root, "step_0000001")
    for unfinished in (newer, os.path.join(root, "step_0000003.partial")):
        with pytest.raises(checkpoint.CheckpointError, match="no COMPLETE marker"):
            checkpoint.resolve_checkpoint(unfinished)
    with pytest.raises(checkpoint.CheckpointError, match="no COMPLETE marker"):
        checkpoint.load(_Engine(), newer, 0, 1)
    # The next save clears what killed saves left behind.
    _save(root, 4)
    assert not [n for n in os.listdir(root) if n.endswith(".partial")]


def test_a_failed_save_names_path_and_cause_and_touches_nothing(tmp_path):
    root = str(tmp_path / "checkpoints")
    first = _save(root, 1)
    before = {n: os.path.getmtime(os.path.join(first, n)) for n in os.listdir(first)}
    with pytest.raises(checkpoint.CheckpointError) as failure:
        _save(root, 2, engine=_Engine(fail_in="step_0000002"))
    message = str(failure.value)
    assert "rank 0: writing" in message and "step_0000002.partial/zero_pp_rank_0_model_states.pt" in message
    assert "No space left on device" in message and "MiB free there (the disk is full)" in message
    assert sorted(os.listdir(root)) == ["latest", "step_0000001"]  # .partial removed
    assert open(os.path.join(root, "latest")).read().strip() == "step_0000001"
    assert {n: os.path.getmtime(os.path.join(first, n)) for n in os.listdir(first)} == before


def test_rank_state_write_failure_is_caught_too(tmp_path, monkeypatch):
    root = str(tmp_path / "checkpoints")
    _save(root, 1)
    real_save = torch.save

    def failing(obj, f, *a, **k):
        if "rank_00000.pt" in str(f) and "step_0000002" in str(f):
            raise OSError(errno.EIO, "Input/output error", f)
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", failing)
    with pytest.raises(checkpoint.CheckpointError, match=r"rank_00000\.pt: OSError: .*Input/output error"):
        _save(root, 2)
    assert checkpoint.latest_checkpoint(root) == os.path.join(root, "step_0000001")


class _EngineWithRecoveryScript(_Engine):
    """Also copies a conversion script into the checkpoint root on every save, as DeepSpeed's
    save_checkpoint does through its `_copy_recovery_script`, outside the checkpoint engine."""

    def __init__(self, script_text, fail_copy=False):
        super().__init__()
        self.script_text, self.fail_copy = script_text, fail_copy

    def _copy_recovery_script(self, save_path):
        path = os.path.join(save_path, "zero_to_fp32.py")
        with open(path, "w") as f:  # a plain copy truncates first, as copyfile does
            if self.fail_copy:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
            f.write(self.script_text)

    def save_checkpoint(self, root, tag, save_latest):
        super().save_checkpoint(root, tag, save_latest)
        self._copy_recovery_script(root)


def test_recovery_scripts_are_replaced_only_when_changed_and_never_truncated(tmp_path):
    root = str(tmp_path / "checkpoints")
    script = os.path.join(root, "zero_to_fp32.py")
    _save(root, 1, _EngineWithRecoveryScript("v1"))
    inode = os.stat(script).st_ino
    _save(root, 2, _EngineWithRecoveryScript("v1"))
    assert os.stat(script).st_ino == inode  # the same copy, not rewritten
    _save(root, 3, _EngineWithRecoveryScript("v2"))  # another DeepSpeed version: the new script
    assert open(script).read() == "v2"
    # A copy that fails (a full disk) fails the save like any other write and leaves the installed script whole.
    with pytest.raises(checkpoint.CheckpointError, match="zero_to_fp32.py.*the disk is full"):
        _save(root, 4, _EngineWithRecoveryScript("v3", fail_copy=True))
    assert open(script).read() == "v2"
    assert checkpoint.latest_checkpoint(root) == os.path.join(root, "step_0000003")
    assert not [n for n in os.listdir(root) if n.endswith(".partial")]
    assert "recovery_scripts.staging" not in os.listdir(os.path.join(root, "step_0000003"))


def test_truncate_step_log_keeps_each_step_once(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    with open(path, "w") as f:
        for step in (1, 2, 3, 4):
            f.write(json.dumps({"step": step, "loss": 1.0 / step}) + "\n")
        f.write('{"step": 5, "lo')  # torn by a kill mid-write
    assert checkpoint.truncate_step_log(path, 2) == 3
    with open(path) as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2]
    assert os.listdir(tmp_path) == ["metrics.jsonl"]  # no temporary left
    assert checkpoint.truncate_step_log(path, 2) == 0
    assert checkpoint.truncate_step_log(str(tmp_path / "absent.jsonl"), 0) == 0


def _cursor(worker, epoch, consumed, draws, skipped):
    return {"worker": worker, "batches": 7, "mix_draws": draws, "skipped": skipped,
            "sources": {"a": {"epoch": epoch, "consumed": consumed}, "b": {"epoch": 0, "consumed": 5}},
            "pending": [{"source": 0, "shard": "x.tar", "key": "k", "members": []}]}


def _loader_state(rank, world, workers):
    return {"format": "mmtrain-loader/1", "seed": 1, "rank": rank, "world_size": world, "num_workers": 0,
            "sources": ["a", "b"], "batches": 7, "workers": workers}


def test_remap_data_cursor_starts_a_fresh_epoch(tmp_path):
    saved = [_loader_state(0, 2, [_cursor(0, 2, 30, 100, {"bad_image": 1})]),
             _loader_state(1, 2, [_cursor(0, 3, 4, 120, {"bad_image": 2, "bad_json": 1})])]
    for rank in (0, 1, 2):
        fresh = _loader_state(rank, 3, [_cursor(0, 0, 0, 0, {})])
        fresh["batches"] = 0
        out = checkpoint.remap_data_cursor(saved, fresh)
        assert (out["rank"], out["world_size"], out["batches"]) == (rank, 3, 0)
        worker = out["workers"][0]
        assert worker["sources"] == {"a": {"epoch": 4, "consumed": 0}, "b": {"epoch": 1, "consumed": 0}}
        assert worker["mix_draws"] == 120 and worker["pending"] == []
        assert worker["skipped"] == ({"bad_image": 3, "bad_json": 1} if rank == 0 else {})
    with pytest.raises(checkpoint.CheckpointError, match=r"no position for sources \['c'\]"):
        checkpoint.remap_data_cursor(saved, {**_loader_state(0, 3, [_cursor(0, 0, 0, 0, {})]), "sources": ["a", "c"]})
