"""Step guards: one global decision per optimizer step, taken before the update is applied.

A step is *bad* when some rank's loss is not finite, when DeepSpeed finds the gradient norm not
finite, or when the mean loss spikes above `guards.spike_factor` times the running mean of the
last `guards.spike_window_steps` accepted steps. Every rank judges the same all-reduced numbers, so
every rank takes the same decision without another collective:

    ok                 the update is applied
    skipped_nonfinite  the update is discarded (non-finite loss or gradient norm)
    skipped_spike      the update is discarded (guards.spike_action=skip)
    rolled_back        the update is discarded, the last complete checkpoint is restored and the
                       data window since it is skipped (guards.spike_action=rollback)

A discarded update goes through DeepSpeed's own path for a non-finite gradient norm (gradients
dropped, optimizer state untouched, `skipped_steps` counted), which every ZeRO stage implements.
`guards.max_consecutive_bad_steps` bad steps in a row abort the run with :class:`GuardAbort`.

Tests inject bad steps without a recipe key through the environment (see :class:`FaultPlan`).
"""

from __future__ import annotations

import math
import os
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, Deque, Dict, List, Mapping, Optional, Tuple

from mmtrain.config.schema import GuardsConfig

OK = "ok"
SKIPPED_NONFINITE = "skipped_nonfinite"
SKIPPED_SPIKE = "skipped_spike"
ROLLED_BACK = "rolled_back"
DECISIONS = (OK, SKIPPED_NONFINITE, SKIPPED_SPIKE, ROLLED_BACK)

# The reason under which a bad step's samples are counted in `skipped_samples`, next to the data
# pipeline's reasons for broken samples.
SKIP_REASONS = {SKIPPED_NONFINITE: "guard_nonfinite", SKIPPED_SPIKE: "guard_spike", ROLLED_BACK: "guard_rollback"}


class GuardAbort(RuntimeError):
    """Too many bad steps in a row: training is not making progress."""


@dataclass(frozen=True)
class Verdict:
    decision: str
    reason: str = ""

    @property
    def discards_update(self) -> bool:
        return self.decision != OK


class StepGuard:
    """The guard's state: the running mean of accepted losses and the count of bad steps in a row.

    Saved in each checkpoint (`state_dict`), so a resumed run judges its next steps as the
    uninterrupted run would have.
    """

    def __init__(self, cfg: GuardsConfig):
        self.cfg = cfg
        self._losses: Deque[Tuple[int, float]] = deque(maxlen=cfg.spike_window_steps)
        self.consecutive_bad_steps = 0
        self.counts: Counter = Counter()
        self._last_bad: Optional[Tuple[int, Verdict]] = None

    def state_dict(self) -> Dict[str, Any]:
        """JSON-serialisable: the accepted losses in the window, the bad-step streak and the counts."""
        return {"losses": [[step, loss] for step, loss in self._losses],
                "consecutive_bad_steps": self.consecutive_bad_steps, "counts": dict(self.counts)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._losses.clear()
        self._losses.extend((int(step), float(loss)) for step, loss in state["losses"])
        self.consecutive_bad_steps = int(state["consecutive_bad_steps"])
        self.counts = Counter({k: int(v) for k, v in state["counts"].items()})

    def running_mean(self) -> Optional[float]:
        """Mean loss of the last accepted steps, once the window is full; None before."""
        if len(self._losses) < self.cfg.spike_window_steps:
            return None
        return sum(loss for _, loss in self._losses) / len(self._losses)

    def judge(self, step: int, mean_loss: float, nonfinite_ranks: List[int]) -> Verdict:
        """The decision before the update, from numbers every rank holds alike."""
        if nonfinite_ranks or not math.isfinite(mean_loss):
            return Verdict(SKIPPED_NONFINITE, f"non-finite loss on ranks {nonfinite_ranks}")
        mean = self.running_mean()
        if self.cfg.spike_factor > 0 and step > self.cfg.warmup_steps and mean is not None:
            if mean_loss > self.cfg.spike_factor * mean:
                decision = ROLLED_BACK if self.cfg.spike_action == "rollback" else SKIPPED_SPIKE
                return Verdict(decision, f"loss {mean_loss:.4g} > {self.cfg.spike_factor:g} x running mean "
                                         f"{mean:.4g} of the last {len(self._losses)} accepted steps")
        return Verdict(OK)

    def settle(self, step: int, planned: Verdict, update_discarded: bool, mean_loss: float,
               can_roll_back: bool) -> Verdict:
        """The final decision once DeepSpeed has stepped: it may have discarded an update the guard
        let through (non-finite gradient norm); a rollback without a checkpoint becomes a skip."""
        if planned.discards_update and not update_discarded:
            raise RuntimeError(
                f"guards: step {step} was to be discarded ({planned.decision}: {planned.reason}) but DeepSpeed "
                "applied the update; this DeepSpeed version does not discard a step on a non-finite gradient norm"
            )
        final = planned
        if not planned.discards_update and update_discarded:
            final = Verdict(SKIPPED_NONFINITE, "non-finite gradient norm")
        elif planned.decision == ROLLED_BACK and not can_roll_back:
            final = Verdict(SKIPPED_SPIKE, planned.reason + "; no complete checkpoint to roll back to, skipped instead")
        if final.discards_update:
            self.consecutive_bad_steps += 1
            self.counts[final.decision] += 1
            self._last_bad = (step, final)
        else:
            self.consecutive_bad_steps = 0
            self._losses.append((step, mean_loss))
        return final

    def forget_after(self, step: int) -> None:
        """A rollback to `step` undoes the accepted steps after it: they leave the running mean."""
        kept = [(s, loss) for s, loss in self._losses if s <= step]
        self._losses.clear()
        self._losses.extend(kept)

    def abort_message(self) -> Optional[str]:
        limit = self.cfg.max_consecutive_bad_steps
        if self.consecutive_bad_steps < limit or self._last_bad is None:
            return None
        step, verdict = self._last_bad
        return (f"guards: {self.consecutive_bad_steps} bad steps in a row (guards.max_consecutive_bad_steps={limit}); "
                f"the last, step {step}, was {verdict.decision}: {verdict.reason}. Training is not making progress: "
                "check the data and the learning rate (optim.lr, optim.warmup_steps); metrics.jsonl has every "
                "step's `guard` decision")


# ------------------------------------------------------------------ test-only fault injection
FAULT_ENV = "MMTRAIN_INJECT_LOSS"


class InjectedFault(RuntimeError):
    """Raised by a `raise` entry of MMTRAIN_INJECT_LOSS: a rank failing mid-step."""


@dataclass(frozen=True)
class LossFault:
    step: int
    what: str
    """nan, inf, xFACTOR (the loss times FACTOR) or raise."""
    rank: Optional[int] = None

    def apply(self, loss):
        if self.what == "raise":
            raise InjectedFault(f"injected fault at step {self.step} ({FAULT_ENV})")
        factor = {"nan": float("nan"), "inf": float("inf")}.get(self.what)
        return loss * (factor if factor is not None else float(self.what[1:]))


class FaultPlan:
    """Bad steps for tests, from `MMTRAIN_INJECT_LOSS="STEP:WHAT[@RANK],..."`, e.g. `3:nan@1,5:x1000`:
    step 3's loss is NaN on rank 1, step 5's loss is 1000 times larger on every rank. WHAT is nan,
    inf, xFACTOR or raise (the rank raises mid-step). Each entry fires once: a step trained again
    after a rollback is not poisoned again. Production runs leave the variable unset."""

    def __init__(self, faults: List[LossFault]):
        self._faults: Dict[int, List[LossFault]] = {}
        for fault in faults:
            self._faults.setdefault(fault.step, []).append(fault)

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None) -> "FaultPlan":
        spec = (os.environ if environ is None else environ).get(FAULT_ENV, "").strip()
        faults = []
        for entry in filter(None, (e.strip() for e in spec.split(","))):
            try:
                step_text, rest = entry.split(":", 1)
                what, _, rank_text = rest.partition("@")
                fault = LossFault(int(step_text), what, int(rank_text) if rank_text else None)
                if what not in ("nan", "inf", "raise"):
                    if not what.startswith("x"):
                        raise ValueError(what)
                    float(what[1:])
            except ValueError:
                raise ValueError(f"{FAULT_ENV}: cannot read {entry!r}; expected STEP:WHAT[@RANK] with WHAT one of "
                                 "nan, inf, xFACTOR, raise (e.g. 3:nan@1,5:x1000)") from None
            faults.append(fault)
        return cls(faults)

    def take(self, step: int, rank: int) -> Optional[LossFault]:
        """The fault for this rank at this step, at most once."""
        for fault in self._faults.get(step, []):
            if fault.rank in (None, rank):
                self._faults[step].remove(fault)
                return fault
        return None
