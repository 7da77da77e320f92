"""Flamingo family (`otter-tiny`): media mask rule, gates, batching, groups, IO, checkpointing, registry."""

import json

import pytest
import torch

from mmtrain.models import build_model, get_spec, list_specs, model_from_config_dict, registry
from mmtrain.models.flamingo.blocks import MaskedCrossAttention, media_attention_mask
from mmtrain.models.flamingo.config import PARAM_GROUPS
from mmtrain.models.io import CONFIG_NAME, load_pretrained, save_pretrained

IMAGE = 50
PAD = 0
TOKEN_IDS = dict(image=IMAGE, end_of_chunk=51, answer=52, bos=1, eos=2, pad=PAD, base_vocab_size=50, num_added_tokens=3)
IMAGE_PX = 32

# <bos> a b <image> c d <image> e f <image> g <|endofchunk|> h <eos>; the <image> tokens sit at 3, 6, 9.
THREE_IMAGE_IDS = torch.tensor([[1, 5, 6, IMAGE, 7, 8, IMAGE, 9, 10, IMAGE, 11, 51, 12, 2]])
IMAGE_POSITIONS = (3, 6, 9)


def build(overrides=None, seed=0):
    torch.manual_seed(seed)
    return build_model("otter-tiny", overrides or {}, TOKEN_IDS).eval()


def set_gates(model, attn, ff):
    with torch.no_grad():
        for block in model.gated_cross_attn_layers:
            block.attn_gate.fill_(attn)
            block.ff_gate.fill_(ff)
    return model


def random_images(num_images, seed=1):
    return torch.randn(1, num_images, 3, IMAGE_PX, IMAGE_PX, generator=torch.Generator().manual_seed(seed))


def logits_of(model, input_ids, images):
    with torch.no_grad():
        return model(input_ids, images).logits


def perturbed(images, slots):
    images = images.clone()
    images[:, list(slots)] += 1.0
    return images


def first_block_output(model, input_ids, images):
    """Hidden states right after the first gated block: its input is text-only (embedding + layer 0)."""
    captured = {}
    hook = model.gated_cross_attn_layers[0].register_forward_hook(lambda m, a, out: captured.update(out=out))
    logits_of(model, input_ids, images)
    hook.remove()
    return captured["out"]


def changed(a, b):
    return not torch.allclose(a, b, atol=1e-6, rtol=0)


# --- media mask rule ------------------------------------------------------------------------


def test_media_mask_by_hand():
    input_ids = torch.tensor([[5, IMAGE, 6, IMAGE, 7], [IMAGE, 5, 6, PAD, PAD], [IMAGE, IMAGE, IMAGE, 5, 6]])
    mask, has_media = media_attention_mask(input_ids, IMAGE, num_images=2, num_latents=2)
    assert mask.shape == (3, 1, 5, 4) and mask.dtype == torch.bool
    first, second, none = [True, True, False, False], [False, False, True, True], [True] * 4
    assert mask[0, 0].tolist() == [none, first, first, second, second]
    assert mask[1, 0].tolist() == [first] * 5
    # A third <image> has no slot: it sees nothing (all keys allowed, output zeroed), not a uniform mix.
    assert mask[2, 0].tolist() == [first, second, none, none, none]
    assert has_media.squeeze(-1).tolist() == [
        [False, True, True, True, True],
        [True] * 5,
        [True, True, False, False, False],
    ]


def test_cross_attention_output_is_exactly_zero_without_an_image():
    torch.manual_seed(0)
    attention = MaskedCrossAttention(dim_text=8, dim_media=6, num_heads=2, head_dim=4)
    input_ids = torch.tensor([[5, 6, IMAGE, 7]])
    mask, has_media = media_attention_mask(input_ids, IMAGE, num_images=1, num_latents=3)
    out = attention(torch.randn(1, 4, 8), torch.randn(1, 3, 6), mask, has_media)
    assert torch.count_nonzero(out[0, :2]) == 0
    assert torch.count_nonzero(out[0, 2:]) > 0


def test_tokens_before_first_image_get_no_cross_attention():
    images = random_images(3)
    plain = logits_of(build(), THREE_IMAGE_IDS, images)
    attn_only = logits_of(set_gates(build(), attn=0.9, ff=0.0), THREE_IMAGE_IDS, images)
    first = IMAGE_POSITIONS[0]
    torch.testing.assert_close(attn_only[:, :first], plain[:, :first], rtol=0, atol=1e-6)
    assert changed(attn_only[:, first:], plain[:, first:])  # the open gate does act after the image
    # With both gates open, the (image-independent) FF acts everywhere but images still cannot reach them.
    model = set_gates(build(), attn=0.9, ff=0.9)
    base = logits_of(model, THREE_IMAGE_IDS, images)
    other = logits_of(model, THREE_IMAGE_IDS, perturbed(images, [0, 1, 2]))
    torch.testing.assert_close(other[:, :first], base[:, :first], rtol=0, atol=1e-6)


def test_tokens_after_third_image_see_only_the_third_image():
    model = set_gates(build(), attn=0.9, ff=0.9)
    images = random_images(3)
    base = first_block_output(model, THREE_IMAGE_IDS, images)
    third = IMAGE_POSITIONS[2]
    earlier_perturbed = first_block_output(model, THREE_IMAGE_IDS, perturbed(images, [0, 1]))
    torch.testing.assert_close(earlier_perturbed[:, third:], base[:, third:], rtol=0, atol=1e-6)
    third_perturbed = first_block_output(model, THREE_IMAGE_IDS, perturbed(images, [2]))
    for position in range(third, THREE_IMAGE_IDS.shape[1]):
        assert changed(third_perturbed[:, position], base[:, position])
    torch.testing.assert_close(third_perturbed[:, :third], base[:, :third], rtol=0, atol=1e-6)


def test_image_token_sees_its_own_image():
    model = set_gates(build(), attn=0.9, ff=0.0)
    images = random_images(3)
    base = first_block_output(model, THREE_IMAGE_IDS, images)
    for slot, position in enumerate(IMAGE_POSITIONS):
        other = first_block_output(model, THREE_IMAGE_IDS, perturbed(images, [slot]))
        assert changed(other[:, position], base[:, position])
        assert not changed(other[:, position - 1], base[:, position - 1])  # the token before does not


def test_future_images_do_not_change_earlier_logits():
    model = set_gates(build(), attn=0.9, ff=0.9)
    images = random_images(3)
    base = logits_of(model, THREE_IMAGE_IDS, images)
    other = logits_of(model, THREE_IMAGE_IDS, perturbed(images, [2]))
    third = IMAGE_POSITIONS[2]
    torch.testing.assert_close(other[:, :third], base[:, :third], rtol=0, atol=1e-6)
    assert changed(other[:, third:], base[:, third:])


# --- padding, text-only, batching -----------------------------------------------------------


def test_padding_image_slots_change_nothing():
    model = set_gates(build(), attn=0.9, ff=0.9)
    input_ids = torch.tensor([[1, IMAGE, 5, 6, 7, 2]])
    one_slot = random_images(1)
    padded = torch.cat([one_slot, random_images(2, seed=7)], dim=1)  # noise, not zeros, in the spare slots
    torch.testing.assert_close(logits_of(model, input_ids, padded), logits_of(model, input_ids, one_slot))


def test_text_only_sample_equals_plain_decoder():
    input_ids = torch.tensor([[1, 5, 6, 7, 8, 2]])
    blank = torch.zeros(1, 1, 3, IMAGE_PX, IMAGE_PX)
    model = set_gates(build(), attn=0.9, ff=0.0)
    out = model(input_ids, blank, labels=input_ids, z_loss_weight=1e-3)
    assert torch.isfinite(out.loss)
    torch.testing.assert_close(out.logits.detach(), logits_of(build(), input_ids, blank), rtol=0, atol=1e-6)


def test_batch_rows_match_single_samples():
    model = set_gates(build(), attn=0.9, ff=0.9)
    first_ids = [1, 5, IMAGE, 6, 7, IMAGE, 8, 2]
    second_ids = [1, IMAGE, 9, 2]
    images = random_images(2)
    second_image = random_images(1, seed=3)
    batch_ids = torch.tensor([first_ids, second_ids + [PAD] * 4])
    batch_images = torch.cat([images, torch.cat([second_image, torch.zeros_like(second_image)], dim=1)])
    batch_logits = logits_of(model, batch_ids, batch_images)
    torch.testing.assert_close(batch_logits[0], logits_of(model, torch.tensor([first_ids]), images)[0])
    torch.testing.assert_close(batch_logits[1, :4], logits_of(model, torch.tensor([second_ids]), second_image)[0])


def test_packed_row_equals_documents_run_alone():
    """Two documents packed in one row (positions restart at 0) give each one's own logits: no
    attention across the boundary, and the second document's text before its image sees no image
    (the image mask resets at the document start instead of carrying the first one's image)."""
    model = set_gates(build(), attn=0.9, ff=0.9)
    first_ids = [1, 5, IMAGE, 6, 7, 2]
    second_ids = [1, 8, 9, IMAGE, 10, 2]
    first_image, second_image = random_images(1), random_images(1, seed=3)
    packed_ids = torch.tensor([first_ids + second_ids + [PAD, PAD]])
    positions = torch.tensor([list(range(6)) + list(range(6)) + [0, 1]])
    packed_images = torch.cat([first_image, second_image], dim=1)
    with torch.no_grad():
        packed = model(packed_ids, packed_images, position_ids=positions).logits[0]
    torch.testing.assert_close(packed[:6], logits_of(model, torch.tensor([first_ids]), first_image)[0])
    torch.testing.assert_close(packed[6:12], logits_of(model, torch.tensor([second_ids]), second_image)[0])
    # Without the positions the row is one document: the second one's opening text sees image 1.
    unpacked = logits_of(model, packed_ids, packed_images)[0]
    assert (unpacked[7] - packed[7]).abs().max() > 1e-3


def test_media_mask_resets_at_document_start():
    ids = torch.tensor([[1, IMAGE, 5, 2, 1, 6, IMAGE, 7, 2, 0]])
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 0]])
    _, has_media = media_attention_mask(ids, IMAGE, num_images=2, num_latents=1, position_ids=positions)
    assert has_media[0, :, 0].tolist() == [False, True, True, True, False, False, True, True, True, False]
    mask, _ = media_attention_mask(ids, IMAGE, num_images=2, num_latents=1, position_ids=positions)
    assert mask[0, 0, 7].tolist() == [False, True]  # document 2's text sees document 2's image only


def test_uint8_pixels_are_normalised_on_the_model_side():
    model = set_gates(build(), attn=0.9, ff=0.9)
    pixels = torch.randint(0, 256, (1, 3, 3, IMAGE_PX, IMAGE_PX), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    vision = model.config.vision
    mean = torch.tensor(vision.mean).view(1, 1, 3, 1, 1)
    std = torch.tensor(vision.std).view(1, 1, 3, 1, 1)
    by_hand = (pixels.float() / 255 - mean) / std
    torch.testing.assert_close(logits_of(model, THREE_IMAGE_IDS, pixels), logits_of(model, THREE_IMAGE_IDS, by_hand))


# --- decoder path, embeddings -----------------------------------------------------------------


def test_closed_gates_equal_transformers_decoder():
    model = build()
    for block in model.gated_cross_attn_layers:
        assert block.attn_gate.item() == 0.0 and block.ff_gate.item() == 0.0
    images = random_images(3)
    with torch.no_grad():
        hidden = model.decoder(inputs_embeds=model.decoder.embed_tokens(THREE_IMAGE_IDS)).last_hidden_state
        expected = model.lm_head(hidden)
    torch.testing.assert_close(logits_of(model, THREE_IMAGE_IDS, images), expected)


def test_decoupled_embedding_and_head():
    model = build()
    embed = model.decoder.embed_tokens
    with torch.no_grad():
        vectors = embed(torch.tensor([[3, IMAGE, 52]]))
        torch.testing.assert_close(vectors[0, 0], embed.weight[3])
        torch.testing.assert_close(vectors[0, 1], embed.additional_embedding.weight[0])
        torch.testing.assert_close(vectors[0, 2], embed.additional_embedding.weight[2])
        hidden = torch.randn(2, 96)
        logits = model.lm_head(hidden)
        assert logits.shape == (2, 53)
        torch.testing.assert_close(logits[:, 50:], hidden @ model.lm_head.additional_fc.weight.T)
    assert embed.weight.shape == (50, 96) and model.lm_head.weight.shape == (50, 96)


# --- parameter groups, weight decay -----------------------------------------------------------


def test_param_groups_partition_all_parameters():
    model = build()
    groups = model.param_groups()
    assert tuple(groups) == PARAM_GROUPS == get_spec("otter-tiny").param_groups
    assert all(groups.values()), "every group holds parameters"
    grouped = [name for members in groups.values() for name, _ in members]
    assert sorted(grouped) == sorted(name for name, _ in model.named_parameters())
    assert len(grouped) == len(set(grouped))
    names = {group: {name for name, _ in members} for group, members in groups.items()}
    assert names["new_tokens"] == {"decoder.embed_tokens.additional_embedding.weight", "lm_head.additional_fc.weight"}
    assert {"decoder.embed_tokens.weight", "lm_head.weight", "decoder.norm.weight"} <= names["decoder"]
    assert "perceiver.latents" in names["perceiver"]
    assert "gated_cross_attn_layers.0.attn_gate" in names["cross_attn"]
    assert "vision_encoder.conv1.weight" in names["vision"]


def test_no_weight_decay():
    model = build()
    no_decay = [
        "decoder.norm.weight",
        "decoder.layers.0.input_layernorm.weight",
        "vision_encoder.ln_pre.bias",
        "vision_encoder.transformer.resblocks.0.attn.in_proj_bias",
        "vision_encoder.class_embedding",
        "vision_encoder.positional_embedding",
        "gated_cross_attn_layers.1.attn_gate",
        "gated_cross_attn_layers.1.ff_gate",
        "gated_cross_attn_layers.0.attn.norm.weight",
        "decoder.embed_tokens.weight",
        "decoder.embed_tokens.additional_embedding.weight",
        "perceiver.latents",
        "perceiver.norm.weight",
    ]
    decay = [
        "decoder.layers.0.self_attn.q_proj.weight",
        "gated_cross_attn_layers.0.attn.to_kv.weight",
        "perceiver.blocks.0.ff.fc_in.weight",
        "lm_head.weight",
        "lm_head.additional_fc.weight",
        "vision_encoder.conv1.weight",
    ]
    assert all(model.no_weight_decay(name) for name in no_decay)
    assert not any(model.no_weight_decay(name) for name in decay)
    with pytest.raises(KeyError):
        model.no_weight_decay("decoder.no_such.weight")


# --- training mechanics -------------------------------------------------------------------------


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch, z_loss_weight=1e-3)
    out.loss.backward()
    return out.loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("every_n_layers", [1, 2])
def test_gradient_checkpointing_gives_same_loss_and_grads(monkeypatch, every_n_layers):
    model = set_gates(build(), attn=0.5, ff=0.5).train()
    labels = THREE_IMAGE_IDS.clone()
    labels[:, :4] = -100
    batch = dict(input_ids=THREE_IMAGE_IDS, images=random_images(3), labels=labels)
    loss_plain, grads_plain = _loss_and_grads(model, batch)

    calls = []
    real_checkpoint = registry.checkpoint
    monkeypatch.setattr(registry, "checkpoint", lambda module, *a, **k: calls.append(module) or real_checkpoint(module, *a, **k))
    model.set_activation_checkpointing(True, every_n_layers)
    loss_ckpt, grads_ckpt = _loss_and_grads(model, batch)
    # Selective: layers whose index is a multiple of n, each with the gated block before it.
    blocks = dict(zip(model.cross_attn_layer_indices, model.gated_cross_attn_layers))
    expected = [m for i, layer in enumerate(model.decoder.layers) if i % every_n_layers == 0
                for m in ([blocks[i]] if i in blocks else []) + [layer]]
    assert calls == expected and (every_n_layers == 1 or len(expected) < len(model.decoder.layers))
    torch.testing.assert_close(loss_ckpt, loss_plain)
    assert grads_ckpt.keys() == grads_plain.keys()
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_ckpt[name], grad, msg=name)


def test_frozen_vision_runs_without_grad_and_text_only_batch_reaches_every_trainable_param():
    model = set_gates(build(), attn=0.5, ff=0.5).train()
    for _, param in model.param_groups()["vision"]:
        param.requires_grad_(False)
    seen = {}
    model.vision_encoder.register_forward_hook(lambda m, a, out: seen.update(tokens_grad=out[1].requires_grad))
    input_ids = torch.tensor([[1, 5, 6, 7, 2]])
    out = model(input_ids, torch.zeros(1, 1, 3, IMAGE_PX, IMAGE_PX), labels=input_ids)
    out.loss.backward()
    assert seen["tokens_grad"] is False
    # ZeRO-3 needs the same graph on every rank: a text-only batch still gives (zero) grads to media paths.
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None, name
    assert torch.count_nonzero(model.gated_cross_attn_layers[0].attn.to_kv.weight.grad) == 0


def test_bf16_cast_keeps_rope_in_fp32_and_loss_in_fp32():
    model = build()
    inv_freq = model.decoder.rotary_emb.inv_freq.clone()
    model = model.to(torch.bfloat16)
    out = model(THREE_IMAGE_IDS, random_images(3), labels=THREE_IMAGE_IDS, z_loss_weight=1e-3)
    assert model.decoder.rotary_emb.inv_freq.dtype == torch.float32
    assert torch.equal(model.decoder.rotary_emb.inv_freq, inv_freq)
    assert out.logits.dtype == torch.bfloat16
    assert out.loss.dtype == out.ce_loss.dtype == out.z_loss.dtype == torch.float32
    assert torch.isfinite(out.loss)


def test_generate_is_greedy_and_stops():
    model = set_gates(build(), attn=0.9, ff=0.9)
    prompt = THREE_IMAGE_IDS[:, :11]
    images = random_images(3)
    tokens = model.generate(prompt, images, max_new_tokens=4, stop_ids=[])
    ids = prompt
    for _ in range(4):
        next_id = logits_of(model, ids, images)[0, -1].argmax().item()
        ids = torch.cat([ids, torch.tensor([[next_id]])], dim=1)
    assert tokens == ids[0, prompt.shape[1] :].tolist()
    stop = tokens[1]
    assert model.generate(prompt, images, max_new_tokens=4, stop_ids=[stop]) == tokens[: tokens.index(stop) + 1]


# --- save / load, config dict -----------------------------------------------------------------


def test_save_load_round_trip_gives_identical_logits(tmp_path):
    model = set_gates(build(), attn=0.7, ff=0.3)
    save_pretrained(model.state_dict(), model.config_dict(), tmp_path)
    stored = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert stored["family"] == "flamingo" and stored["flavour"] == "otter-tiny"
    assert stored["config"]["base_vocab_size"] == 50 and stored["config"]["num_added_tokens"] == 3
    assert stored["token_ids"] == TOKEN_IDS
    loaded = load_pretrained(tmp_path)
    assert not loaded.training
    images = random_images(3)
    assert torch.equal(logits_of(loaded, THREE_IMAGE_IDS, images), logits_of(model, THREE_IMAGE_IDS, images))


def test_load_with_missing_or_unexpected_keys_names_them(tmp_path):
    model = build()
    state = model.state_dict()
    state.pop("perceiver.latents")
    state["stray.weight"] = torch.zeros(1)
    save_pretrained(state, model.config_dict(), tmp_path)
    with pytest.raises(ValueError, match=r"perceiver\.latents.*stray\.weight"):
        load_pretrained(tmp_path)


def test_config_dict_round_trip_keeps_overrides():
    model = build({"decoder": {"num_hidden_layers": 2}})
    config_dict = model.config_dict()
    assert json.loads(json.dumps(config_dict)) == config_dict
    rebuilt = type(model).from_config_dict(config_dict)
    assert len(rebuilt.decoder.layers) == 2 and rebuilt.config == model.config
    assert model_from_config_dict(config_dict).config == model.config


# --- registry -------------------------------------------------------------------------------------


def test_registry_lookup_and_unknown_name():
    assert "otter-tiny" in [spec.name for spec in list_specs()]
    spec = get_spec("otter-tiny")
    assert spec.family == "flamingo"
    with pytest.raises(KeyError, match=r"'otter-tny' \(did you mean 'otter-tiny'\?\)"):
        get_spec("otter-tny")


def test_build_is_deterministic_from_the_torch_seed():
    first, second, other = build(seed=3).state_dict(), build(seed=3).state_dict(), build(seed=4).state_dict()
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert not torch.equal(first["perceiver.latents"], other["perceiver.latents"])


def test_image_spec_uses_open_clip_constants():
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    spec = get_spec("otter-tiny")
    assert spec.image_spec(spec.config) == {
        "size_px": IMAGE_PX,
        "mean": list(OPENAI_DATASET_MEAN),
        "std": list(OPENAI_DATASET_STD),
    }


def test_overrides_nested_and_unknown_fields():
    spec = get_spec("otter-tiny")
    model = build({"decoder": {"num_hidden_layers": 2}, "cross_attn_placement": "before_i%n"})
    assert len(model.decoder.layers) == 2
    assert model.cross_attn_layer_indices == [0]
    assert spec.config.decoder.num_hidden_layers == 4, "the flavour defaults are not mutated"
    assert build().cross_attn_layer_indices == [1, 3], "OpenFlamingo placement: before layer i when (i+1)%n == 0"
    with pytest.raises(ValueError, match=r"'decoder\.num_layerz' \(did you mean 'decoder\.num_hidden_layers'"):
        build({"decoder": {"num_layerz": 2}})
    with pytest.raises(ValueError, match="cross_attn_placement"):
        build({"cross_attn_placement": "after"})


def test_token_ids_must_agree_with_stored_vocab():
    config_dict = build().config_dict()
    config_dict["token_ids"] = dict(TOKEN_IDS, num_added_tokens=4)
    with pytest.raises(ValueError, match="num_added_tokens"):
        model_from_config_dict(config_dict)
    with pytest.raises(ValueError, match="image"):
        build_model("otter-tiny", {}, {k: v for k, v in TOKEN_IDS.items() if k != "image"})
