"""torchrun for one node of a scheduler's job step: `python -m mmtrain.submit.agent <torchrun arguments>`.

It takes torchrun's arguments and runs torchrun's own launcher, with two differences that preemption
needs:

- Slurm delivers a step signal (`--signal=USR1@t`, `scancel --signal`, SIGTERM on cancel) to every
  process of the step, the ranks and this agent alike. Plain torchrun dies on SIGUSR1 (no handler)
  and answers SIGTERM by terminating its ranks after a 30 s grace, either way before the ranks have
  finished saving. Here the agent only notes the signal and keeps waiting: the ranks handle it
  (save at the next step boundary, exit PREEMPTED_EXIT_CODE).
- torchrun exits 1 whenever a rank fails. Here, when the ranks exited PREEMPTED_EXIT_CODE (those the
  agent stopped afterwards died of its signal), the agent exits PREEMPTED_EXIT_CODE too, so srun and
  the batch script see "saved, requeue me".
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Iterable, List, Optional

from mmtrain.engine.preemption import PREEMPTED_EXIT_CODE

# The signals the ranks answer with save-and-exit; the agent must survive them.
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# torchrun installs its rank-killing handler for each signal named here (default
# SIGTERM,SIGINT,SIGHUP,SIGQUIT); the preemption signals are left out on purpose.
AGENT_HANDLED_SIGNALS = "SIGINT,SIGHUP,SIGQUIT"


def is_preempted(rank_exit_codes: Iterable[int]) -> bool:
    """True when some rank exited PREEMPTED_EXIT_CODE and every other failed rank either did too or
    was killed by a signal (negative code: stopped by the agent once the first rank had exited)."""
    codes = list(rank_exit_codes)
    return PREEMPTED_EXIT_CODE in codes and all(c == PREEMPTED_EXIT_CODE or c < 0 for c in codes)


def _note_signal(signum, _frame) -> None:
    print(f"mmtrain agent (pid {os.getpid()}): got {signal.Signals(signum).name}; the ranks got it too and "
          "exit after saving, waiting for them", file=sys.stderr, flush=True)


def main(argv: Optional[List[str]] = None) -> int:
    for sig in PREEMPTION_SIGNALS:
        signal.signal(sig, _note_signal)
    os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = AGENT_HANDLED_SIGNALS
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(sys.argv[1:] if argv is None else argv))
    except ChildFailedError as e:
        codes = {rank: failure.exitcode for rank, failure in e.failures.items()}
        if is_preempted(codes.values()):
            print(f"mmtrain agent: ranks exited {codes}: preempted after saving, exit {PREEMPTED_EXIT_CODE}",
                  file=sys.stderr, flush=True)
            return PREEMPTED_EXIT_CODE
        print(f"mmtrain agent: ranks failed with exit codes {codes}\n{e}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
