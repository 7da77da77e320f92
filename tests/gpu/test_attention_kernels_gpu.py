"""FlexAttention trains (forward and backward, compiled) to the same loss and gradients as the dense
kernels, on packed rows, for every kernel mmtrain adds: LLaMA and Persimmon decoders through
transformers' interface, Flamingo and IDEFICS cross-attention, MPT with ALiBi. A new packing of the
same shape does not recompile. (tests/unit/test_attention_kernels.py checks the forwards on CPU.)
"""

import pytest
import torch
from helpers import same_weights_pair

pytestmark = pytest.mark.gpu

IMAGE, PAD, BOS, EOS = 50, 0, 1, 2
FLAMINGO_IDS = dict(image=IMAGE, end_of_chunk=51, answer=52, bos=BOS, eos=EOS, pad=PAD, base_vocab_size=50, num_added_tokens=3)
SEQ = 256  # two 128-token tiles per row, so block sparsity is exercised


def _packed_rows(doc_lengths, images_per_doc, gen):
    """One row per list of document lengths: <bos>, 3 text tokens, then the document's images spread over it."""
    rows, positions = [], []
    for lengths in doc_lengths:
        row, pos = [], []
        for length in lengths:
            doc = [BOS] + torch.randint(5, 50, (length - 1,), generator=gen).tolist()
            for k in range(images_per_doc):
                doc[4 + k * (length - 4) // images_per_doc] = IMAGE
            row += doc
            pos += list(range(length))
        rows.append(row)
        positions.append(pos)
    return torch.tensor(rows), torch.tensor(positions)


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch, labels=batch["input_ids"])
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _kernels(decoder, cross):
    return {"decoder": {"attn_implementation": decoder}, "cross_attn_implementation": cross}


@pytest.mark.parametrize("flavour,dense_decoder", [("otter-tiny", "sdpa"), ("idefics-tiny", "sdpa"),
                                                   ("openflamingo-tiny-mpt", "eager")])
def test_flex_trains_like_the_dense_kernels(flavour, dense_decoder):
    dense, flex = same_weights_pair(flavour, FLAMINGO_IDS, _kernels(dense_decoder, "sdpa"),
                                    _kernels("flex_attention", "flex_attention"), device="cuda")
    gen = torch.Generator().manual_seed(0)
    size = dense.config.vision.image_size_px
    packings = ([[100, 60, 96], [SEQ]], [[40, 216], [128, 128]], [[SEQ], [30, 30, 196]])
    graphs = []
    for step, doc_lengths in enumerate(packings):
        ids, positions = _packed_rows(doc_lengths, 2, gen)
        images = torch.randn(2, 6, 3, size, size, generator=gen)
        batch = {"input_ids": ids.cuda(), "images": images.cuda(), "position_ids": positions.cuda()}
        loss_dense, grads_dense = _loss_and_grads(dense, batch)
        loss_flex, grads_flex = _loss_and_grads(flex, batch)
        torch.testing.assert_close(loss_flex, loss_dense, atol=1e-4, rtol=1e-4)
        assert grads_flex.keys() == grads_dense.keys()
        for name, grad in grads_dense.items():
            torch.testing.assert_close(grads_flex[name], grad, atol=2e-4, rtol=2e-3, msg=f"step {step}: {name}")
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    assert graphs[2] == graphs[0], f"a new packing recompiled flex attention: {graphs}"


def test_fuyu_flex_trains_like_sdpa():
    token_ids = dict(image=297, end_of_chunk=299, answer=296, bos=BOS, eos=EOS, pad=PAD, base_vocab_size=296, num_added_tokens=4)
    dense, flex = same_weights_pair("fuyu-tiny", token_ids, {"decoder": {"attn_implementation": "sdpa"}},
                                    {"decoder": {"attn_implementation": "flex_attention"}}, device="cuda")
    gen = torch.Generator().manual_seed(0)
    ids, positions = _packed_rows([[100, 156], [SEQ]], 0, gen)
    ids[:, [1, 2]] = 297
    indices = torch.full_like(ids, -1)
    indices[ids == 297] = torch.tensor([0, 1, 0, 1])
    patches = torch.randint(0, 256, (2, 2, dense.config.patch_dim), generator=gen, dtype=torch.uint8)
    batch = {"input_ids": ids.cuda(), "image_patches": patches.cuda(), "image_patch_indices": indices.cuda(),
             "position_ids": positions.cuda()}
    loss_dense, grads_dense = _loss_and_grads(dense, batch)
    loss_flex, grads_flex = _loss_and_grads(flex, batch)
    torch.testing.assert_close(loss_flex, loss_dense, atol=1e-4, rtol=1e-4)
    for name, grad in grads_dense.items():
        torch.testing.assert_close(grads_flex[name], grad, atol=2e-4, rtol=2e-3, msg=name)
