"""causal_lm_loss: shifted CE against torch's cross_entropy, hand-computed z-loss, fp32, empty batches."""

import math

import pytest
import torch
import torch.nn.functional as F

from mmtrain.models.loss import IGNORE_INDEX, causal_lm_loss

VOCAB = 11


def _batch(seed: int = 0, batch: int = 3, seq: int = 7):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, seq, VOCAB, generator=generator) * 3
    labels = torch.randint(0, VOCAB, (batch, seq), generator=generator)
    labels[torch.rand(batch, seq, generator=generator) < 0.4] = IGNORE_INDEX
    labels[0, 3] = 5  # at least one supervised token whatever the seed
    return logits, labels


def test_ce_matches_torch_cross_entropy_on_shifted_tokens():
    logits, labels = _batch()
    _, ce, _ = causal_lm_loss(logits, labels, 0.0)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(ce, expected)


def test_z_loss_is_mean_squared_logsumexp_over_supervised_tokens():
    logits, labels = _batch(seed=1)
    weight = 1e-2
    loss, ce, z = causal_lm_loss(logits, labels, weight)
    squares = [
        math.log(sum(math.exp(v) for v in logits[b, t - 1].tolist())) ** 2
        for b in range(labels.shape[0])
        for t in range(1, labels.shape[1])
        if labels[b, t] != IGNORE_INDEX
    ]
    assert z.item() == pytest.approx(sum(squares) / len(squares), rel=1e-5)
    torch.testing.assert_close(loss, ce + weight * z)


def test_label_at_position_zero_is_never_a_target():
    logits, labels = _batch(seed=2)
    other = labels.clone()
    other[:, 0] = 3
    for a, b in zip(causal_lm_loss(logits, labels, 1e-3), causal_lm_loss(logits, other, 1e-3)):
        assert torch.equal(a, b)


def test_gradients_match_torch_cross_entropy():
    logits, labels = _batch(seed=3)
    ours = logits.clone().requires_grad_()
    causal_lm_loss(ours, labels, 0.0)[0].backward()
    reference = logits.clone().requires_grad_()
    F.cross_entropy(
        reference[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
    ).backward()
    torch.testing.assert_close(ours.grad, reference.grad)


def test_bf16_logits_give_fp32_losses():
    logits, labels = _batch(seed=4)
    logits_bf16 = logits.to(torch.bfloat16)
    outputs = causal_lm_loss(logits_bf16, labels, 1e-3)
    assert all(out.dtype == torch.float32 and out.dim() == 0 for out in outputs)
    for ours, expected in zip(outputs, causal_lm_loss(logits_bf16.float(), labels, 1e-3)):
        torch.testing.assert_close(ours, expected)


def test_batch_without_supervised_tokens_is_zero_with_a_grad_path():
    logits, labels = _batch(seed=5)
    labels.fill_(IGNORE_INDEX)
    logits.requires_grad_()
    loss, ce, z = causal_lm_loss(logits, labels, 1e-3)
    assert loss.item() == 0.0 and ce.item() == 0.0 and z.item() == 0.0
    loss.backward()
    assert logits.grad is not None and torch.count_nonzero(logits.grad) == 0


def test_shape_mismatch_is_an_error():
    logits, labels = _batch()
    with pytest.raises(ValueError, match="disagree"):
        causal_lm_loss(logits, labels[:, :-1])
