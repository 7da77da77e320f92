"""A rank that keeps the preemption contract without training, for tests of the launch mechanics
(agent, batch script, requeue): `python preempt_probe.py LOG [args ...]`.

It appends "<restart> <rank> <event>" lines to LOG, waits for SIGUSR1 or SIGTERM and then exits
PREEMPTED_EXIT_CODE, as a training rank does after saving. In a requeued Slurm job
(SLURM_RESTART_COUNT > 0) it exits 0 at once. With PROBE_EXIT_CODE=N in the environment it exits N
at once instead (a rank that fails).
"""

import os
import signal
import sys
import time

from mmtrain.engine.preemption import PREEMPTED_EXIT_CODE

WAIT_FOR_SIGNAL_S = 300


def main() -> int:
    log_path, args = sys.argv[1], sys.argv[2:]
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    rank = os.environ.get("RANK", "?")

    def log(event: str) -> None:
        with open(log_path, "a") as f:
            f.write(f"{restart} {rank} {event}\n")

    def on_signal(signum, _frame) -> None:
        log(f"signal {signal.Signals(signum).name}")
        sys.exit(PREEMPTED_EXIT_CODE)

    log("args " + " ".join(args))
    if "PROBE_EXIT_CODE" in os.environ:
        return int(os.environ["PROBE_EXIT_CODE"])
    if restart > 0:
        log("done")
        return 0
    signal.signal(signal.SIGUSR1, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    log("ready")
    time.sleep(WAIT_FOR_SIGNAL_S)
    log("never signalled")
    return 1


if __name__ == "__main__":
    sys.exit(main())
