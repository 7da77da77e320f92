"""Step guards without a process group: the decision rules, the abort message, the test-only fault
plan, and the `guards` recipe section's checks (errors name the key)."""

import math
import os

import pytest

from mmtrain.config import ConfigError, load_config
from mmtrain.config.schema import GuardsConfig
from mmtrain.engine.guards import (
    OK,
    ROLLED_BACK,
    SKIPPED_NONFINITE,
    SKIPPED_SPIKE,
    FaultPlan,
    InjectedFault,
    StepGuard,
    Verdict,
)

TINY = os.path.join(os.path.dirname(__file__), "..", "..", "recipes", "tiny", "otter_shapes.yaml")


def _accept(guard, step, loss):
    verdict = guard.judge(step, loss, [])
    return guard.settle(step, verdict, verdict.discards_update, loss, can_roll_back=True)


def test_spike_judged_against_the_mean_of_accepted_steps_only():
    guard = StepGuard(GuardsConfig(spike_factor=3.0, spike_window_steps=2, warmup_steps=0))
    assert _accept(guard, 1, 2.0).decision == OK
    assert guard.judge(2, 100.0, []).decision == OK  # the window is not full yet: no judgement
    assert _accept(guard, 2, 4.0).decision == OK  # mean now 3.0
    assert guard.judge(3, 9.0, []).decision == OK  # 9 is not above 3 x 3
    spike = guard.judge(3, 9.5, [])
    assert spike.decision == SKIPPED_SPIKE and "running mean 3 of the last 2 accepted steps" in spike.reason
    assert guard.settle(3, spike, True, 9.5, can_roll_back=True).decision == SKIPPED_SPIKE
    assert guard.running_mean() == 3.0  # the skipped step left the mean alone
    # A non-finite loss is judged before anything else, and names the ranks.
    nan = guard.judge(4, math.nan, [1])
    assert nan == Verdict(SKIPPED_NONFINITE, "non-finite loss on ranks [1]")


def test_warmup_and_factor_zero_turn_the_spike_check_off():
    warm = StepGuard(GuardsConfig(spike_factor=2.0, spike_window_steps=1, warmup_steps=5))
    _accept(warm, 1, 1.0)
    assert warm.judge(5, 50.0, []).decision == OK and warm.judge(6, 50.0, []).decision == SKIPPED_SPIKE
    off = StepGuard(GuardsConfig(spike_factor=0.0, spike_window_steps=1, warmup_steps=0))
    _accept(off, 1, 1.0)
    assert off.judge(2, 1e9, []).decision == OK


def test_rollback_needs_a_checkpoint_and_forgets_the_undone_steps():
    guard = StepGuard(GuardsConfig(spike_factor=2.0, spike_window_steps=2, warmup_steps=0, spike_action="rollback"))
    for step, loss in [(1, 1.0), (2, 1.0), (3, 1.5)]:
        _accept(guard, step, loss)
    planned = guard.judge(4, 10.0, [])
    assert planned.decision == ROLLED_BACK
    fallback = guard.settle(4, planned, True, 10.0, can_roll_back=False)
    assert fallback.decision == SKIPPED_SPIKE and "no complete checkpoint to roll back to" in fallback.reason
    guard.forget_after(2)  # back to the checkpoint of step 2: step 3 leaves the window
    assert guard.running_mean() is None and guard.judge(3, 10.0, []).decision == OK


def test_deepspeed_discarding_on_its_own_is_a_nonfinite_grad_norm_and_applying_a_skip_is_an_error():
    guard = StepGuard(GuardsConfig())
    final = guard.settle(1, Verdict(OK), update_discarded=True, mean_loss=1.0, can_roll_back=False)
    assert final == Verdict(SKIPPED_NONFINITE, "non-finite gradient norm")
    with pytest.raises(RuntimeError, match="DeepSpeed applied the update"):
        guard.settle(2, Verdict(SKIPPED_SPIKE, "x"), update_discarded=False, mean_loss=1.0, can_roll_back=False)


def test_bad_steps_in_a_row_give_an_abort_message_and_a_good_step_resets_the_count():
    guard = StepGuard(GuardsConfig(max_consecutive_bad_steps=2))
    bad = Verdict(SKIPPED_NONFINITE, "non-finite loss on ranks [0]")
    guard.settle(1, bad, True, math.nan, False)
    assert guard.abort_message() is None
    _accept(guard, 2, 1.0)
    guard.settle(3, bad, True, math.nan, False)
    assert guard.abort_message() is None
    guard.settle(4, bad, True, math.nan, False)
    message = guard.abort_message()
    assert message.startswith("guards: 2 bad steps in a row (guards.max_consecutive_bad_steps=2); the last, step 4")
    assert guard.counts[SKIPPED_NONFINITE] == 3


def test_fault_plan_reads_the_environment_fires_once_per_rank():
    plan = FaultPlan.from_env({"MMTRAIN_INJECT_LOSS": "3:nan@1, 5:x1000,6:raise"})
    assert plan.take(3, 0) is None
    nan = plan.take(3, 1)
    assert math.isnan(nan.apply(2.0)) and plan.take(3, 1) is None  # a rolled-back step 3 is clean
    assert plan.take(5, 0).apply(2.0) == 2000.0
    with pytest.raises(InjectedFault, match="step 6"):
        plan.take(6, 1).apply(1.0)
    assert FaultPlan.from_env({}).take(1, 0) is None
    with pytest.raises(ValueError, match="MMTRAIN_INJECT_LOSS: cannot read '4:boom'"):
        FaultPlan.from_env({"MMTRAIN_INJECT_LOSS": "4:boom"})


@pytest.mark.parametrize("override, key", [
    ("guards.spike_factor=1.0", "guards.spike_factor"),
    ("guards.spike_factor=-2", "guards.spike_factor"),
    ("guards.spike_action=rewind", "guards.spike_action"),
    ("guards.spike_window_steps=0", "guards.spike_window_steps"),
    ("guards.max_consecutive_bad_steps=0", "guards.max_consecutive_bad_steps"),
    ("guards.warmup_steps=-1", "guards.warmup_steps"),
])
def test_guards_section_errors_name_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, [override])
    assert e.value.key == key


def test_guards_rollback_without_checkpoints_warns():
    _, warnings = load_config(TINY, ["guards.spike_action=rollback", "checkpoint.every_steps=0"])
    assert any("guards.spike_action=rollback" in w and "skipped instead" in w for w in warnings)
    _, warnings = load_config(TINY, ["guards.spike_action=rollback", "guards.spike_factor=0"])
    assert any("has no effect" in w for w in warnings)


def test_guard_state_survives_a_checkpoint_round_trip():
    """A resumed run judges its next step as the uninterrupted run would: same window, same streak."""
    import json

    cfg = GuardsConfig(spike_factor=2.0, spike_window_steps=2, warmup_steps=0, max_consecutive_bad_steps=3)
    guard = StepGuard(cfg)
    for step, loss in ((1, 1.0), (2, 1.2)):
        guard.settle(step, guard.judge(step, loss, []), False, loss, False)
    guard.settle(3, guard.judge(3, 9.0, []), True, 9.0, False)  # a spike, skipped
    resumed = StepGuard(cfg)
    resumed.load_state_dict(json.loads(json.dumps(guard.state_dict())))  # as trainer_state.json holds it
    assert resumed.running_mean() == guard.running_mean() == pytest.approx(1.1)
    assert resumed.consecutive_bad_steps == guard.consecutive_bad_steps == 1
    assert resumed.counts == guard.counts and sum(resumed.counts.values()) == 1
    assert resumed.judge(4, 2.3, []).decision == guard.judge(4, 2.3, []).decision != OK
