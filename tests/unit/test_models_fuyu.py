"""Fuyu family (`fuyu-tiny`, `fuyu-8b`): logits parity with transformers' FuyuForCausalLM, packing,
z-loss, ZeRO-3 lockstep of the patch projection, parameter counts, patch layout, registry."""

import numpy as np
import pytest
import torch
from transformers import FuyuConfig as HFFuyuConfig
from transformers import FuyuForCausalLM as HFFuyuForCausalLM

from mmtrain.models import build_model, get_spec, list_specs, model_from_config_dict
from mmtrain.models.fuyu import FuyuForCausalLM, checkpoint_key
from mmtrain.models.loss import IGNORE_INDEX

PAD, BOS, EOS = 0, 1, 2
IMAGE, NEWLINE = 297, 298  # Fuyu's |SPEAKER| (image placeholder) and |NEWLINE|, inside the tiny vocab
TOKEN_IDS = dict(image=IMAGE, end_of_chunk=299, answer=296, bos=BOS, eos=EOS, pad=PAD, base_vocab_size=296, num_added_tokens=4)
VOCAB = 300
PATCH_DIM = 30 * 30 * 3


def build(overrides=None, seed=0):
    torch.manual_seed(seed)
    return build_model("fuyu-tiny", overrides or {}, TOKEN_IDS).eval()


def image_tokens(rows, cols, first_patch=0):
    """Fuyu's processor layout: per patch row, `cols` placeholders then one newline; then BOS."""
    ids, indices = [], []
    for r in range(rows):
        ids += [IMAGE] * cols + [NEWLINE]
        indices += list(range(first_patch + r * cols, first_patch + (r + 1) * cols)) + [-1]
    return ids + [BOS], indices + [-1]


def random_patches(num, seed):
    return torch.randint(0, 256, (num, PATCH_DIM), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def normalised(patches):
    """What Fuyu's image processor feeds its model: x/255, then (x - 0.5)/0.5."""
    return (patches.float() / 255.0 - 0.5) / 0.5


def logits_of(model, **batch):
    with torch.no_grad():
        return model(**batch).logits


# --------------------------------------------------------------------------------------------
# Parity with transformers


def hf_twin(ours, seed=1):
    """transformers' FuyuForCausalLM from a flat config as in the hub's config.json, with random
    weights (norms included) copied into `ours` through `checkpoint_key`."""
    config = HFFuyuConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        hidden_act="relu2",
        layer_norm_eps=1e-5,
        qk_layernorm=True,
        rope_theta=25000.0,
        max_position_embeddings=4096,
        patch_size=30,
        num_channels=3,
        image_token_id=IMAGE,
    )
    hf = HFFuyuForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in hf.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1.0 + 0.1 * noise if "layernorm" in name and name.endswith("weight") else 0.1 * noise)
    ours.load_state_dict({checkpoint_key(k): v for k, v in hf.state_dict().items()}, strict=True)
    return hf


def test_hf_config_is_what_fuyu_tiny_builds():
    # The published config.json spells only rope_theta; Persimmon's partial rotary default (0.5) applies.
    text = hf_twin(build()).config.text_config
    assert text.rope_parameters["rope_theta"] == 25000.0
    assert text.rope_parameters["partial_rotary_factor"] == 0.5


def test_logits_match_transformers_fuyu():
    ours = build()
    hf = hf_twin(ours)
    rows, cols = 2, 3
    prefix, indices = image_tokens(rows, cols)
    with_image = prefix + [5, 6, 7, 8, 9]  # patches, BOS, text
    text_only = [BOS, 10, 11, 12, 13, 14, 15, 16, 17]
    length = len(with_image)
    pad = length - len(text_only)
    input_ids = torch.tensor([with_image, text_only + [PAD] * pad])
    attention_mask = torch.tensor([[1] * length, [1] * len(text_only) + [0] * pad])
    position_ids = torch.arange(length).expand(2, -1)
    patches = random_patches(rows * cols, seed=2)
    image_patches = torch.stack([patches, torch.zeros_like(patches)])  # the text-only row: zero rows
    image_patch_indices = torch.tensor([indices + [-1] * 5, [-1] * length])

    ours_logits = logits_of(
        ours,
        input_ids=input_ids,
        image_patches=image_patches,
        image_patch_indices=image_patch_indices,
        position_ids=position_ids,
        attention_mask=attention_mask,
    )
    # transformers 5 scatters the batch's patches, in order, into its image-token positions
    # (image_patches_indices is gone), so it takes only the image row's patches, normalised.
    with torch.no_grad():
        hf_logits = hf(
            input_ids=input_ids,
            pixel_values=normalised(patches).unsqueeze(0),
            attention_mask=attention_mask,
            position_ids=position_ids,
        ).logits
    real = attention_mask.bool()
    diff = (ours_logits - hf_logits)[real].abs().max().item()
    assert diff <= 1e-4, diff
    # The patches matter: the same tokens with other pixels give other logits.
    other = logits_of(
        ours,
        input_ids=input_ids,
        image_patches=torch.stack([random_patches(rows * cols, seed=3), torch.zeros_like(patches)]),
        image_patch_indices=image_patch_indices,
        position_ids=position_ids,
    )
    assert (other[0] - ours_logits[0]).abs().max() > 1e-2


# --------------------------------------------------------------------------------------------
# Packing, loss, ZeRO-3 lockstep, generate


@pytest.mark.parametrize("boundaries", ["segment_ids", "position_ids"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_documents_equal_documents_alone(attn, boundaries):
    model = build({"decoder": {"attn_implementation": attn}})
    prefix1, indices1 = image_tokens(1, 2)  # patches 0, 1
    doc1, idx1 = prefix1 + [20, 21, 22], indices1 + [-1] * 3
    prefix2, indices2 = image_tokens(1, 1)  # one patch
    doc2, idx2 = prefix2 + [30, 31, 32, 33], indices2 + [-1] * 4
    num_pad = 3
    patches = random_patches(3, seed=4)
    # Positions restart per document; padding continues the last one's (as mmtrain's loader packs).
    positions = list(range(len(doc1))) + list(range(len(doc2) + num_pad))
    batch = dict(
        input_ids=torch.tensor([doc1 + doc2 + [PAD] * num_pad]),
        image_patches=patches.unsqueeze(0),
        # doc2's patch is row 2 of the packed row's patches
        image_patch_indices=torch.tensor([idx1 + [i + 2 if i >= 0 else -1 for i in idx2] + [-1] * num_pad]),
        position_ids=torch.tensor([positions]),
    )
    if boundaries == "segment_ids":
        batch["segment_ids"] = torch.tensor([[1] * len(doc1) + [2] * len(doc2) + [0] * num_pad])
    packed = logits_of(model, **batch)
    alone1 = logits_of(model, input_ids=torch.tensor([doc1]), image_patches=patches[None, :2], image_patch_indices=torch.tensor([idx1]))
    alone2 = logits_of(model, input_ids=torch.tensor([doc2]), image_patches=patches[None, 2:], image_patch_indices=torch.tensor([idx2]))

    assert torch.isfinite(packed).all()  # no fully masked softmax row, pads included
    assert (packed[0, : len(doc1)] - alone1[0]).abs().max() <= 1e-5
    assert (packed[0, len(doc1) : len(doc1) + len(doc2)] - alone2[0]).abs().max() <= 1e-5


def text_batch():
    input_ids = torch.tensor([[BOS, 5, 6, 7, 8, 9], [BOS, 10, 11, 12, PAD, PAD]])
    labels = input_ids.clone()
    labels[:, 0] = IGNORE_INDEX
    labels[1, 4:] = IGNORE_INDEX
    return dict(
        input_ids=input_ids,
        image_patches=torch.zeros(2, 1, PATCH_DIM, dtype=torch.uint8),
        image_patch_indices=torch.full_like(input_ids, -1),
        labels=labels,
    )


def test_z_loss_adds_weighted_mean_squared_logsumexp():
    model = build()
    batch = text_batch()
    plain = model(**batch)
    weighted = model(**batch, z_loss_weight=1e-2)
    supervised = batch["labels"][:, 1:] != IGNORE_INDEX
    log_z = torch.logsumexp(plain.logits[:, :-1].float(), dim=-1)
    expected_z = log_z[supervised].square().mean()
    assert torch.allclose(weighted.z_loss, expected_z, rtol=1e-5)
    assert torch.allclose(weighted.ce_loss, plain.loss, rtol=1e-6)
    assert torch.allclose(weighted.loss, plain.loss + 1e-2 * expected_z, rtol=1e-5)


def test_patch_projection_gets_zero_grad_in_text_only_batch():
    model = build().train()
    model(**text_batch()).loss.backward()
    for param in model.vision_embed_tokens.parameters():
        assert param.grad is not None  # it ran: every ZeRO-3 rank gathers and reduces it alike
        assert param.grad.abs().max() == 0
    assert model.language_model.model.layers[0].mlp.dense_h_to_4h.weight.grad.abs().max() > 0


def test_gradient_checkpointing_gives_the_same_grads():
    grads = []
    for checkpointing in (False, True):
        model = build().train()
        model.gradient_checkpointing = checkpointing
        model(**text_batch()).loss.backward()
        grads.append(model.language_model.model.layers[0].self_attn.query_key_value.weight.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_generate_is_greedy_and_stops_at_eos():
    model = build()
    prefix, indices = image_tokens(1, 2)
    input_ids = torch.tensor([prefix + [5, 6]])
    batch = dict(image_patches=random_patches(2, seed=5).unsqueeze(0), image_patch_indices=torch.tensor([indices + [-1, -1]]))
    first = int(logits_of(model, input_ids=input_ids, **batch)[0, -1].argmax())
    new_ids = model.generate(input_ids, max_new_tokens=3, eos_token_id=VOCAB + 1, **batch)
    assert len(new_ids) == 3 and new_ids[0] == first
    assert model.generate(input_ids, max_new_tokens=3, eos_token_id=[first], **batch) == [first]


# --------------------------------------------------------------------------------------------
# Published architecture, patch layout, registry


def test_fuyu_8b_matches_transformers_parameter_count():
    with torch.device("meta"):
        ours = build_model("fuyu-8b", {}, TOKEN_IDS)
        hf = HFFuyuForCausalLM(HFFuyuConfig())  # transformers' default FuyuConfig is adept/fuyu-8b
    total = sum(p.numel() for p in ours.parameters())
    assert total == sum(p.numel() for p in hf.parameters()) == 9_408_238_592
    assert {checkpoint_key(k) for k in hf.state_dict()} == set(ours.state_dict())
    text = hf.config.text_config
    dec = ours.config.decoder
    assert (ours.config.vocab_size, dec.hidden_size, dec.num_hidden_layers, dec.num_attention_heads) == (
        text.vocab_size, text.hidden_size, text.num_hidden_layers, text.num_attention_heads
    )
    assert (dec.intermediate_size, dec.hidden_act, dec.layer_norm_eps, dec.qk_layernorm, dec.max_position_embeddings) == (
        text.intermediate_size, text.hidden_act, text.layer_norm_eps, text.qk_layernorm, text.max_position_embeddings
    )
    groups = ours.param_groups()
    assert sum(p.numel() for _, p in groups["embeddings"]) == 2 * 262144 * 4096
    assert sum(p.numel() for _, p in groups["vision"]) == 2700 * 4096 + 4096


def test_patch_flattening_matches_fuyu_image_processor():
    from transformers.models.fuyu.image_processing_fuyu import FuyuImageProcessor

    height, width, p = 60, 90, 30
    hwc = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    # The layout image_spec documents for the data side.
    ours = hwc.reshape(height // p, p, width // p, p, 3).transpose(0, 2, 1, 3, 4).reshape(-1, p * p * 3)
    theirs = FuyuImageProcessor().patchify_image(torch.from_numpy(hwc).permute(2, 0, 1)[None].float())
    assert np.array_equal(ours, theirs[0].numpy().astype(np.uint8))
    spec = get_spec("fuyu-tiny")
    assert spec.image_spec(spec.config)["layout"] == "patches"
    assert spec.image_spec(spec.config)["patch_dim"] == PATCH_DIM


def test_registry_flavours_groups_and_config_dict():
    names = {spec.name for spec in list_specs()}
    assert {"fuyu-tiny", "fuyu-8b", "otterhd-8b"} <= names
    model = build({"decoder": {"num_hidden_layers": 1}})
    assert len(model.language_model.model.layers) == 1
    groups = model.param_groups()
    assert tuple(groups) == get_spec("fuyu-tiny").param_groups
    assert sum(len(v) for v in groups.values()) == len(list(model.parameters()))
    assert model.no_weight_decay("language_model.model.layers.0.self_attn.q_layernorm.weight")
    assert model.no_weight_decay("language_model.model.embed_tokens.weight")
    assert not model.no_weight_decay("language_model.lm_head.weight")
    assert not model.no_weight_decay("vision_embed_tokens.weight")
    with pytest.raises(KeyError):
        model.no_weight_decay("nope")

    rebuilt = FuyuForCausalLM.from_config_dict(model.config_dict())
    rebuilt.load_state_dict(model.state_dict())
    assert model_from_config_dict(model.config_dict()).config == model.config
    with pytest.raises(ValueError, match="decoder.attn_implementation"):
        build({"decoder": {"attn_implementation": "flash_attention_2"}})
    # A published vocabulary is kept; a tokenizer larger than it does not belong to the checkpoint.
    with torch.device("meta"), pytest.raises(ValueError, match="vocab_size"):
        build_model("fuyu-8b", {}, {**TOKEN_IDS, "base_vocab_size": 262144})


def test_unpacked_rows_keep_sdpa_is_causal_path():
    model = build()
    hidden = torch.zeros(2, 6, 64)
    # Single-document rows (padding continues the positions): no dense mask, SDPA's is_causal.
    assert model._attention_mask(hidden, torch.arange(6).expand(2, -1), None) is None
    assert model._attention_mask(hidden, torch.tensor([[0, 1, 2, 0, 1, 2]] * 2), None) is not None
