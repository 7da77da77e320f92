"""Attention kernels give the same model: SDPA, eager, FlexAttention (block masks) and mmtrain's MPT kernels.

FlexAttention has no CPU backward, so on CPU its forward is compared (no_grad); tests/gpu trains with it.
Every batch packs documents into rows (restarting positions), with text before the first image, a
document without images and padding, so the block masks carry every rule the dense masks do.
"""

import pytest
import torch
from helpers import same_weights_pair

from mmtrain.models.flamingo.blocks import media_attention_mask, media_image_index
from mmtrain.models.flex import flex_available

pytestmark = pytest.mark.skipif(not flex_available(), reason="this torch has no FlexAttention")

IMAGE, PAD, BOS, EOS = 50, 0, 1, 2
FLAMINGO_IDS = dict(image=IMAGE, end_of_chunk=51, answer=52, bos=BOS, eos=EOS, pad=PAD, base_vocab_size=50, num_added_tokens=3)


def _packed_flamingo_batch(image_px):
    """2 rows of 24 tokens: row 0 packs 3 documents (text before its first image; a text-only one);
    row 1 is one document with 2 images, then padding."""
    gen = torch.Generator().manual_seed(0)
    text = lambda n: torch.randint(5, 50, (n,), generator=gen).tolist()  # noqa: E731
    doc_a = [BOS] + text(2) + [IMAGE] + text(3) + [IMAGE] + text(1) + [EOS]  # 10
    doc_b = [BOS] + text(5) + [EOS]  # 7, no image
    doc_c = [BOS] + text(1) + [IMAGE] + text(3) + [EOS]  # 7
    row0 = doc_a + doc_b + doc_c
    row1 = [BOS, IMAGE] + text(6) + [IMAGE] + text(8) + [EOS] + [PAD] * 6
    ids = torch.tensor([row0, row1])
    positions = torch.tensor([
        list(range(10)) + list(range(7)) + list(range(7)),
        list(range(18)) + [0] * 6,
    ])
    images = torch.randn(2, 3, 3, image_px, image_px, generator=gen)
    return ids, positions, images


def _kernels(decoder, cross):
    return {"decoder": {"attn_implementation": decoder}, "cross_attn_implementation": cross}


@pytest.mark.parametrize("flavour", ["otter-tiny", "idefics-tiny", "openflamingo-tiny-mpt"])
def test_flex_block_masks_give_the_dense_masks_logits(flavour):
    sdpa, flex = (m.eval() for m in same_weights_pair(
        flavour, FLAMINGO_IDS, _kernels("sdpa", "sdpa"), _kernels("flex_attention", "flex_attention")))
    ids, positions, images = _packed_flamingo_batch(sdpa.config.vision.image_size_px)
    with torch.no_grad():
        expected = sdpa(ids, images, position_ids=positions).logits
        got = flex(ids, images, position_ids=positions).logits
    real = positions.ne(0) | ids.ne(PAD)
    torch.testing.assert_close(got[real], expected[real], atol=2e-5, rtol=1e-4)
    # The cross-attention reaches the logits at all: closing the gates moves them.
    for block in flex.gated_cross_attn_layers:
        for gate in ("attn_gate", "alpha_cross_attn"):
            if hasattr(block, gate):
                getattr(block, gate).data.zero_()
    with torch.no_grad():
        closed = flex(ids, images, position_ids=positions).logits
    assert (closed - got).abs().max() > 1e-3


def test_cross_attention_block_mask_matches_the_dense_rule():
    ids, positions, _ = _packed_flamingo_batch(8)
    dense, has_media = media_attention_mask(ids, IMAGE, num_images=3, num_latents=4, position_ids=positions)
    block, has_media_flex = media_attention_mask(
        ids, IMAGE, num_images=3, num_latents=4, position_ids=positions, kernel="flex_attention"
    )
    assert torch.equal(has_media, has_media_flex)
    from torch.nn.attention.flex_attention import BlockMask

    assert isinstance(block, BlockMask) and block.shape == (2, 1, 24, 12)
    # Evaluate the BlockMask's own mask_mod everywhere: it must be the dense mask on rows that see an image.
    b, q, kv = torch.meshgrid(torch.arange(2), torch.arange(24), torch.arange(12), indexing="ij")
    from_block = block.mask_mod(b, torch.zeros_like(b), q, kv)
    rows = has_media[..., 0]
    assert torch.equal(from_block[rows], dense[:, 0][rows])
    assert not from_block[~rows].any()
    # Row 0: doc a's text before its first image sees none; doc b (no image) sees none; doc c sees slot 2.
    assert media_image_index(ids, IMAGE, 3, positions)[0].tolist() == (
        [-1, -1, -1, 0, 0, 0, 0, 1, 1, 1] + [-1] * 7 + [-1, -1, 2, 2, 2, 2, 2]
    )


def test_mpt_sdpa_kernel_trains_like_transformers_eager():
    eager, sdpa = same_weights_pair("openflamingo-tiny-mpt", FLAMINGO_IDS, _kernels("eager", "sdpa"), _kernels("sdpa", "sdpa"))
    ids, positions, images = _packed_flamingo_batch(eager.config.vision.image_size_px)
    real = positions.ne(0) | ids.ne(PAD)
    grads = []
    for model in (eager, sdpa):
        model.train()
        logits = model(ids, images, position_ids=positions).logits
        logits[real].float().square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any("decoder.blocks.0.attn" in n for n in grads[0])
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_fuyu_flex_matches_sdpa_on_packed_segments():
    # fuyu-tiny's ids (tests/unit/test_models_fuyu.py): |SPEAKER| 297 is the patch placeholder.
    patch_id = 297
    ids_map = dict(image=patch_id, end_of_chunk=299, answer=296, bos=BOS, eos=EOS, pad=PAD, base_vocab_size=296, num_added_tokens=4)
    sdpa, flex = (m.eval() for m in same_weights_pair(
        "fuyu-tiny", ids_map, {"decoder": {"attn_implementation": "sdpa"}}, {"decoder": {"attn_implementation": "flex_attention"}}))
    assert flex.language_model.model.config._attn_implementation == "flex_attention"
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 290, (2, 20), generator=gen)
    ids[:, [0, 1]] = patch_id  # two patches before each row's first document's text
    ids[0, [8, 9]] = patch_id  # and two opening the second document of row 0
    indices = torch.full_like(ids, -1)
    indices[ids == patch_id] = torch.cat([torch.arange(4), torch.arange(2)])
    patches = torch.randint(0, 256, (2, 4, sdpa.config.patch_dim), generator=gen, dtype=torch.uint8)
    segments = torch.tensor([[1] * 8 + [2] * 12, [1] * 15 + [0] * 5])
    positions = torch.tensor([list(range(8)) + list(range(12)), list(range(15)) + list(range(15, 20))])
    with torch.no_grad():
        expected = sdpa(ids, patches, indices, position_ids=positions, segment_ids=segments).logits
        got = flex(ids, patches, indices, position_ids=positions, segment_ids=segments).logits
        across = flex(ids, patches, indices, position_ids=positions).logits  # boundaries from the positions
    torch.testing.assert_close(got[:, :15], expected[:, :15], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(across[0], expected[0], atol=2e-5, rtol=1e-4)
