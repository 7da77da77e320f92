"""A checkpoint save that fails on one rank (a full disk) fails the run on every rank with a
CheckpointError naming the rank, the file and the cause, promptly (no rank left in a barrier), and
leaves the previous checkpoint and `latest` as they were, with no .partial directory left behind.
Two ways: ENOSPC injected into rank 1's writes (runs everywhere), and a real full tmpfs (needs root
and mount; skipped elsewhere, the injected case still runs)."""

import os
import subprocess

import pytest
from helpers import TINY_RECIPE, data_overrides, run_ranks

from mmtrain.engine import checkpoint

pytestmark = pytest.mark.dist

SMALL = [
    "train.max_steps=3",
    "train.micro_batch_size=4",
    "train.global_batch_size=8",
    "train.log_every_steps=1",
    "optim.warmup_steps=1",
    "checkpoint.every_steps=1",
    "checkpoint.keep_last=3",
    "data.eval_path=null",
    "resume=auto",
    # A rank stuck in a collective would hit this and fail the test's assertions on the message.
    "dist.timeout_s=120",
]
ONE_CHECKPOINT_KIB = 9300  # the tiny model's checkpoint with these settings (2 ranks, bf16)


SCRIPT = os.path.join(os.path.dirname(__file__), "checkpoint_fault.py")


def _run(paths, root, name, errors_dir, env=()):
    os.makedirs(errors_dir, exist_ok=True)
    return run_ranks(2, [SCRIPT, TINY_RECIPE, *data_overrides(paths, root, name), *SMALL], timeout_s=400,
                     env={"ERRORS_DIR": errors_dir, **dict(env)})


def _assert_failed_cleanly(done, run_dir, errors_dir, cause):
    output = done.stdout + done.stderr
    assert done.returncode != 0, output[-3000:]
    # Every rank raised, the one whose disk was fine included, with the failed rank, file and cause.
    for rank in (0, 1):
        recorded = os.path.join(errors_dir, f"rank{rank}.txt")
        assert os.path.isfile(recorded), f"rank {rank} raised no CheckpointError:\n{output[-6000:]}"
        with open(recorded) as f:
            message = f.read()
        assert "step_0000002.partial" in message and cause in message, message
    ckpt_root = os.path.join(run_dir, "checkpoints")
    # The previous checkpoint stays complete and named by `latest`; nothing of the failed one is left.
    assert checkpoint.latest_checkpoint(ckpt_root) == os.path.join(ckpt_root, "step_0000001")
    assert open(os.path.join(ckpt_root, "latest")).read().strip() == "step_0000001"
    assert not [n for n in os.listdir(ckpt_root) if n.startswith("step_0000002")]
    assert checkpoint.read_trainer_state(os.path.join(ckpt_root, "step_0000001"))["step"] == 1


def test_one_rank_out_of_space_fails_every_rank_and_keeps_the_previous_checkpoint(shapes_data, tmp_path):
    root, errors = str(tmp_path), str(tmp_path / "errors")
    done = _run(shapes_data, root, "enospc", errors, {"FAIL_RANK": "1", "FAIL_IN": "step_0000002"})
    _assert_failed_cleanly(done, os.path.join(root, "enospc"), errors, "rank 1: writing")
    assert "No space left on device" in open(os.path.join(errors, "rank0.txt")).read()
    # The kept checkpoint is usable: it exports (every shard read back) as step 1.
    from mmtrain.engine.export import export

    assert export(os.path.join(root, "enospc"), str(tmp_path / "export")).endswith("step_0000001")


def test_recovery_script_copy_out_of_space_fails_cleanly(shapes_data, tmp_path):
    """DeepSpeed copies zero_to_fp32.py into the checkpoint root on every save, on rank 0, outside its
    checkpoint engine. The disk filling up during that copy (as it did in CI's real full-disk run)
    fails every rank cleanly, like any other write, and leaves the first save's copy intact."""
    import deepspeed

    root, errors = str(tmp_path), str(tmp_path / "errors")
    done = _run(shapes_data, root, "copy", errors, {"FAIL_RANK": "0", "FAIL_IN": "zero_to_fp32.py", "FAIL_SKIP": "1"})
    _assert_failed_cleanly(done, os.path.join(root, "copy"), errors, "rank 0: writing")
    shipped = os.path.join(os.path.dirname(deepspeed.__file__), "utils", "zero_to_fp32.py")
    installed = os.path.join(root, "copy", "checkpoints", "zero_to_fp32.py")
    assert open(installed, "rb").read() == open(shipped, "rb").read()


def test_real_full_disk(shapes_data, tmp_path):
    run_dir = tmp_path / "full"
    mount_point = run_dir / "checkpoints"
    mount_point.mkdir(parents=True)
    size_kib = ONE_CHECKPOINT_KIB * 3 // 2  # the first checkpoint fits, the second does not
    mounted = os.geteuid() == 0 and subprocess.run(
        # huge=never: with huge pages (a kernel's shmem default) files take 2 MiB steps and the size is off.
        ["mount", "-t", "tmpfs", "-o", f"size={size_kib}k,huge=never", "tmpfs", str(mount_point)], capture_output=True
    ).returncode == 0
    if not mounted:
        pytest.skip("needs root and mount for a small tmpfs; the injected ENOSPC test covers the logic")
    try:
        errors = str(tmp_path / "errors")
        done = _run(shapes_data, str(tmp_path), "full", errors)
        _assert_failed_cleanly(done, str(run_dir), errors, "(the disk is full)")
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)
