"""Published weight layouts (mmtrain.models.weights, mmtrain.engine.load without ZeRO): the lazy
safetensors reader, key/shape matching with its errors, the streaming sharded writer, and export
to IDEFICS / Fuyu directories that transformers' from_pretrained loads with the same logits."""

import json
import logging

import pytest
import torch
from helpers import randomise_like_trained
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import FuyuForCausalLM as HFFuyuForCausalLM
from transformers import IdeficsForVisionText2Text
from transformers.models.idefics.processing_idefics import (
    IMAGE_TOKEN,
    image_attention_mask_for_packed_input_ids_pt,
    incremental_to_binary_attention_mask,
)

from mmtrain.engine.load import load_published, verify_loaded
from mmtrain.models import build_model
from mmtrain.models.io import load_pretrained, save_pretrained
from mmtrain.models.weights import (
    INDEX_NAME,
    WEIGHTS_NAME,
    SafetensorsCheckpoint,
    WeightsMismatchError,
    WriteEntry,
    export_model,
    layout_of,
    load_weights,
    parse_size,
    plan_load,
    write_sharded,
)

# IDEFICS tiny: base vocabulary 100, <fake_token_around_image> = 100, <image> = 101 (+ more added tokens).
VOCAB = 100
FAKE, IMAGE = VOCAB, VOCAB + 1
PAD, BOS, EOS = 0, 1, 2
IDEFICS_IDS = dict(image=IMAGE, fake_image=FAKE, bos=BOS, eos=EOS, pad=PAD, base_vocab_size=VOCAB, num_added_tokens=2)
IMAGE_PX = 30
WITH_IMAGES = [BOS, 5, 6, FAKE, IMAGE, FAKE, 7, 8, 9, FAKE, IMAGE, FAKE, 10, 11, EOS]
TEXT_ONLY = [BOS, 12, 13, 14, 15, EOS]

# Fuyu tiny: |SPEAKER| (image patch) = 297, |NEWLINE| = 298 inside a 300-token vocabulary.
FUYU_IMAGE, FUYU_NEWLINE = 297, 298
FUYU_IDS = dict(image=FUYU_IMAGE, end_of_chunk=299, answer=296, bos=BOS, eos=EOS, pad=PAD, base_vocab_size=296, num_added_tokens=4)


def trained(model, seed=1):
    """Random weights unlike any initialisation: open gates, non-unit norms (a "trained" state)."""
    return randomise_like_trained(model, seed).eval()


def idefics(num_added=2, seed=0, overrides=None):
    torch.manual_seed(seed)
    return build_model("idefics-tiny", overrides or {}, dict(IDEFICS_IDS, num_added_tokens=num_added)).eval()


def fuyu(seed=0):
    torch.manual_seed(seed)
    return build_model("fuyu-tiny", {}, FUYU_IDS).eval()


def export_state(model, out_dir, **kwargs):
    """The export path of a live model: its state dict as the tensor source."""
    state = model.state_dict()
    return export_model(out_dir, model, state.__getitem__, **kwargs)


# ------------------------------------------------------------------------------------------------
# Reader


def tensors():
    return {
        "a.weight": torch.randn(7, 5),
        "b.bf16": torch.randn(3, 4, 2).to(torch.bfloat16),
        "c.scalar": torch.tensor(3.5),
        "d.ids": torch.arange(6, dtype=torch.int64).view(2, 3),
        "e.mask": torch.tensor([True, False, True]),
        "f.empty": torch.zeros(0, 4),
    }


def test_reader_single_file_matches_safe_open(tmp_path):
    data = tensors()
    save_file(data, str(tmp_path / WEIGHTS_NAME))
    for path in (tmp_path, tmp_path / WEIGHTS_NAME):
        with SafetensorsCheckpoint(path) as checkpoint, safe_open(str(tmp_path / WEIGHTS_NAME), "pt") as reference:
            assert sorted(checkpoint.keys()) == sorted(data)
            assert checkpoint.total_bytes == sum(t.numel() * t.element_size() for t in data.values())
            for key, tensor in data.items():
                got = checkpoint.read(key)
                assert got.dtype == tensor.dtype and got.shape == tensor.shape
                assert torch.equal(got, tensor) and torch.equal(got, reference.get_tensor(key))
                assert got.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()  # its own buffer


def test_writer_shards_one_tensor_at_a_time_and_reader_reads_them(tmp_path):
    data = {f"layer.{i}.weight": torch.randn(16, 16) for i in range(10)}  # 1 kB each
    entries = [WriteEntry(key=k, source=k, shape=tuple(t.shape), dtype=torch.bfloat16) for k, t in data.items()]
    fetched = []

    def fetch(name):
        fetched.append(name)
        return data[name]

    (tmp_path / "model-00001-of-00009.safetensors").write_bytes(b"stale")
    index = write_sharded(tmp_path, entries, fetch, max_shard_bytes=1500)
    assert fetched == list(data)  # each tensor fetched once, in order
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == sorted([INDEX_NAME] + [f"model-{i:05d}-of-00005.safetensors" for i in range(1, 6)])
    stored = json.loads((tmp_path / INDEX_NAME).read_text())
    assert stored == index and stored["metadata"]["total_size"] == 10 * 16 * 16 * 2
    assert set(stored["weight_map"]) == set(data)
    for name in set(stored["weight_map"].values()):
        with safe_open(str(tmp_path / name), "pt") as f:  # safetensors itself accepts the files
            assert f.metadata() == {"format": "pt"}
            for key in f.keys():
                assert torch.equal(f.get_tensor(key), data[key].to(torch.bfloat16))
    with SafetensorsCheckpoint(tmp_path) as checkpoint:
        assert sorted(checkpoint.keys()) == sorted(data)
        assert torch.equal(checkpoint.read("layer.7.weight"), data["layer.7.weight"].to(torch.bfloat16))
    # One shard: model.safetensors, and the index of the earlier export is gone.
    write_sharded(tmp_path, entries[:2], data.__getitem__)
    assert sorted(p.name for p in tmp_path.iterdir()) == [WEIGHTS_NAME]


def test_reader_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither"):
        SafetensorsCheckpoint(tmp_path)
    save_file({"x": torch.zeros(2)}, str(tmp_path / "part.safetensors"))
    (tmp_path / INDEX_NAME).write_text(json.dumps({"weight_map": {"x": "part.safetensors", "y": "part.safetensors"}}))
    with pytest.raises(ValueError, match="lacks: y"):
        SafetensorsCheckpoint(tmp_path)


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("500MiB") == 500 * 2**20 and parse_size(123) == 123
    with pytest.raises(ValueError):
        parse_size("5 parsecs")


# ------------------------------------------------------------------------------------------------
# Matching keys and shapes


def test_mismatch_error_lists_first_keys_and_counts():
    params = [(f"p{i}", (2,)) for i in range(25)] + [("q", (3, 4))]
    file_shapes = {f"p{i}": (2,) for i in range(5, 25)}
    file_shapes.update({f"stray{i}": (1,) for i in range(12)})
    file_shapes["q"] = (4, 3)
    file_shapes["model.rotary_emb.inv_freq"] = (8,)  # a buffer an older writer saved: skipped
    with pytest.raises(WeightsMismatchError) as error:
        plan_load(params, file_shapes, source="ckpt")
    message = str(error.value)
    assert "missing 5 keys: p0, p1, p2, p3, p4" in message
    assert "unexpected 12 keys: stray0," in message and "(+2 more, 12 in all)" in message
    assert "1 shapes differ: q [4, 3] vs model [3, 4]" in message
    assert "inv_freq" not in message


def test_idefics_published_tables_with_two_rows_pad_a_larger_model(tmp_path, caplog):
    """The published IDEFICS checkpoints hold 2 added-token rows; a tokenizer with more added tokens
    gets the file's rows first and keeps its fresh initialisation for the rest (logged)."""
    published = trained(idefics(num_added=2, seed=3))
    save_file({k: v.contiguous() for k, v in published.state_dict().items()}, str(tmp_path / WEIGHTS_NAME))
    ours = idefics(num_added=5, seed=4)
    fresh = {k: v.clone() for k, v in ours.state_dict().items()}
    with caplog.at_level(logging.INFO, logger="mmtrain"):
        plan = load_published(ours, tmp_path)
    padded = {e.name: (e.file_rows, e.shape[0]) for e in plan.padded()}
    assert padded == {"model.embed_tokens.additional_embedding.weight": (2, 5), "lm_head.additional_fc.weight": (2, 5)}
    assert "rows 2..4 keep the model's fresh initialisation" in caplog.text
    for name, tensor in ours.state_dict().items():
        source = published.state_dict()[name]
        if name in padded:
            assert torch.equal(tensor[:2], source) and torch.equal(tensor[2:], fresh[name][2:])
        else:
            assert torch.equal(tensor, source), name
    assert verify_loaded(ours, tmp_path) == []
    # More rows in the file than in the model would drop trained rows: an error.
    with pytest.raises(ValueError, match=r"additional_embedding.weight \[5, 64\] vs model \[2, 64\]"):
        load_published(idefics(num_added=2), _saved(tmp_path / "five", idefics(num_added=5)))


def _saved(directory, model):
    directory.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / WEIGHTS_NAME))
    return directory


def test_loading_converts_dtype_and_detects_wrong_models(tmp_path):
    source = trained(idefics(seed=5))
    save_pretrained({k: v.to(torch.bfloat16) for k, v in source.state_dict().items()}, source.config_dict(), tmp_path)
    ours = idefics(seed=6)
    load_published(ours, tmp_path)
    for name, tensor in ours.state_dict().items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, source.state_dict()[name].to(torch.bfloat16).float())
    with pytest.raises(ValueError, match=r"missing .* keys: vision_encoder\..*unexpected .* keys: model\."):
        load_published(build_model("otter-tiny", {}, dict(IDEFICS_IDS, end_of_chunk=3, answer=4)), tmp_path)


# ------------------------------------------------------------------------------------------------
# Reading what transformers writes


def test_transformers_written_idefics_loads_with_the_same_logits(tmp_path):
    ours = trained(idefics(seed=7))
    hf = IdeficsForVisionText2Text(layout_of(ours).hf_config(ours)).eval()
    hf.load_state_dict(ours.state_dict())
    hf.save_pretrained(str(tmp_path), max_shard_size="300KB")  # sharded, by transformers itself
    assert (tmp_path / INDEX_NAME).is_file()
    fresh = idefics(seed=8)
    load_weights(fresh, tmp_path)
    ids, pixels = torch.tensor([WITH_IMAGES]), random_pixels(1, 2)
    with torch.no_grad():
        assert torch.equal(fresh(ids, pixels).logits, ours(ids, pixels).logits)


def test_transformers_written_fuyu_loads_through_the_aliases(tmp_path):
    ours = trained(fuyu(seed=1))
    hf = HFFuyuForCausalLM(layout_of(ours).hf_config(ours)).eval()
    hf_state = hf.state_dict()
    assert all(key.startswith(("model.", "lm_head.")) for key in hf_state)  # transformers 5's names
    # transformers 5's own names in a file (whatever save_pretrained writes) reach ours by alias.
    from mmtrain.models.fuyu import checkpoint_key

    save_file({key: ours.state_dict()[checkpoint_key(key)].contiguous() for key in hf_state}, str(tmp_path / WEIGHTS_NAME))
    fresh = fuyu(seed=2)
    load_weights(fresh, tmp_path)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in ours.state_dict().items())


# ------------------------------------------------------------------------------------------------
# Export → transformers from_pretrained


class _Tokenizer:
    eos_token_id = EOS

    @staticmethod
    def convert_tokens_to_ids(token):
        assert token == IMAGE_TOKEN
        return IMAGE


def random_pixels(batch, num_images, seed=2):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, num_images, 3, IMAGE_PX, IMAGE_PX), dtype=torch.uint8, generator=generator)


def idefics_batch(model):
    length = max(len(WITH_IMAGES), len(TEXT_ONLY))
    rows = [WITH_IMAGES, TEXT_ONLY]
    input_ids = torch.tensor([row + [PAD] * (length - len(row)) for row in rows])
    attention_mask = torch.tensor([[1] * len(row) + [0] * (length - len(row)) for row in rows])
    pixels = random_pixels(2, 2)
    pixels[1] = 0
    vision = model.config.vision
    mean, std = torch.tensor(vision.mean).view(1, 1, 3, 1, 1), torch.tensor(vision.std).view(1, 1, 3, 1, 1)
    pixel_values = (pixels.float() / 255.0 - mean) / std
    pixel_values[1] = 0.0
    incremental, _ = image_attention_mask_for_packed_input_ids_pt(input_ids, _Tokenizer())
    image_attention_mask = incremental_to_binary_attention_mask(incremental, "pt", num_classes=2)
    return input_ids, attention_mask, pixels, pixel_values, image_attention_mask


@pytest.mark.parametrize("num_added", [2, 5])
def test_idefics_export_loads_in_transformers_with_the_same_logits(tmp_path, num_added):
    ours = trained(idefics(num_added=num_added, seed=9))
    summary = export_state(ours, tmp_path, max_shard_bytes=400_000)
    assert summary["layout"] == "idefics" and len(summary["files"]) > 1 and (tmp_path / INDEX_NAME).is_file()
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["IdeficsForVisionText2Text"] and config["model_type"] == "idefics"
    assert config["additional_vocab_size"] == num_added and config["vocab_size"] == VOCAB

    hf, info = IdeficsForVisionText2Text.from_pretrained(str(tmp_path), output_loading_info=True)
    assert (info["missing_keys"], info["unexpected_keys"], info["mismatched_keys"]) == (set(), set(), set()), info
    assert not info["error_msgs"]
    hf.eval()
    input_ids, attention_mask, pixels, pixel_values, image_attention_mask = idefics_batch(ours)
    with torch.no_grad():
        expected = hf(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                      image_attention_mask=image_attention_mask).logits
        got = ours(input_ids, pixels, attention_mask=attention_mask).logits
    real = attention_mask.bool()
    assert (got - expected)[real].abs().max().item() <= 1e-4
    assert got.shape[-1] == VOCAB + num_added
    # mmtrain reloads the same directory too (mmtrain_model.json sits beside config.json).
    reloaded = load_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids, pixels).logits, ours(input_ids, pixels).logits)


def test_fuyu_export_loads_in_transformers_with_the_same_logits(tmp_path):
    ours = trained(fuyu(seed=3))
    summary = export_state(ours, tmp_path)
    assert summary["layout"] == "fuyu" and summary["files"] == [WEIGHTS_NAME]
    with SafetensorsCheckpoint(tmp_path) as checkpoint:  # the published (adept/fuyu-8b) key names
        assert "language_model.model.embed_tokens.weight" in checkpoint and "vision_embed_tokens.weight" in checkpoint
    hf, info = HFFuyuForCausalLM.from_pretrained(str(tmp_path), output_loading_info=True)
    assert (info["missing_keys"], info["unexpected_keys"], info["mismatched_keys"]) == (set(), set(), set()), info
    hf.eval()
    rows, cols = 2, 3
    ids, indices = [], []
    for r in range(rows):
        ids += [FUYU_IMAGE] * cols + [FUYU_NEWLINE]
        indices += list(range(r * cols, (r + 1) * cols)) + [-1]
    input_ids = torch.tensor([ids + [BOS, 5, 6, 7, 8]])
    patch_indices = torch.tensor([indices + [-1] * 5])
    patches = torch.randint(0, 256, (rows * cols, 2700), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got = ours(input_ids=input_ids, image_patches=patches.unsqueeze(0), image_patch_indices=patch_indices).logits
        normalised = (patches.float() / 255.0 - 0.5) / 0.5
        expected = hf(input_ids=input_ids, pixel_values=normalised.unsqueeze(0)).logits
    assert (got - expected).abs().max().item() <= 1e-4


def test_export_refuses_what_the_published_class_cannot_express(tmp_path):
    otter = build_model("otter-tiny", {}, dict(IDEFICS_IDS, end_of_chunk=3, answer=4))
    with pytest.raises(ValueError, match="no published layout"):
        export_state(otter, tmp_path)
    export_state(otter, tmp_path, layout="mmtrain")  # mmtrain's names always work
    gqa = idefics(overrides={"decoder": {"num_key_value_heads": 2}})
    with pytest.raises(ValueError, match="no GQA"):
        export_state(gqa, tmp_path / "gqa")


def test_bf16_export_records_its_dtype(tmp_path):
    ours = trained(idefics(seed=10))
    export_state(ours, tmp_path, dtype=torch.bfloat16)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    with SafetensorsCheckpoint(tmp_path) as checkpoint:
        assert checkpoint.read("lm_head.weight").dtype == torch.bfloat16
        assert torch.equal(checkpoint.read("lm_head.weight"), ours.lm_head.weight.to(torch.bfloat16))
