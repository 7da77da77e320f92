"""Guards on two ranks of real DeepSpeed ZeRO-3 on CPU, with bad steps injected through
MMTRAIN_INJECT_LOSS, in one run: a non-finite loss on one rank skips the step on both (weights
bit-identical, step counters, scheduler and optimizer consistent); a spike rolls back to the last
checkpoint and skips the data since it; bad steps in a row abort the run with a clear message.
Spike *skipping* shares the skip path and is judged in tests/unit/test_guards_unit.py."""

import json
import os

import pytest
import torch
from helpers import TINY_RECIPE, data_overrides, run_ranks

pytestmark = pytest.mark.dist

PROBE = os.path.join(os.path.dirname(__file__), "guard_probe.py")
ARGS = [
    "train.max_steps=10",
    "train.micro_batch_size=4",
    "train.global_batch_size=8",
    "optim.warmup_steps=1",
    "data.eval_path=null",
    "checkpoint.every_steps=3",
    "checkpoint.keep_last=3",
    "guards.warmup_steps=1",
    "guards.spike_window_steps=3",
    "guards.spike_action=rollback",
    "guards.max_consecutive_bad_steps=2",
    "dist.timeout_s=123",
]
# Step 2: NaN loss on rank 1 only. Step 5: loss x1000 on both ranks (a spike; back to step 3, the
# window is steps 4-5). Steps 7 and 8 (inf on rank 0 only): two bad steps in a row.
FAULTS = "2:nan@1,5:x1000,7:nan,8:inf@0"


@pytest.fixture(scope="module")
def guarded_run(shapes_data, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("guards"))
    out = os.path.join(root, "probe")
    done = run_ranks(2, [PROBE, out, TINY_RECIPE, *data_overrides(shapes_data, root, "guarded"), *ARGS],
                     env={"MMTRAIN_INJECT_LOSS": FAULTS})
    run_dir = os.path.join(root, "guarded")
    assert os.path.isfile(f"{out}.rank1.pt"), done.stdout[-4000:] + done.stderr[-4000:]
    ranks = [torch.load(f"{out}.rank{r}.pt", weights_only=False) for r in (0, 1)]
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f]
    with open(os.path.join(run_dir, "guards.jsonl")) as f:
        events = [json.loads(line) for line in f]
    return {"done": done, "ranks": ranks, "metrics": metrics, "events": events, "run_dir": run_dir}


EXPECTED = [(1, "ok"), (2, "skipped_nonfinite"), (3, "ok"), (4, "ok"), (5, "rolled_back"),
            (4, "ok"), (5, "ok"), (6, "ok"), (7, "skipped_nonfinite"), (8, "skipped_nonfinite")]


def test_every_rank_takes_the_same_decision_and_metrics_log_it(guarded_run):
    metrics = guarded_run["metrics"]
    assert [(r["step"], r["guard"]) for r in metrics] == EXPECTED
    for rank in guarded_run["ranks"]:
        assert [(r["step"], r["guard"]) for r in rank["rows"]] == EXPECTED
    assert metrics[1]["loss"] is None and metrics[1]["grad_norm"] is None  # NaN is written as null
    assert metrics[1]["guard_reason"] == "non-finite loss on ranks [1]"
    assert metrics[9]["guard_reason"] == "non-finite loss on ranks [0]"
    # The spike's running mean is over the accepted steps 1, 3 and 4 (step 2 was skipped).
    mean = (metrics[0]["loss"] + metrics[2]["loss"] + metrics[3]["loss"]) / 3
    assert f"running mean {mean:.4g} of the last 3 accepted steps" in metrics[4]["guard_reason"]
    assert metrics[-1]["guard_counts"] == {"skipped_nonfinite": 3, "skipped_spike": 0, "rolled_back": 1}
    assert metrics[1]["skipped_samples_step"] == {"guard_nonfinite": 8}
    # The rollback discards the update of step 4 (accepted, 8 samples) and of step 5 (8 samples).
    assert metrics[4]["skipped_samples_step"] == {"guard_rollback": 16}
    assert metrics[-1]["skipped_samples"] == {"guard_nonfinite": 24, "guard_rollback": 16}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(os.path.join(guarded_run["run_dir"], "tb"))
    tb.Reload()
    tags = set(tb.Tags()["scalars"])
    assert {"train/samples_per_s", "train/tokens_per_s", "train/max_rss_gib", "train/model_tflops_per_s",
            "train/guard_counts/rolled_back", "train/skipped_samples/guard_rollback", "train/data_wait_s",
            "train/z_loss", "train/grad_norm", "train/lr"} <= tags, tags


def test_a_skipped_step_changes_no_weight_and_keeps_the_counters_consistent(guarded_run):
    for rank in guarded_run["ranks"]:
        assert rank["zero_timeout_s"] == 123  # dist.timeout_s reached DeepSpeed's own process group
        for row in rank["rows"]:
            if row["guard"] == "rolled_back":
                continue
            # A skipped step leaves every trainable weight bit-identical; an accepted one moves them.
            assert (row["changed"] == []) == (row["guard"] != "ok"), row
            # DeepSpeed counts the step and the schedule follows it; only the optimizer stands still.
            assert row["global_steps"] == row["scheduler_steps"] == row["trainer_step"] == row["step"], row
        rows = rank["rows"]
        assert [r["skipped_steps"] for r in rows] == [0, 1, 1, 1, 1, 1, 1, 1, 2, 3]
        assert [r["optimizer_updates"] for r in rows] == [1, 1, 2, 3, 2, 3, 4, 5, 5, 5]
    metrics = guarded_run["metrics"]
    assert metrics[5]["lr"] == metrics[3]["lr"] and metrics[6]["lr"] == metrics[4]["lr"]


def test_rollback_restores_the_checkpoint_and_skips_the_data_window(guarded_run):
    metrics, events = guarded_run["metrics"], guarded_run["events"]
    assert metrics[4]["rolled_back_to_step"] == 3
    window_ids = []
    for rank in guarded_run["ranks"]:
        rows = rank["rows"]
        rollback = rows[4]
        assert rollback["trainer_step"] == rollback["global_steps"] == rollback["scheduler_steps"] == 3
        assert rollback["equals_weights_of_step"]  # the weights are step 3's again
        # The window (the micro-batches of steps 4 and 5) never comes back, nor does anything read
        # before it: the restored cursor was moved past the window, not left at the checkpoint.
        window = rows[3]["sample_ids"] + rows[4]["sample_ids"]
        earlier = window + [i for r in rows[:3] for i in r["sample_ids"]]
        later = [i for r in rows[5:] for i in r["sample_ids"]]
        assert len(window) == 8 and later and not set(earlier) & set(later)
        window_ids += window
    rollback_events = [e for e in events if e["guard"] == "rolled_back"]
    assert len(rollback_events) == 1 and rollback_events[0]["rolled_back_to_step"] == 3
    assert sorted(rollback_events[0]["sample_ids"]) == sorted(window_ids)
    ckpts = os.path.join(guarded_run["run_dir"], "checkpoints")
    assert os.path.isfile(os.path.join(ckpts, "step_0000006", "COMPLETE"))
    log = open(os.path.join(guarded_run["run_dir"], "train.log")).read()
    assert "rolled back to" in log and "step_0000003" in log


def test_bad_steps_in_a_row_abort_with_a_clear_message(guarded_run):
    done = guarded_run["done"]
    assert done.returncode != 0
    assert [r["exit_code"] for r in guarded_run["ranks"]] == [1, 1]
    out = done.stdout + done.stderr
    assert "GuardAbort: guards: 2 bad steps in a row (guards.max_consecutive_bad_steps=2)" in out, out[-4000:]
    assert "the last, step 8, was skipped_nonfinite" in out
