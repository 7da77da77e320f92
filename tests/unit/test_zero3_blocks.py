"""ZeRO-3 leaf blocks (deepspeed.leaf_blocks): every block a model names is run through its own
__call__ in a forward pass (ZeRO-3 gathers a leaf's weights in its forward hook, so a block reached
any other way would run on empty partitions), and together they hold every decoder layer."""

import pytest
import torch

from mmtrain.models import build_model, get_spec

TOKEN_IDS = {"image": 509, "end_of_chunk": 510, "answer": 511, "bos": 1, "eos": 2, "pad": 3,
             "base_vocab_size": 509, "num_added_tokens": 3}
FUYU_TOKEN_IDS = {"image": 509, "end_of_chunk": 510, "answer": 511, "image_newline": 512, "bos": 1, "eos": 2,
                  "pad": 3, "base_vocab_size": 509, "num_added_tokens": 4}


def _batch(model, family):
    torch.manual_seed(0)
    ids = torch.randint(4, 509, (1, 16))
    if family == "fuyu":
        ids[0, :2] = FUYU_TOKEN_IDS["image"]  # two patches before <s>
        indices = torch.full_like(ids, -1)
        indices[0, :2] = torch.arange(2)
        patch_dim = model.config.patch_size_px ** 2 * model.config.num_channels
        return {"input_ids": ids, "image_patch_indices": indices,
                "image_patches": torch.randint(0, 256, (1, 2, patch_dim), dtype=torch.uint8)}
    size = model.config.vision.image_size_px
    ids[0, 2] = TOKEN_IDS["image"]
    return {"input_ids": ids, "images": torch.randint(0, 256, (1, 1, 3, size, size), dtype=torch.uint8)}


@pytest.mark.parametrize("name, overrides", [
    ("otter-tiny", {}), ("otter-tiny", {"vision": {"tower": "hf_clip", "pos_embed_type": "learnable"}}), ("idefics-tiny", {}),
    ("openflamingo-tiny-mpt", {}), ("fuyu-tiny", {}),
])
def test_every_leaf_block_runs_through_its_own_call(name, overrides):
    family = get_spec(name).family
    model = build_model(name, overrides, FUYU_TOKEN_IDS if family == "fuyu" else TOKEN_IDS)
    blocks = model.zero3_leaf_blocks()
    called = set()
    for block in blocks:
        block.register_forward_pre_hook(lambda module, args, kwargs: called.add(id(module)), with_kwargs=True)
    with torch.no_grad():
        model(**_batch(model, family))
    assert blocks and called == {id(b) for b in blocks}, f"{len(blocks) - len(called)} blocks never called"
    layers = model.config.decoder.num_hidden_layers
    assert len(blocks) >= layers
