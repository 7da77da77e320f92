"""Preemption: the exit code that tells a scheduler "saved, requeue me"."""

from __future__ import annotations

# EX_TEMPFAIL from sysexits.h: a temporary failure, try again later. A rank that received SIGTERM or
# SIGUSR1, saved a complete checkpoint at a step boundary and exited returns it; the Slurm batch
# script requeues the job on it, and resume=auto continues from that checkpoint.
PREEMPTED_EXIT_CODE = 75
