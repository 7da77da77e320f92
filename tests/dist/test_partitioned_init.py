"""A model built under ZeRO-3's zero.Init starts from the same initialisation as a plain build."""

import os

import pytest
from helpers import run_ranks

pytestmark = pytest.mark.dist


def test_partitioned_build_matches_plain_initialisation():
    done = run_ranks(2, [os.path.join(os.path.dirname(__file__), "partitioned_init.py")], timeout_s=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("parameters match") == 2
