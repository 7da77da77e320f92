"""Flamingo family, IDEFICS flavours (`idefics-tiny`, `-9b`, `-80b`): logits parity with transformers'
IdeficsForVisionText2Text, its image-attention-mask rule, published names and parameter counts, groups."""


import pytest
import torch
from helpers import randomise_like_trained
from transformers import IdeficsConfig as HFIdeficsConfig
from transformers import IdeficsForVisionText2Text
from transformers.models.idefics.processing_idefics import (
    IMAGE_TOKEN,
    image_attention_mask_for_packed_input_ids_pt,
    incremental_to_binary_attention_mask,
)

from mmtrain.models import build_model, get_spec, list_specs
from mmtrain.models.flamingo.blocks import media_attention_mask
from mmtrain.models.flamingo.config import PARAM_GROUPS
from mmtrain.models.io import load_pretrained, save_pretrained

VOCAB = 100
FAKE, IMAGE = VOCAB, VOCAB + 1  # IDEFICS' added tokens: <fake_token_around_image>, <image>
PAD, BOS, EOS = 0, 1, 2
TOKEN_IDS = dict(image=IMAGE, fake_image=FAKE, bos=BOS, eos=EOS, pad=PAD, base_vocab_size=VOCAB, num_added_tokens=2)
IMAGE_PX = 30

# (a) text before the first image, two images (IDEFICS' <fake><image><fake> runs), text after each;
# (b) text only, right-padded.
WITH_IMAGES = [BOS, 5, 6, FAKE, IMAGE, FAKE, 7, 8, 9, FAKE, IMAGE, FAKE, 10, 11, EOS]
TEXT_ONLY = [BOS, 12, 13, 14, 15, EOS]
FIRST_IMAGE_AT = WITH_IMAGES.index(IMAGE)

# The tiny architecture as a hub config.json would give it (flat IdeficsConfig fields).
HF_TINY = dict(
    vocab_size=VOCAB,
    additional_vocab_size=2,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    rms_norm_eps=1e-6,
    cross_layer_interval=2,
    qk_layer_norms=True,
    use_resampler=True,
    tie_word_embeddings=False,
    vision_config=dict(
        embed_dim=32, image_size=IMAGE_PX, patch_size=10, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4
    ),
    perceiver_config=dict(
        use_resampler=True,
        resampler_n_latents=4,
        resampler_depth=2,
        resampler_n_heads=2,
        resampler_head_dim=16,
        qk_layer_norms_perceiver=True,
    ),
)


def hf_published(hidden, layers, heads, intermediate, eps):
    """HuggingFaceM4/idefics-9b / -80b config.json, as transformers reads it."""
    return HFIdeficsConfig(
        vocab_size=32000,
        additional_vocab_size=2,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        rms_norm_eps=eps,
        cross_layer_interval=4,
        qk_layer_norms=True,
        use_resampler=True,
        tie_word_embeddings=False,
        vision_config=dict(
            embed_dim=1280, image_size=224, intermediate_size=5120, patch_size=14, num_hidden_layers=32, num_attention_heads=16
        ),
        perceiver_config=dict(
            use_resampler=True,
            resampler_n_latents=64,
            resampler_depth=6,
            resampler_n_heads=16,
            resampler_head_dim=96,
            qk_layer_norms_perceiver=True,
        ),
    )


def build(overrides=None, seed=0):
    torch.manual_seed(seed)
    return build_model("idefics-tiny", overrides or {}, TOKEN_IDS).eval()


def hf_twin(ours, seed=1):
    """transformers' IdeficsForVisionText2Text with random weights, gates and norms included (closed
    gates or unit norms would hide bugs in what they scale), loaded into `ours` by name as it is."""
    hf = randomise_like_trained(IdeficsForVisionText2Text(HFIdeficsConfig(**HF_TINY)).eval(), seed)
    ours.load_state_dict(hf.state_dict(), strict=True)
    return hf


def random_pixels(batch, num_images, seed=2):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, num_images, 3, IMAGE_PX, IMAGE_PX), dtype=torch.uint8, generator=generator)


def normalised(model, pixels):
    """What IDEFICS' image processor feeds its model: x/255, then CLIP's mean/std."""
    vision = model.config.vision
    mean = torch.tensor(vision.mean).view(1, 1, 3, 1, 1)
    std = torch.tensor(vision.std).view(1, 1, 3, 1, 1)
    return (pixels.float() / 255.0 - mean) / std


class _Tokenizer:
    """What transformers' packing helper reads from a tokenizer."""

    eos_token_id = EOS

    @staticmethod
    def convert_tokens_to_ids(token):
        assert token == IMAGE_TOKEN
        return IMAGE


def idefics_image_attention_mask(input_ids, num_images):
    """[B, T, N] as IdeficsProcessor builds it (m4's packing rule: latest preceding image, reset after EOS)."""
    incremental, _ = image_attention_mask_for_packed_input_ids_pt(input_ids, _Tokenizer())
    return incremental_to_binary_attention_mask(incremental, "pt", num_classes=num_images)


def right_padded(rows):
    length = max(len(row) for row in rows)
    input_ids = torch.tensor([row + [PAD] * (length - len(row)) for row in rows])
    attention_mask = torch.tensor([[1] * len(row) + [0] * (length - len(row)) for row in rows])
    return input_ids, attention_mask


def logits_of(model, input_ids, images):
    with torch.no_grad():
        return model(input_ids, images).logits


# --------------------------------------------------------------------------------------------
# Parity with transformers


def test_logits_match_transformers_idefics():
    ours = build()
    hf = hf_twin(ours)
    input_ids, attention_mask = right_padded([WITH_IMAGES, TEXT_ONLY])
    pixels = random_pixels(2, 2)
    pixels[1] = 0  # the text-only row's slots are unused
    pixel_values = normalised(ours, pixels)
    pixel_values[1] = 0.0  # IDEFICS pads the image tensor with zeros
    image_attention_mask = idefics_image_attention_mask(input_ids, num_images=2)
    assert image_attention_mask[1].sum() == 0 and image_attention_mask[0, :FIRST_IMAGE_AT].sum() == 0

    with torch.no_grad():
        expected = hf(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            image_attention_mask=image_attention_mask,
        ).logits
        got = ours(input_ids, pixels, attention_mask=attention_mask).logits
    real = attention_mask.bool()  # pads are never targets (IDEFICS also masks their image attention)
    diff = (got - expected)[real].abs().max().item()
    assert diff <= 1e-4, diff
    # The images do reach the logits: the parity above is not only the text path's.
    assert (got[0, FIRST_IMAGE_AT:] - hf_text_only_logits(hf, input_ids[:1], attention_mask[:1])[0, FIRST_IMAGE_AT:]).abs().max() > 1e-2


def hf_text_only_logits(hf, input_ids, attention_mask):
    with torch.no_grad():
        return hf(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=torch.zeros(input_ids.shape[0], 1, 3, IMAGE_PX, IMAGE_PX),
            image_attention_mask=torch.zeros(*input_ids.shape, 1, dtype=torch.long),
        ).logits


def test_text_only_batch_matches_transformers():
    ours = build()
    hf = hf_twin(ours)
    input_ids, attention_mask = right_padded([TEXT_ONLY, TEXT_ONLY[:4]])
    expected = hf_text_only_logits(hf, input_ids, attention_mask)
    got = logits_of(ours, input_ids, torch.zeros(2, 1, 3, IMAGE_PX, IMAGE_PX, dtype=torch.uint8))
    real = attention_mask.bool()
    assert (got - expected)[real].abs().max().item() <= 1e-4


def test_swapping_the_images_changes_the_logits_after_the_first_image_only():
    ours = build()
    hf_twin(ours)
    input_ids = torch.tensor([WITH_IMAGES])
    pixels = random_pixels(1, 2)
    base = logits_of(ours, input_ids, pixels)
    swapped = logits_of(ours, input_ids, pixels.flip(1))
    torch.testing.assert_close(swapped[:, :FIRST_IMAGE_AT], base[:, :FIRST_IMAGE_AT], rtol=0, atol=1e-6)
    assert (swapped[:, FIRST_IMAGE_AT:] - base[:, FIRST_IMAGE_AT:]).abs().amax(-1).min() > 1e-4


def test_media_mask_equals_idefics_packing_rule():
    """Our rule (latest preceding <image>, reset where position_ids restart) on packed rows gives
    IDEFICS' image_attention_mask (latest preceding image, reset after EOS), images beyond the
    slots included."""
    docs = [
        [[BOS, 5, FAKE, IMAGE, FAKE, 6, EOS], [BOS, 7, 8, FAKE, IMAGE, FAKE, IMAGE, FAKE, 9, EOS], [BOS, 10, EOS]],
        [[BOS, 11, EOS], [BOS, FAKE, IMAGE, FAKE, 12, FAKE, IMAGE, FAKE, IMAGE, FAKE, 13, EOS]],
    ]
    rows = [sum(row, []) for row in docs]
    positions = [sum((list(range(len(doc))) for doc in row), []) for row in docs]
    length = max(len(row) for row in rows)
    input_ids = torch.tensor([row + [PAD] * (length - len(row)) for row in rows])
    position_ids = torch.tensor([pos + list(range(length - len(pos))) for pos in positions])
    real = torch.tensor([[True] * len(row) + [False] * (length - len(row)) for row in rows])
    num_images = 3  # row 1 has 4 images: the 4th has no slot

    mask, has_media = media_attention_mask(input_ids, IMAGE, num_images, num_latents=1, position_ids=position_ids)
    ours = mask[:, 0] & has_media
    theirs = idefics_image_attention_mask(input_ids, num_images).bool()
    assert torch.equal(ours[real], theirs[real])
    assert theirs[real].any(-1).sum() > 0 and not theirs[real].all()


# --------------------------------------------------------------------------------------------
# Published architecture and names


@pytest.mark.parametrize(
    "name, hf_config, total",
    [
        ("idefics-9b", lambda: hf_published(4096, 32, 32, 11008, 1e-6), 8_929_679_632),
        ("idefics-80b", lambda: hf_published(8192, 80, 64, 22016, 1e-5), 79_967_843_624),
    ],
)
def test_published_flavours_match_transformers_names_and_parameter_count(name, hf_config, total):
    published_ids = dict(TOKEN_IDS, image=32001, fake_image=32000, base_vocab_size=32000, num_added_tokens=2)
    with torch.device("meta"):
        ours = build_model(name, {}, published_ids)
        hf = IdeficsForVisionText2Text(hf_config())
    shapes = {key: tuple(value.shape) for key, value in ours.state_dict().items()}
    assert shapes == {key: tuple(value.shape) for key, value in hf.state_dict().items()}
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in hf.parameters()) == total
    interval = hf.config.cross_layer_interval
    assert ours.cross_attn_layer_indices == list(range(0, hf.config.num_hidden_layers, interval))
    assert ours.config.decoder.rms_norm_eps == hf.config.rms_norm_eps


def test_tiny_flavour_is_the_tiny_hf_config():
    model = build()
    hf = IdeficsForVisionText2Text(HFIdeficsConfig(**HF_TINY))
    assert set(model.state_dict()) == set(hf.state_dict())
    assert model.cross_attn_layer_indices == [0, 2]  # IDEFICS: before layer i when i % interval == 0
    assert (model.config.base_vocab_size, model.config.num_added_tokens) == (VOCAB, 2)


# --------------------------------------------------------------------------------------------
# Groups, weight decay, training mechanics, IO, registry


def test_param_groups_and_weight_decay():
    model = build()
    groups = model.param_groups()
    assert tuple(groups) == PARAM_GROUPS == get_spec("idefics-tiny").param_groups
    grouped = [name for members in groups.values() for name, _ in members]
    assert sorted(grouped) == sorted(name for name, _ in model.named_parameters())
    names = {group: {name for name, _ in members} for group, members in groups.items()}
    assert names["new_tokens"] == {"model.embed_tokens.additional_embedding.weight", "lm_head.additional_fc.weight"}
    assert all(name.startswith("model.vision_model.") for name in names["vision"])
    assert all(name.startswith("model.perceiver_resampler.") for name in names["perceiver"])
    assert all(name.startswith("model.gated_cross_attn_layers.") for name in names["cross_attn"])
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight", "model.layers.3.mlp.up_proj.weight"} <= names["decoder"]

    no_decay = [
        "model.gated_cross_attn_layers.0.alpha_cross_attn",
        "model.gated_cross_attn_layers.1.alpha_dense",
        "model.gated_cross_attn_layers.0.cross_attn.q_layer_norm.weight",
        "model.gated_cross_attn_layers.0.input_layernorm.weight",
        "model.perceiver_resampler.latents",
        "model.perceiver_resampler.blocks.0.0.k_layer_norm.weight",
        "model.vision_model.embeddings.class_embedding",
        "model.vision_model.embeddings.position_embedding.weight",
        "model.vision_model.pre_layrnorm.bias",
        "model.embed_tokens.additional_embedding.weight",
    ]
    decay = [
        "model.gated_cross_attn_layers.0.cross_attn.k_proj.weight",
        "model.gated_cross_attn_layers.0.mlp.gate_proj.weight",
        "model.perceiver_resampler.blocks.1.1.fc.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "lm_head.additional_fc.weight",
    ]
    assert all(model.no_weight_decay(name) for name in no_decay)
    assert not any(model.no_weight_decay(name) for name in decay)


def test_text_only_batch_reaches_every_trainable_param_and_checkpointing_agrees():
    model = build().train()
    hf_twin(model)
    for _, param in model.param_groups()["vision"]:
        param.requires_grad_(False)
    input_ids = torch.tensor([TEXT_ONLY])
    out = model(input_ids, torch.zeros(1, 1, 3, IMAGE_PX, IMAGE_PX, dtype=torch.uint8), labels=input_ids)
    out.loss.backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None, name  # same graph on every ZeRO-3 rank
    assert torch.count_nonzero(model.gated_cross_attn_layers[0].cross_attn.k_proj.weight.grad) == 0

    batch = dict(input_ids=torch.tensor([WITH_IMAGES]), images=random_pixels(1, 2), labels=torch.tensor([WITH_IMAGES]))
    grads = []
    for checkpointing in (False, True):
        model.zero_grad(set_to_none=True)
        model.gradient_checkpointing = checkpointing
        model(**batch, z_loss_weight=1e-3).loss.backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, msg=name)


def test_bf16_forward_is_finite():
    model = build()
    hf_twin(model)
    model = model.to(torch.bfloat16)
    out = model(torch.tensor([WITH_IMAGES]), random_pixels(1, 2), labels=torch.tensor([WITH_IMAGES]))
    assert model.decoder.rotary_emb.inv_freq.dtype == torch.float32
    assert out.logits.dtype == torch.bfloat16 and out.loss.dtype == torch.float32 and torch.isfinite(out.loss)


def test_save_load_round_trip(tmp_path):
    model = build()
    hf_twin(model)
    save_pretrained(model.state_dict(), model.config_dict(), tmp_path)
    loaded = load_pretrained(tmp_path)
    assert loaded.config == model.config
    ids, pixels = torch.tensor([WITH_IMAGES]), random_pixels(1, 2)
    assert torch.equal(logits_of(loaded, ids, pixels), logits_of(model, ids, pixels))


def test_registry_and_config_checks():
    names = {spec.name for spec in list_specs()}
    assert {"otter-tiny", "idefics-tiny", "idefics-9b", "idefics-80b"} <= names
    spec = get_spec("idefics-9b")
    assert spec.image_spec(spec.config) == get_spec("otter-tiny").image_spec(spec.config)  # CLIP mean/std
    assert spec.image_spec(spec.config)["size_px"] == 224
    with pytest.raises(ValueError, match="cross_attn_qk_norms"):
        build_model("otter-tiny", {"cross_attn_qk_norms": True}, TOKEN_IDS)
    with pytest.raises(ValueError, match="cross_attn_num_heads x cross_attn_head_dim"):
        build({"cross_attn_head_dim": 8})
    with pytest.raises(ValueError, match="perceiver.ff_mult"):
        build({"perceiver": {"ff_mult": 2}})
    with pytest.raises(ValueError, match="param_layout"):
        build({"param_layout": "hub"})
