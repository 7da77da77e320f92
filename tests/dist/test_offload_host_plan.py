"""`mmtrain plan`'s host memory under optimizer offload against real DeepSpeed (ZeRO-2 and ZeRO-3, 2
CPU ranks, idefics-tiny with mmtrain's AdamW groups and several ZeRO-3 sub-groups): the plan lays the
rank's fp32 partitions out as DeepSpeed does, and counts every host tensor DeepSpeed keeps for them."""

import os

import pytest
import torch
from helpers import run_ranks

pytestmark = pytest.mark.dist

PROBE = os.path.join(os.path.dirname(__file__), "offload_host_probe.py")


def test_plan_host_bytes_match_deepspeeds_offload_buffers(tmp_path):
    out = str(tmp_path / "host.pt")
    done = run_ranks(2, [PROBE, out])
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    result = torch.load(out)
    assert len(result[3]["parts"]) > len(result[2]["parts"]) >= 2  # sub-groups at stage 3, AdamW groups at 2
    for stage in (2, 3):
        got = result[stage]
        assert got["planned_parts"] == got["parts"], stage
        assert got["planned_bytes"] == got["host_bytes"], (stage, got["tensors"])
