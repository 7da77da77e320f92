"""ZeRO-3 optimizer offload on CPU (2 ranks, gloo, real DeepSpeed): the gradient clip folded into
torch's fused host AdamW (mmtrain.engine.offload.install_folded_clip) updates the weights as
DeepSpeed's own clip does, and is exact where the clip does not act."""

import os

import pytest
import torch
from helpers import run_ranks

pytestmark = pytest.mark.dist

PROBE = os.path.join(os.path.dirname(__file__), "offload_clip_probe.py")


def _probe(tmp_path, clip_threshold: float) -> dict:
    out = str(tmp_path / "clip.pt")
    done = run_ranks(2, [PROBE, out, str(clip_threshold)])
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    result = torch.load(out)
    assert not result["deepspeed"]["installed"] and result["folded"]["installed"]
    assert result["folded"]["sub_groups"] >= 3  # several host updates per rank and step
    assert not result["folded"]["grad_scale_left"]  # nothing left on the AdamW after the step
    assert result["sharing_ranks"] == 2  # both ranks, found by the gather (its fallback here would say 1)
    return result


def test_folded_clip_updates_as_deepspeeds_clip_does(tmp_path):
    clip = 0.05
    result = _probe(tmp_path, clip)
    ours, theirs = result["folded"], result["deepspeed"]
    assert ours["norms"] == pytest.approx(theirs["norms"], rel=1e-5)
    assert min(ours["norms"]) > 10 * clip  # the clip acts at every step
    for rank_ours, rank_theirs in zip(ours["ranks"], theirs["ranks"]):
        assert all(scale is None for scale in rank_theirs["scales"])  # DeepSpeed multiplied the gradients itself
        # The AdamW was handed DeepSpeed's factor, norm/threshold, at every sub-group update.
        per_step = len(rank_ours["scales"]) // len(ours["norms"])
        expected = [(norm + 1e-6) / clip for norm in ours["norms"] for _ in range(per_step)]
        assert rank_ours["scales"] == pytest.approx(expected, rel=1e-5)
        for mine, reference in zip(rank_ours["flats"], rank_theirs["flats"]):
            # x/s against x*(1/s): the gradients differ by an ulp at most, the weights (lr 1e-2,
            # 3 steps) by far less than one update.
            assert (mine - reference).abs().max() <= 1e-6
            assert (mine != reference).float().mean() < 0.2


def test_folded_clip_is_exact_where_the_clip_does_not_act(tmp_path):
    result = _probe(tmp_path, 1000.0)
    ours, theirs = result["folded"], result["deepspeed"]
    assert max(ours["norms"]) < 1000.0
    for rank_ours, rank_theirs in zip(ours["ranks"], theirs["ranks"]):
        assert all(scale is None for scale in rank_ours["scales"])  # a factor of 1 is left out
        for mine, reference in zip(rank_ours["flats"], rank_theirs["flats"]):
            assert torch.equal(mine, reference)
