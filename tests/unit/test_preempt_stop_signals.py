"""StopSignals with real signals to this process: the first stop signal is remembered, repeats
change nothing, and uninstall gives the previous handlers back."""

import os
import signal

from mmtrain.engine.preemption import PREEMPTED_EXIT_CODE, StopSignals, signal_name


def test_first_stop_signal_is_remembered_and_handlers_restored():
    previous = signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGTERM)
    stop = StopSignals().install()
    try:
        assert stop.installed and not stop.requested
        os.kill(os.getpid(), signal.SIGUSR1)  # handled before os.kill returns (main thread)
        assert stop.requested and stop.received == signal.SIGUSR1
        os.kill(os.getpid(), signal.SIGTERM)  # a repeat does not replace the first, nor kill the process
        assert stop.received == signal.SIGUSR1
    finally:
        stop.uninstall()
    assert (signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGTERM)) == previous
    assert not stop.installed
    assert signal_name(signal.SIGTERM) == "SIGTERM" and signal_name(250) == "signal 250"
    assert PREEMPTED_EXIT_CODE == 75  # the Slurm script requeues on this value
