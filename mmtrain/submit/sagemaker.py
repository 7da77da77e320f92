"""`mmtrain submit sagemaker` (being written)."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("sagemaker", help="submit a recipe to sagemaker (not written yet)")
    p.set_defaults(func=_cmd)


def _cmd(args, _overrides) -> int:
    raise SystemExit("mmtrain submit sagemaker is not written yet")
