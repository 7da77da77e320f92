"""Preemption: a stop signal becomes "save at the next step boundary, exit with PREEMPTED_EXIT_CODE".

Slurm sends SIGUSR1 (`--signal=USR1@300`, what `mmtrain submit slurm` asks for by default) ahead of the time limit and SIGTERM when it preempts or
cancels; SageMaker and Kubernetes send SIGTERM. A handler only raises a flag here: the step loop
all-reduces the flag with the step's other numbers, so every rank stops after the same step even
when the signal reached only some of them (a user's `kill` of one rank), then every rank saves its
part of one checkpoint and the process returns the code below.
"""

from __future__ import annotations

import signal
from typing import Callable, Dict, Optional

# EX_TEMPFAIL from sysexits.h: a temporary failure, try again later. A rank that received SIGTERM or
# SIGUSR1, saved a complete checkpoint at a step boundary and exited returns it; the Slurm batch
# script requeues the job on it, and resume=auto continues from that checkpoint.
PREEMPTED_EXIT_CODE = 75

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopSignals:
    """Remembers the first stop signal this process received; `install()` from the main thread.

    The handler does nothing but record the signal (logging from a handler can deadlock on the
    logging lock). A repeated signal changes nothing: the save that follows the first must not be
    cut short, and SIGKILL remains the way to stop at once.
    """

    def __init__(self) -> None:
        self.received: Optional[int] = None
        self._previous: Dict[int, Callable] = {}

    def install(self) -> "StopSignals":
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, _frame) -> None:
        if self.received is None:
            self.received = signum

    @property
    def requested(self) -> bool:
        return self.received is not None

    @property
    def installed(self) -> bool:
        return bool(self._previous)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
