"""A failing rank's report through a real rendezvous store (a TCPStore in this process): its own
traceback, the other ranks' posted errors, and the ranks that stayed silent; and the watchdog
that ends a process whose shutdown hangs after a failure."""

import datetime
import logging
import subprocess
import sys

import pytest
import torch

from mmtrain.engine import distributed


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture()
def store(monkeypatch):
    port = distributed.free_port()
    master = torch.distributed.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False,
                                        timeout=datetime.timedelta(seconds=10))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", f"test{port}")  # keys of this test only
    return master


def _logger():
    log = logging.getLogger(f"test.failure.{id(object())}")
    log.propagate = False
    handler = _Lines()
    log.addHandler(handler)
    return log, handler.lines


def _raise(message):
    try:
        raise ValueError(message)
    except ValueError as error:
        return error


def test_report_names_the_ranks_that_failed_and_the_silent_ones(store):
    store.set(distributed._failure_key(1), "InjectedFault: injected fault at step 3 (at trainer.py:10 in train_step)")
    log, lines = _logger()
    broken = RuntimeError("[gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:4242: Connection reset by peer")
    posts = distributed.report_failure(broken, rank=0, world_size=3, log=log, wait_s=1.0)
    assert sorted(posts) == [0, 1]
    assert lines[0].startswith("rank 0 failed: Traceback") or lines[0].startswith("rank 0 failed: RuntimeError")
    assert "rank 0: rank 1 failed: InjectedFault: injected fault at step 3 (at trainer.py:10 in train_step)" in lines
    assert any(line.startswith("rank 0: ranks [2] reported no error within 1 s") for line in lines), lines
    # Rank 2's own error started nothing collective: it posts (with where it was raised) and does
    # not wait for the others, who learn of it when its connections close.
    log2, lines2 = _logger()
    posts2 = distributed.report_failure(_raise("bad batch"), rank=2, world_size=3, log=log2, wait_s=30.0)
    assert list(posts2) == [2] and len(lines2) == 1 and "ValueError: bad batch" in lines2[0]
    assert store.get(distributed._failure_key(2)).decode().startswith("ValueError: bad batch (at ")


def test_watchdog_ends_a_process_whose_shutdown_hangs():
    code = "import time\nfrom mmtrain.engine.distributed import exit_watchdog\nexit_watchdog(7, 0.5)\ntime.sleep(120)\n"
    done = subprocess.run([sys.executable, "-c", code], timeout=100)
    assert done.returncode == 7


def test_exit_process_runs_exit_handlers_and_skips_teardown(tmp_path):
    """A finished rank ends through exit_process: its exit handlers run and its buffered output
    arrives (a pipe, as under a launcher), the code is kept, and the interpreter's teardown, where
    gloo's worker threads can abort the process, is skipped (a global's finaliser never runs)."""
    marker = tmp_path / "atexit.txt"
    code = (
        "import atexit, sys\n"
        "from mmtrain.engine.distributed import exit_process\n"
        "class Teardown:\n"
        "    def __del__(self):\n"
        "        print('teardown ran', flush=True)\n"
        "kept = Teardown()\n"
        f"atexit.register(lambda: open({str(marker)!r}, 'w').write('ran'))\n"
        "print('buffered line')\n"
        "sys.stderr.write('buffered error')\n"
        "exit_process(5)\n"
        "print('not reached')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=100)
    assert done.returncode == 5
    assert done.stdout == "buffered line\n" and "buffered error" in done.stderr
    assert marker.read_text() == "ran"
    # The same script with sys.exit tears down, so the finaliser runs: the check above can fail.
    normal = subprocess.run([sys.executable, "-c", code.replace("exit_process(5)", "sys.exit(5)")],
                            capture_output=True, text=True, timeout=100)
    assert normal.returncode == 5 and "teardown ran" in normal.stdout
