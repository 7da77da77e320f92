"""`mmtrain submit slurm` (being written)."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("slurm", help="submit a recipe to slurm (not written yet)")
    p.set_defaults(func=_cmd)


def _cmd(args, _overrides) -> int:
    raise SystemExit("mmtrain submit slurm is not written yet")
