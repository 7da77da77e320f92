"""Flamingo family, OpenFlamingo / Otter releases (`openflamingo-9b`, `-9b-llama`, `otter-9b`, `-9b-mpt`,
`openflamingo-tiny-mpt`): the MPT decoder against transformers', packing under ALiBi, tied decoupled
embeddings, the vision feature contract, full-size parameter counts, and OpenFlamingo's / Otter's
checkpoint names and block math."""

import json

import open_clip
import pytest
import torch
from helpers import openflamingo_release
from open_clip.model import _build_vision_tower
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM, MptConfig, MptForCausalLM

from mmtrain.models import build_model, get_spec, model_from_config_dict, registry
from mmtrain.models.flamingo.blocks import media_attention_mask
from mmtrain.models.flamingo.config import VisionConfig
from mmtrain.models.flamingo.openflamingo import (
    from_openflamingo,
    openflamingo_key_map,
    row_splits,
    to_openflamingo,
)
from mmtrain.models.flamingo.vision import build_vision_encoder, patch_features
from mmtrain.models.io import load_pretrained, save_pretrained

IMAGE, EOC, PAD = 50, 51, 0
TOKEN_IDS = dict(
    image=IMAGE, end_of_chunk=EOC, answer=52, bos=1, eos=2, pad=PAD, base_vocab_size=50, num_added_tokens=3
)
IMAGE_PX = 32
PUBLISHED = ("openflamingo-9b", "openflamingo-9b-llama", "otter-9b", "otter-9b-mpt")
# Published sizes shrunk to toy ones; every kind field (decoder, tower, placement, tying) stays.
SHRINK = {
    "vision": dict(image_size_px=IMAGE_PX, patch_size_px=4, width=64, num_layers=2, num_heads=4),
    "perceiver": dict(num_latents=8, depth=2, num_heads=4, head_dim=16),
    "decoder": dict(hidden_size=96, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4),
    "cross_attn_every_n_layers": 2,
    "cross_attn_num_heads": 4,
    "cross_attn_head_dim": 16,
}


def shrunk(name):
    intermediate = 4 * 96 if get_spec(name).config.decoder.kind == "mpt" else 256
    return dict(SHRINK, decoder=dict(SHRINK["decoder"], intermediate_size=intermediate))


def build(name="openflamingo-tiny-mpt", overrides=None, seed=0, gates=None):
    torch.manual_seed(seed)
    model = build_model(name, overrides or {}, TOKEN_IDS).eval()
    if gates is not None:
        with torch.no_grad():
            for block in model.gated_cross_attn_layers:
                block.attn_gate.fill_(gates[0])
                block.ff_gate.fill_(gates[1])
    return model


def random_images(num_images, seed=1):
    return torch.randn(1, num_images, 3, IMAGE_PX, IMAGE_PX, generator=torch.Generator().manual_seed(seed))


def logits_of(model, input_ids, images, **kwargs):
    with torch.no_grad():
        return model(input_ids, images, **kwargs).logits


# --------------------------------------------------------------------------------------------
# Flavours


def test_published_flavours_shrunk_build_fast_and_run():
    ids = torch.tensor([[1, 5, IMAGE, 6, 7, EOC, IMAGE, 8, 2]])
    for name in PUBLISHED + ("openflamingo-tiny-mpt",):
        model = build(name, {} if "tiny" in name else shrunk(name))
        out = model(ids, random_images(2), labels=ids)
        assert torch.isfinite(out.loss), name
        assert out.logits.shape == (1, 9, 53)
        assert model.cross_attn_layer_indices == [1, 3], "OpenFlamingo: before layer i when (i+1) % n == 0"
    spec = get_spec("openflamingo-9b")
    assert spec.config.vision.tower == "open_clip" and spec.config.vision.final_ln_after_pool
    assert get_spec("otter-9b").config.vision.tower == "hf_clip"
    assert get_spec("otter-9b-mpt").config.decoder.kind == "mpt" and get_spec("otter-9b").config.decoder.kind == "llama"
    # transformers' MPT attention is eager; mmtrain adds SDPA and flex kernels over the same weights.
    assert get_spec("openflamingo-9b").attention_implementations == ("eager", "sdpa", "flex_attention")


def _xattn_params(dim, dim_visual, heads=8, dim_head=64, ff_mult=4):
    """OpenFlamingo's GatedCrossAttentionBlock: LayerNorm, to_q, to_kv, to_out, 2 gates, FF (LayerNorm, 2 Linear)."""
    inner = heads * dim_head
    return 2 * dim + dim * inner + dim_visual * 2 * inner + inner * dim + 2 + 2 * dim + 2 * dim * dim * ff_mult


def _perceiver_params(dim, depth=6, heads=8, dim_head=64, num_latents=64, ff_mult=4):
    inner = heads * dim_head
    layer = 4 * dim + dim * inner + dim * 2 * inner + inner * dim + 2 * dim + 2 * dim * dim * ff_mult
    return num_latents * dim + depth * layer + 2 * dim


def _open_clip_l14_visual_without_proj():
    config = open_clip.get_model_config("ViT-L-14")
    with torch.device("meta"):
        visual = _build_vision_tower(config["embed_dim"], config["vision_cfg"], quick_gelu=True)
    return sum(p.numel() for p in visual.parameters()) - visual.proj.numel()


def _hf_clip_l14_vision():
    config = CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=224,
        patch_size=14,
        hidden_act="quick_gelu",
    )
    with torch.device("meta"):
        return sum(p.numel() for p in CLIPVisionModel(config).parameters())


def _mpt_7b(vocab):
    with torch.device("meta"):
        model = MptForCausalLM(MptConfig(d_model=4096, n_heads=32, n_layers=32, expansion_ratio=4, vocab_size=vocab))
    assert model.lm_head.weight is model.transformer.wte.weight
    return sum(p.numel() for p in model.parameters())  # the tied head counted once


def _llama_7b(vocab):
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, intermediate_size=11008
    )
    with torch.device("meta"):
        return sum(p.numel() for p in LlamaForCausalLM(config).parameters())


@pytest.mark.parametrize(
    "name, base, added, decoder, vision, total",
    [
        # 50277 GPT-NeoX tokens + <|endofchunk|>, <image>, <PAD>; LLaMA's 32000 + the same (+ Otter's <answer>).
        ("openflamingo-9b", 50277, 3, _mpt_7b, _open_clip_l14_visual_without_proj, 8_130_678_800),
        ("openflamingo-9b-llama", 32000, 3, _llama_7b, _open_clip_l14_visual_without_proj, 8_220_454_928),
        ("otter-9b", 32000, 4, _llama_7b, _hf_clip_l14_vision, 8_220_463_120),
        ("otter-9b-mpt", 50277, 4, _mpt_7b, _hf_clip_l14_vision, 8_130_682_896),
    ],
)
def test_full_size_parameter_count_is_the_sum_of_the_published_parts(name, base, added, decoder, vision, total):
    ids = dict(TOKEN_IDS, image=base + 1, end_of_chunk=base, base_vocab_size=base, num_added_tokens=added)
    with torch.device("meta"):
        model = build_model(name, {}, ids)
    ours = sum(p.numel() for p in model.parameters())
    parts = decoder(base + added) + vision() + _perceiver_params(1024) + 8 * _xattn_params(4096, 1024)
    assert ours == parts == total
    assert model.config.published_vocab_size == base + added
    assert model.cross_attn_layer_indices == [3, 7, 11, 15, 19, 23, 27, 31]


# --------------------------------------------------------------------------------------------
# MPT decoder: parity with transformers, ALiBi under packing, tied decoupled embeddings


def _transformers_mpt(model):
    """transformers' MptForCausalLM with our decoder's weights (the tied table = base rows + added rows)."""
    dec = model.config.decoder
    vocab = model.config.base_vocab_size + model.config.num_added_tokens
    hf = MptForCausalLM(
        MptConfig(
            d_model=dec.hidden_size,
            n_heads=dec.num_attention_heads,
            n_layers=dec.num_hidden_layers,
            vocab_size=vocab,
            max_seq_len=dec.max_position_embeddings,
            use_cache=False,
        )
    )
    state = {f"transformer.{k}": v for k, v in model.decoder.state_dict().items() if not k.startswith("wte.")}
    state["transformer.wte.weight"] = torch.cat(
        [model.embed_tokens.weight, model.embed_tokens.additional_embedding.weight]
    )
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected  # tied to the embedding
    return hf.eval()


def test_closed_gates_equal_transformers_mpt():
    model = build()
    ids = torch.tensor([[1, 5, IMAGE, 6, 7, EOC, IMAGE, 8, 9, 52, 2]])
    with torch.no_grad():
        expected = _transformers_mpt(model)(ids).logits
    torch.testing.assert_close(logits_of(model, ids, random_images(2)), expected)


def test_packed_row_equals_documents_run_alone_under_alibi():
    """Positions restarting at 0 make the MPT causal mask block-diagonal; ALiBi's bias (slope x key
    index) differs from the in-document one by a per-row constant, so each document's logits are
    its own. Without the positions the second document would see the first."""
    first_ids, second_ids = [1, 5, IMAGE, 6, 7, 2], [1, 8, 9, IMAGE, 10, 11, 2]
    first_image, second_image = random_images(1), random_images(1, seed=3)
    packed_ids = torch.tensor([first_ids + second_ids + [PAD, PAD]])
    positions = torch.tensor([list(range(6)) + list(range(7)) + [0, 1]])
    images = torch.cat([first_image, second_image], dim=1)
    for gates in ((0.0, 0.0), (0.9, 0.9)):  # the decoder's mask alone, then with the media mask
        model = build(gates=gates)
        packed = logits_of(model, packed_ids, images, position_ids=positions)[0]
        torch.testing.assert_close(packed[:6], logits_of(model, torch.tensor([first_ids]), first_image)[0])
        torch.testing.assert_close(packed[6:13], logits_of(model, torch.tensor([second_ids]), second_image)[0])
        unpacked = logits_of(model, packed_ids, images)[0]
        assert (unpacked[6:13] - packed[6:13]).abs().max() > 1e-3


def test_tied_decoupled_embedding_is_the_head():
    model = build(gates=(0.5, 0.5))
    names = {name for name, _ in model.named_parameters()}
    assert not any(name.startswith("lm_head.") for name in names) and not hasattr(model, "lm_head")
    groups = {group: {name for name, _ in members} for group, members in model.param_groups().items()}
    assert groups["new_tokens"] == {"decoder.wte.additional_embedding.weight"}
    assert {"decoder.wte.weight", "decoder.norm_f.weight", "decoder.blocks.0.attn.Wqkv.weight"} <= groups["decoder"]
    assert model.no_weight_decay("decoder.wte.weight") and model.no_weight_decay("decoder.blocks.0.norm_1.weight")
    assert not model.no_weight_decay("decoder.blocks.0.ffn.up_proj.weight")
    embed = model.embed_tokens
    hidden = torch.randn(2, 96)
    with torch.no_grad():
        logits = embed(hidden, unembed=True)
    assert logits.shape == (2, 53)
    torch.testing.assert_close(logits, hidden @ torch.cat([embed.weight, embed.additional_embedding.weight]).T)
    # Training an added token's row moves both its input vector and its logit (one table, as OpenFlamingo's).
    ids = torch.tensor([[1, IMAGE, 5, EOC, 2]])
    model.train()(ids, random_images(1), labels=ids).loss.backward()
    assert torch.count_nonzero(embed.additional_embedding.weight.grad[:2]) > 0


def test_gradient_checkpointing_matches_and_bf16_runs(monkeypatch):
    model = build(gates=(0.5, 0.5)).train()
    ids = torch.tensor([[1, 5, IMAGE, 6, 7, EOC, 2]])
    batch = dict(input_ids=ids, images=random_images(1), labels=ids, z_loss_weight=1e-3)

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain_loss, plain_grads = loss_and_grads()
    calls = []
    real = registry.checkpoint
    monkeypatch.setattr(registry, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    model.gradient_checkpointing = True
    loss, grads = loss_and_grads()
    assert len(calls) == 4 + 2
    torch.testing.assert_close(loss, plain_loss)
    assert grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grads[name], grad, msg=name)
    out = build().to(torch.bfloat16)(ids, random_images(1), labels=ids, z_loss_weight=1e-3)
    assert out.logits.dtype == torch.bfloat16 and out.loss.dtype == torch.float32 and torch.isfinite(out.loss)


def test_save_load_and_config_dict_round_trip(tmp_path):
    model = build(gates=(0.7, 0.3))
    save_pretrained(model.state_dict(), model.config_dict(), tmp_path)
    loaded = load_pretrained(tmp_path)
    ids = torch.tensor([[1, IMAGE, 5, 6, 2]])
    images = random_images(1)
    assert torch.equal(logits_of(loaded, ids, images), logits_of(model, ids, images))
    config_dict = model.config_dict()
    assert json.loads(json.dumps(config_dict)) == config_dict
    assert model_from_config_dict(config_dict).config == model.config


def test_config_checks_name_the_field():
    with pytest.raises(ValueError, match="decoder.num_key_value_heads"):
        build(overrides={"decoder": {"num_key_value_heads": 2}})
    with pytest.raises(ValueError, match="decoder.intermediate_size"):
        build(overrides={"decoder": {"intermediate_size": 256}})
    with pytest.raises(ValueError, match="decoder.kind"):
        build(overrides={"decoder": {"kind": "gpt2"}})
    with pytest.raises(ValueError, match="vision.final_ln_after_pool"):
        build(
            "otter-tiny", {"vision": {"tower": "hf_clip", "pos_embed_type": "learnable", "final_ln_after_pool": True}}
        )


# --------------------------------------------------------------------------------------------
# Vision feature contract


def _hf_clip_to_open_clip(hf_state, layers):
    """openai/clip-vit-large-patch14 (HF) names → open_clip `visual` names (q, k, v stacked into in_proj)."""
    out = {
        "conv1.weight": hf_state["embeddings.patch_embedding.weight"],
        "class_embedding": hf_state["embeddings.class_embedding"],
        "positional_embedding": hf_state["embeddings.position_embedding.weight"],
    }
    for ours, theirs in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
        for leaf in ("weight", "bias"):
            out[f"{ours}.{leaf}"] = hf_state[f"{theirs}.{leaf}"]
    for i in range(layers):
        hf, oc = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for leaf in ("weight", "bias"):
            out[f"{oc}attn.in_proj_{leaf}"] = torch.cat([hf_state[f"{hf}self_attn.{p}_proj.{leaf}"] for p in "qkv"])
            for ours, theirs in (
                ("attn.out_proj", "self_attn.out_proj"),
                ("ln_1", "layer_norm1"),
                ("ln_2", "layer_norm2"),
                ("mlp.c_fc", "mlp.fc1"),
                ("mlp.c_proj", "mlp.fc2"),
            ):
                out[f"{oc}{ours}.{leaf}"] = hf_state[f"{hf}{theirs}.{leaf}"]
    return out


def test_otter_hf_clip_tokens_equal_openflamingo_open_clip_tokens():
    """Otter's tokens (HF CLIP last_hidden_state[:, 1:]) are open_clip's patch tokens before ln_post,
    which the open_clip of OpenFlamingo's time returned: `final_ln_after_pool`. Today's default
    normalises every token, which the released perceivers never saw."""
    otter = build("otter-tiny", {"vision": {"tower": "hf_clip", "pos_embed_type": "learnable", "quick_gelu": True}})
    hf_tower = otter.vision_encoder
    assert all(torch.isfinite(p).all() for p in hf_tower.parameters())  # deferred init ran
    torch.testing.assert_close(hf_tower.pre_layrnorm.weight, torch.ones(64))
    images = random_images(2)
    otter_tokens = patch_features(hf_tower, images)
    assert otter_tokens.shape == (1, 2, 64, 64)  # (32 / 4)^2 patches, no CLS
    state = _hf_clip_to_open_clip(hf_tower.state_dict(), layers=2)
    for after_pool, same in ((True, True), (False, False)):
        tower = build_vision_encoder(
            VisionConfig(
                image_size_px=IMAGE_PX,
                patch_size_px=4,
                width=64,
                num_layers=2,
                num_heads=4,
                quick_gelu=True,
                final_ln_after_pool=after_pool,
            )
        )
        tower.load_state_dict(state)
        with torch.no_grad():
            tokens = patch_features(tower, images)
        assert torch.allclose(tokens, otter_tokens, atol=1e-5) == same


# --------------------------------------------------------------------------------------------
# OpenFlamingo / Otter checkpoint names


def _openflamingo_keys_mpt_tiny():
    """Flamingo.state_dict() for openflamingo-tiny-mpt's sizes, aliases dropped, written from
    open_flamingo/src: open_clip `visual` as vision_encoder (2 resblocks, with `proj`), the perceiver's
    `layers.K = ModuleList([PerceiverAttention, FeedForward])`, FlamingoLayer(gated_cross_attn_layer,
    decoder_layer) around each MPT block (gated blocks at 1 and 3), mosaic MPT's wte / norm_f, no lm_head."""
    keys = [
        "vision_encoder." + k
        for k in (
            "class_embedding",
            "positional_embedding",
            "proj",
            "conv1.weight",
            "ln_pre.weight",
            "ln_pre.bias",
            "ln_post.weight",
            "ln_post.bias",
        )
    ]
    for i in range(2):
        for leaf in (
            "ln_1.weight",
            "ln_1.bias",
            "attn.in_proj_weight",
            "attn.in_proj_bias",
            "attn.out_proj.weight",
            "attn.out_proj.bias",
            "ln_2.weight",
            "ln_2.bias",
            "mlp.c_fc.weight",
            "mlp.c_fc.bias",
            "mlp.c_proj.weight",
            "mlp.c_proj.bias",
        ):
            keys.append(f"vision_encoder.transformer.resblocks.{i}.{leaf}")
    keys += ["perceiver.latents", "perceiver.norm.weight", "perceiver.norm.bias"]
    keys += [
        f"perceiver.layers.0.0.{leaf}"
        for leaf in (
            "norm_media.weight",
            "norm_media.bias",
            "norm_latents.weight",
            "norm_latents.bias",
            "to_q.weight",
            "to_kv.weight",
            "to_out.weight",
        )
    ]
    keys += [f"perceiver.layers.0.1.{leaf}" for leaf in ("0.weight", "0.bias", "1.weight", "3.weight")]
    lm = "lang_encoder.transformer."
    keys += [lm + "wte.weight", lm + "norm_f.weight"]
    for i in range(4):
        keys += [
            f"{lm}blocks.{i}.decoder_layer.{leaf}.weight"
            for leaf in ("norm_1", "attn.Wqkv", "attn.out_proj", "norm_2", "ffn.up_proj", "ffn.down_proj")
        ]
    for i in (1, 3):
        keys += [
            f"{lm}blocks.{i}.gated_cross_attn_layer.{leaf}"
            for leaf in (
                "attn_gate",
                "ff_gate",
                "attn.norm.weight",
                "attn.norm.bias",
                "attn.to_q.weight",
                "attn.to_kv.weight",
                "attn.to_out.weight",
                "ff.0.weight",
                "ff.0.bias",
                "ff.1.weight",
                "ff.3.weight",
            )
        ]
    return set(keys)


def test_openflamingo_keys_of_the_mpt_flavour_and_exact_round_trip():
    model = build(gates=(0.7, 0.3))
    published = to_openflamingo(model.state_dict(), model.config)
    assert _openflamingo_keys_mpt_tiny() - set(published) == {"vision_encoder.proj"}  # open_clip's pooled projection
    assert set(published) <= _openflamingo_keys_mpt_tiny()
    assert published["lang_encoder.transformer.wte.weight"].shape == (53, 96)  # resized table: base + added rows
    assert row_splits(model.config) == {
        "lang_encoder.transformer.wte.weight": [
            ("decoder.wte.weight", 0, 50),
            ("decoder.wte.additional_embedding.weight", 50, 3),
        ]
    }
    key_map = openflamingo_key_map(model.config)
    assert (
        key_map["lang_encoder.transformer.blocks.3.gated_cross_attn_layer.ff.3.weight"]
        == "gated_cross_attn_layers.1.ff.fc_out.weight"
    )
    assert key_map["perceiver.layers.0.0.norm_media.bias"] == "perceiver.blocks.0.attn.media_norm.bias"
    back = from_openflamingo(published, model.config)
    state = model.state_dict()
    assert back.keys() == state.keys()
    assert all(torch.equal(back[key], state[key]) for key in state)


def test_openflamingo_llama_keys_aliases_and_unknown_keys():
    model = build("otter-tiny", gates=(0.7, 0.3))  # OpenFlamingo v1's layout: open_clip + LLaMA
    published = to_openflamingo(model.state_dict(), model.config)
    lm = "lang_encoder.model."
    expected_lm = {lm + "embed_tokens.weight", lm + "norm.weight", "lang_encoder.lm_head.weight"}
    for i in range(4):
        expected_lm |= {
            f"{lm}layers.{i}.decoder_layer.{leaf}.weight"
            for leaf in (
                "self_attn.q_proj",
                "self_attn.k_proj",
                "self_attn.v_proj",
                "self_attn.o_proj",
                "mlp.gate_proj",
                "mlp.up_proj",
                "mlp.down_proj",
                "input_layernorm",
                "post_attention_layernorm",
            )
        }
    for i in (1, 3):
        expected_lm |= {
            f"{lm}layers.{i}.gated_cross_attn_layer.{leaf}"
            for leaf in (
                "attn_gate",
                "ff_gate",
                "attn.norm.weight",
                "attn.norm.bias",
                "attn.to_q.weight",
                "attn.to_kv.weight",
                "attn.to_out.weight",
                "ff.0.weight",
                "ff.0.bias",
                "ff.1.weight",
                "ff.3.weight",
            )
        }
    assert {k for k in published if k.startswith("lang_encoder.")} == expected_lm
    assert published["lang_encoder.lm_head.weight"].shape == (53, 96)
    # A full Flamingo.state_dict() also holds the aliases; saved buffers and open_clip's proj are skipped.
    full = dict(published)
    for key, value in published.items():
        if ".decoder_layer." in key:
            full[key.replace(f"{lm}layers.", "lang_encoder.old_decoder_blocks.").replace(".decoder_layer.", ".")] = (
                value
            )
        if ".gated_cross_attn_layer." in key:
            full[
                key.replace(f"{lm}layers.", "lang_encoder.gated_cross_attn_layers.").replace(
                    ".gated_cross_attn_layer.", "."
                )
            ] = value
    full["vision_encoder.proj"] = torch.zeros(64, 32)
    full[f"{lm}layers.0.decoder_layer.self_attn.rotary_emb.inv_freq"] = torch.zeros(12)
    back = from_openflamingo(full, model.config)
    state = model.state_dict()
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    # OpenFlamingo v1 kept the whole open_clip CLIP: the tower under `visual.`, a text tower beside it.
    v1 = {
        ("vision_encoder.visual." + k[len("vision_encoder.") :] if k.startswith("vision_encoder.") else k): v
        for k, v in published.items()
    }
    v1["vision_encoder.positional_embedding"] = torch.zeros(77, 32)  # the text tower's, same name as the ViT's in v2
    v1["vision_encoder.transformer.resblocks.0.attn.in_proj_weight"] = torch.zeros(96, 32)
    back = from_openflamingo(v1, model.config)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    # A saved checkpoint (trainable parameters + embeddings) maps to that subset.
    saved = {
        k: v
        for k, v in published.items()
        if k.startswith("perceiver.") or "gated_cross_attn_layer." in k or "embed_tokens" in k
    }
    assert set(from_openflamingo(saved, model.config)) == {
        n for n in state if n.startswith(("perceiver.", "gated_cross_attn_layers.", "decoder.embed_tokens."))
    }
    with pytest.raises(KeyError, match="not in the openflamingo layout"):
        from_openflamingo({"lang_encoder.model.layers.0.decoder_layer.bogus.weight": torch.zeros(1)}, model.config)


def test_otter_names_and_padded_mpt_table():
    model = build("otter-9b-mpt", shrunk("otter-9b-mpt"))  # HF CLIP tower + MPT, at toy size
    published = to_openflamingo(model.state_dict(), model.config, source="otter", table_rows=64)
    assert "vision_encoder.vision_model.encoder.layers.1.self_attn.q_proj.weight" in published
    assert "vision_encoder.vision_model.post_layernorm.bias" in published
    assert {k for k in published if k.startswith("perceiver.layers.1.")} == {
        f"perceiver.layers.1.{leaf}"
        for leaf in (
            "norm_media.weight",
            "norm_media.bias",
            "norm_latents.weight",
            "norm_latents.bias",
            "to_q.weight",
            "to_kv.weight",
            "to_out.weight",
            "feed_forward.0.weight",
            "feed_forward.0.bias",
            "feed_forward.1.weight",
            "feed_forward.3.weight",
        )
    }
    assert "lang_encoder.transformer.blocks.3.gated_cross_attn_layer.feed_forward.3.weight" in published
    table = published["lang_encoder.transformer.wte.weight"]
    assert table.shape == (64, 96) and torch.count_nonzero(table[53:]) == 0  # Otter keeps MPT's padded rows
    back = from_openflamingo(published, model.config, source="otter")
    state = model.state_dict()
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    with pytest.raises(ValueError, match="vision.tower"):
        to_openflamingo(state, model.config, source="openflamingo")


# --------------------------------------------------------------------------------------------
# OpenFlamingo's block math, loaded under its names


def _feed_forward(dim, mult):
    return nn.Sequential(
        nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(), nn.Linear(dim * mult, dim, bias=False)
    )


def _heads(x, h):
    return x.unflatten(-1, (h, -1)).transpose(-3, -2)  # [..., n, h*d] -> [..., h, n, d]


class RefPerceiverAttention(nn.Module):
    """open_flamingo/src/helpers.py PerceiverAttention: keys/values from concat(media, latents)."""

    def __init__(self, dim, dim_head, heads):
        super().__init__()
        self.heads, self.scale = heads, dim_head**-0.5
        self.norm_media, self.norm_latents = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(dim, 2 * heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)

    def forward(self, x, latents):
        x, latents = self.norm_media(x), self.norm_latents(latents)
        q = _heads(self.to_q(latents), self.heads) * self.scale
        k, v = (_heads(t, self.heads) for t in self.to_kv(torch.cat([x, latents], dim=-2)).chunk(2, dim=-1))
        sim = q @ k.transpose(-1, -2)
        attn = (sim - sim.amax(dim=-1, keepdim=True).detach()).softmax(dim=-1)
        return self.to_out((attn @ v).transpose(-3, -2).flatten(-2))


class RefPerceiver(nn.Module):
    def __init__(self, dim, depth, dim_head, heads, num_latents, ff_mult):
        super().__init__()
        self.latents = nn.Parameter(torch.zeros(num_latents, dim))
        self.layers = nn.ModuleList(
            nn.ModuleList([RefPerceiverAttention(dim, dim_head, heads), _feed_forward(dim, ff_mult)])
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):  # [b, T, F, v, D]
        b, T = x.shape[:2]
        x = x.flatten(2, 3)
        latents = self.latents.expand(b, T, *self.latents.shape)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm(latents)


class RefMaskedCrossAttention(nn.Module):
    """helpers.py MaskedCrossAttention (only_attend_immediate_media=True)."""

    def __init__(self, dim, dim_visual, dim_head, heads):
        super().__init__()
        self.heads, self.scale = heads, dim_head**-0.5
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(dim_visual, 2 * heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)

    def forward(self, x, media, media_locations):  # media [B, T_img, n, D]
        _, t_img, n = media.shape[:3]
        q = _heads(self.to_q(self.norm(x)), self.heads) * self.scale
        k, v = (_heads(t, self.heads) for t in self.to_kv(media.flatten(1, 2)).chunk(2, dim=-1))
        sim = q @ k.transpose(-1, -2)
        text_time = media_locations.cumsum(dim=-1)
        media_time = torch.arange(1, t_img + 1).repeat_interleave(n)
        sim = sim.masked_fill(~(text_time[:, None, :, None] == media_time), -torch.finfo(sim.dtype).max)
        attn = (sim - sim.amax(dim=-1, keepdim=True).detach()).softmax(dim=-1)
        attn = attn.masked_fill((text_time == 0)[:, None, :, None], 0.0)
        return self.to_out((attn @ v).transpose(1, 2).flatten(2))


class RefGatedCrossAttentionBlock(nn.Module):
    def __init__(self, dim, dim_visual, dim_head, heads, ff_mult):
        super().__init__()
        self.attn = RefMaskedCrossAttention(dim, dim_visual, dim_head, heads)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ff = _feed_forward(dim, ff_mult)
        self.ff_gate = nn.Parameter(torch.zeros(1))

    def forward(self, x, media, media_locations):
        x = self.attn(x, media, media_locations) * self.attn_gate.tanh() + x
        return self.ff(x) * self.ff_gate.tanh() + x


def _load_under(module, published, prefix):
    module.load_state_dict({k[len(prefix) :]: v for k, v in published.items() if k.startswith(prefix)})  # strict
    return module


def test_perceiver_and_gated_block_match_openflamingo_formulas_under_its_names():
    model = build(gates=(0.7, -0.4))
    config = model.config
    published = to_openflamingo(model.state_dict(), config)
    p = config.perceiver
    ref_perceiver = _load_under(
        RefPerceiver(64, p.depth, p.head_dim, p.num_heads, p.num_latents, p.ff_mult), published, "perceiver."
    )
    features = torch.randn(2, 3, 64, 64)  # [B, T_img, patches, width]
    with torch.no_grad():
        latents = model.perceiver(features)
        torch.testing.assert_close(latents, ref_perceiver(features.unsqueeze(2)))
    layer = model.cross_attn_layer_indices[1]
    ref_block = _load_under(
        RefGatedCrossAttentionBlock(96, 64, 16, 4, 4),
        published,
        f"lang_encoder.transformer.blocks.{layer}.gated_cross_attn_layer.",
    )
    # Text before the first image (zero cross-attention), then three images; as many <image> tokens as media.
    ids = torch.tensor([[1, 5, IMAGE, 6, 7, IMAGE, 8, IMAGE, 9, 2], [IMAGE, 5, 6, IMAGE, 7, 8, 9, IMAGE, 2, 2]])
    x = torch.randn(2, 10, 96)
    mask, has_media = media_attention_mask(ids, IMAGE, num_images=3, num_latents=p.num_latents)
    with torch.no_grad():
        ours = model.gated_cross_attn_layers[1](x, latents.flatten(1, 2), mask, has_media)
        torch.testing.assert_close(ours, ref_block(x, latents, ids == IMAGE))


# --------------------------------------------------------------------------------------------
# model.init_from: OpenFlamingo's release in its three parts, Otter's HF release


@pytest.mark.parametrize("name,base_rows,wrap", [("openflamingo-tiny-mpt", 64, False), ("otter-tiny", None, True)])
def test_init_from_openflamingo_release_in_three_parts(tmp_path, name, base_rows, wrap):
    from mmtrain.engine.load import load_published, verify_loaded

    model = build(name, gates=(0.7, 0.3))
    sources = openflamingo_release(model, tmp_path / "release", base_rows, wrap)
    fresh = build(name, seed=1)
    plan = load_published(fresh, sources)
    state, got = model.state_dict(), fresh.state_dict()
    assert got.keys() == state.keys()
    assert [k for k in state if not torch.equal(got[k], state[k])] == []
    assert verify_loaded(fresh, sources) == []
    # The tables' rows come from checkpoint.pt alone (it replaces the base LM's), read by rows.
    tables = [e for e in plan.entries if e.first_row is not None]
    assert {e.source for e in tables} == {2} and {e.first_row for e in tables} == {0, 50}
    assert "visual.proj" in plan.ignored and "transformer.resblocks.0.attn.in_proj_weight" in plan.ignored


def test_init_from_openflamingo_parts_must_cover_every_parameter(tmp_path):
    from mmtrain.engine.load import load_published

    model = build(gates=(0.7, 0.3))
    base_dir, clip, checkpoint = openflamingo_release(model, tmp_path / "release", 64)
    trained = torch.load(checkpoint, weights_only=True)
    del trained["perceiver.layers.0.0.to_q.weight"]
    torch.save(trained, checkpoint)
    with pytest.raises(ValueError, match=r"missing 1 keys from all of .*perceiver\.layers\.0\.0\.to_q\.weight"):
        load_published(build(seed=1), [base_dir, clip, checkpoint])
    # Without checkpoint.pt the perceiver and the gated blocks are missing: listed, with the count.
    with pytest.raises(ValueError, match=r"missing \d+ keys.*perceiver\.latents"):
        load_published(build(seed=1), [base_dir, clip])


def test_init_from_otter_hf_release(tmp_path):
    from mmtrain.engine.load import load_published, verify_loaded
    from mmtrain.models.weights import WriteEntry, write_sharded

    model = build("otter-9b-mpt", shrunk("otter-9b-mpt"), gates=(0.7, 0.3))
    published = to_openflamingo(model.state_dict(), model.config, source="otter", table_rows=64)
    entries = [WriteEntry(key, key, tuple(v.shape), v.dtype) for key, v in published.items()]
    index = write_sharded(tmp_path / "otter", entries, published.__getitem__, max_shard_bytes=200_000)
    assert len(set(index["weight_map"].values())) > 1
    fresh = build("otter-9b-mpt", shrunk("otter-9b-mpt"), seed=1)
    load_published(fresh, tmp_path / "otter")
    state, got = model.state_dict(), fresh.state_dict()
    assert [k for k in state if not torch.equal(got[k], state[k])] == []
    assert verify_loaded(fresh, str(tmp_path / "otter")) == []
