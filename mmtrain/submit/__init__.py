"""`mmtrain submit {slurm,sagemaker}`: write a job for a cluster scheduler and submit it.

Each target module has `add_parser(subparsers)`, which registers its own arguments and handler,
so the command line learns a new target without growing `if target == ...` branches.
"""

from __future__ import annotations

from mmtrain.submit import sagemaker, slurm

TARGETS = (slurm, sagemaker)


def add_parsers(subparsers) -> None:
    for target in TARGETS:
        target.add_parser(subparsers)
