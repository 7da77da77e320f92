"""A finished rank's exit: gloo's worker threads can still free the last collectives' tensors when
the rank ends, which aborted ranks in interpreter teardown after the run had finished and saved
(SIGABRT, "terminate called without an active exception"). exit_process ends the process without
that teardown."""

import os

import pytest
from helpers import run_ranks

pytestmark = pytest.mark.dist

PROBE = os.path.join(os.path.dirname(__file__), "exit_race_probe.py")


def test_a_rank_ends_cleanly_while_gloo_workers_still_hold_its_tensors():
    # With `--plain` (sys.exit) this probe aborted in 7 of 9 launches on a 2-core machine; each
    # launch here would catch an exit_process that stopped protecting with that likelihood.
    for _ in range(3):
        done = run_ranks(2, [PROBE], timeout_s=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "terminate called" not in done.stderr
