"""Causal-LM loss with PaLM's z-loss, computed in fp32 whatever the model's dtype.

Labels sit at the same position as the input token (the data path does not shift); the logits
at position t predict the label at t+1. `-100` marks positions that are not trained.
"""

from __future__ import annotations

from typing import Tuple

import torch

IGNORE_INDEX = -100


def causal_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, z_loss_weight: float = 0.0
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return `(loss, ce, z)` as fp32 scalars, where loss = ce + z_loss_weight * z.

    ce is the mean cross-entropy over supervised tokens of the batch and z the mean of
    logsumexp(logits)^2 over the same tokens. A batch without supervised tokens gives zeros that
    still depend on `logits`, so backward runs (and every ZeRO-3 rank reduces the same grads).
    """
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on [B, T]")
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    supervised = shift_labels != IGNORE_INDEX
    log_z = torch.logsumexp(shift_logits, dim=-1)
    target_logit = shift_logits.gather(-1, shift_labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    # Ignored positions contribute exactly zero; their (arbitrary) logits still get a zero grad.
    zero = log_z.new_zeros(())
    nll = torch.where(supervised, log_z - target_logit, zero)
    z_sq = torch.where(supervised, log_z.square(), zero)
    num_supervised = supervised.sum().clamp(min=1)
    ce = nll.sum() / num_supervised
    z = z_sq.sum() / num_supervised
    return ce + z_loss_weight * z, ce, z
