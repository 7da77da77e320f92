"""Fused kernels (mmtrain.models.kernels) give the eager modules' numbers: loss, logits and every
gradient of a tiny IDEFICS model, with the fused RMSNorm, SwiGLU and loss installed or not."""

import copy

import torch

from mmtrain.models import build_model, kernels
from mmtrain.models.loss import causal_lm_loss

TOKEN_IDS = {"image": 509, "end_of_chunk": 510, "answer": 511, "bos": 1, "eos": 2, "pad": 3,
             "base_vocab_size": 509, "num_added_tokens": 3}


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch, z_loss_weight=1e-2)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), out.logits.detach(), grads


def test_installed_kernels_match_eager_modules():
    torch.manual_seed(0)
    eager = build_model("idefics-tiny", {}, TOKEN_IDS)
    fused = copy.deepcopy(eager)
    counts = kernels.install(fused)
    decoder_layers = fused.config.decoder.num_hidden_layers
    # Two norms per decoder layer and a final one, the gated blocks' norms; one MLP per layer and block.
    assert counts["rms_norm"] >= 2 * decoder_layers + 1 and counts["gated_mlp"] >= decoder_layers
    assert counts["loss"] == 1 and fused.loss_fn is kernels.fused_causal_lm_loss
    ids = torch.randint(4, 509, (2, 24))
    ids[0, 5], ids[1, 0] = TOKEN_IDS["image"], TOKEN_IDS["image"]
    labels = ids.clone()
    labels[:, :3] = -100
    size = eager.config.vision.image_size_px
    batch = {"input_ids": ids, "labels": labels,
             "images": torch.randint(0, 256, (2, 1, 3, size, size), dtype=torch.uint8)}
    loss_e, logits_e, grads_e = _loss_and_grads(eager, batch)
    loss_f, logits_f, grads_f = _loss_and_grads(fused, batch)
    torch.testing.assert_close(logits_f, logits_e, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss_f, loss_e, rtol=1e-5, atol=1e-6)
    assert grads_f.keys() == grads_e.keys() and grads_e
    for name in grads_e:
        torch.testing.assert_close(grads_f[name], grads_e[name], rtol=1e-4, atol=1e-6, msg=name)


def test_fused_loss_ignores_masked_positions_like_the_eager_loss():
    torch.manual_seed(1)
    logits = torch.randn(2, 7, 11, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 11, (2, 7))
    labels[1] = -100  # a row without targets
    eager = causal_lm_loss(logits, labels, 0.1)
    fused = kernels.fused_causal_lm_loss(logits, labels, 0.1)
    for e, f in zip(eager, fused):
        torch.testing.assert_close(f, e, rtol=1e-6, atol=1e-6)
    (grad_e,) = torch.autograd.grad(eager[0], logits)
    (grad_f,) = torch.autograd.grad(fused[0], logits)
    torch.testing.assert_close(grad_f, grad_e)
