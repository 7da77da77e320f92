"""Interleaved documents, pairs, IDEFICS and Fuyu layouts: ids, labels and images, on decoded strings."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from mmtrain.data.batching import Layout, collate
from mmtrain.data.documents import build_document, build_pair
from mmtrain.data.episodes import IGNORE_INDEX, build_sample
from mmtrain.data.formats import BadSample
from mmtrain.data.images import ImageSpec, decode_image
from mmtrain.data.patches import PatchSpec, image_to_patches, place_patches, scaled_size
from mmtrain.data.tokenizer import TokenIds, load_tokenizer, train_tiny_tokenizer

DOC = {"id": "d1", "parts": [{"text": "A cat."}, {"image": "0.jpg"}, {"text": "It sleeps."}, {"image": "1.jpg"},
                             {"text": "On a mat."}]}


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return train_tiny_tokenizer(str(tmp_path_factory.mktemp("tok")))


def tokenizer_and_ids(tok_dir, template):
    tok = load_tokenizer(tok_dir, template)
    return tok, TokenIds.from_tokenizer(tok, template)


def text(tok, ids):
    return tok.decode([i for i in ids if i != IGNORE_INDEX], skip_special_tokens=False)


def targets(tok, sample):
    """Decoded target runs, one string per contiguous stretch of labels."""
    runs, run = [], []
    for t in sample.labels + [IGNORE_INDEX]:
        if t == IGNORE_INDEX:
            if run:
                runs.append(tok.decode(run, skip_special_tokens=False))
            run = []
        else:
            run.append(t)
    return runs


def jpeg(size, color=(200, 30, 30)):
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="JPEG", quality=90)
    return out.getvalue()


def test_flamingo_rule_places_endofchunk_and_masks_as_openflamingo(tok_dir):
    tok, ids = tokenizer_and_ids(tok_dir, "simple")
    s = build_document(DOC, tok, ids, template="simple", max_seq_tokens=200, max_images=5, members={"0.jpg": 0, "1.jpg": 1})
    assert text(tok, s.input_ids) == "<s>A cat.<image>It sleeps.<|endofchunk|><image>On a mat.<|endofchunk|></s>"
    # Targets: from after each <image> through its <|endofchunk|>; the text before the first image,
    # the <image> tokens and the final eos (after the last <|endofchunk|>) are masked.
    assert targets(tok, s) == ["It sleeps.<|endofchunk|>", "On a mat.<|endofchunk|>"]
    assert s.images == [0, 1] and s.image_names == ["0.jpg", "1.jpg"]


def test_max_images_cuts_the_document_before_the_next_image(tok_dir):
    tok, ids = tokenizer_and_ids(tok_dir, "simple")
    s = build_document(DOC, tok, ids, template="simple", max_seq_tokens=200, max_images=1, members={"0.jpg": 0, "1.jpg": 1})
    assert text(tok, s.input_ids) == "<s>A cat.<image>It sleeps.<|endofchunk|></s>"
    assert s.images == [0]


def test_long_document_is_cut_and_drops_the_images_it_loses(tok_dir):
    tok, ids = tokenizer_and_ids(tok_dir, "simple")
    full = build_document(DOC, tok, ids, template="simple", max_seq_tokens=200, max_images=5)
    second_image = full.input_ids.index(ids.image, full.input_ids.index(ids.image) + 1)
    s = build_document(DOC, tok, ids, template="simple", max_seq_tokens=second_image, max_images=5)
    assert len(s.input_ids) == second_image and s.input_ids[-1] == ids.eos
    assert s.input_ids.count(ids.image) == len(s.image_names) == 1


@pytest.mark.parametrize("record,reason", [
    ({"parts": [{"text": "no pictures here"}]}, "no_image"),
    ({"parts": [{"image": "0.jpg"}, {"text": "   "}]}, "empty_text"),
    ({"parts": [{"image": f"{i}.jpg"} for i in range(1000)] + [{"text": "gallery"}]}, "too_many_images"),
    ({"parts": [{"text": "a", "image": "0.jpg"}]}, "bad_record"),
    ({"parts": "nope"}, "bad_record"),
])
def test_bad_documents_raise_their_reason(tok_dir, record, reason):
    tok, ids = tokenizer_and_ids(tok_dir, "simple")
    with pytest.raises(BadSample) as e:
        build_document(record, tok, ids, template="simple", max_seq_tokens=64, max_images=5)
    assert e.value.reason == reason


def test_idefics_layout_shares_fake_tokens_and_trains_text_only(tok_dir):
    tok, ids = tokenizer_and_ids(tok_dir, "idefics")
    doc = {"parts": [{"text": "Two views."}, {"image": "0.jpg"}, {"image": "1.jpg"}, {"text": "Both red."}]}
    s = build_document(doc, tok, ids, template="idefics", max_seq_tokens=200, max_images=5)
    fake = "<fake_token_around_image>"
    assert text(tok, s.input_ids) == f"<s>Two views.{fake}<image>{fake}<image>{fake}Both red.</s>"
    assert targets(tok, s) == ["Two views.", "Both red.</s>"]


def test_idefics_episode_template(tok_dir):
    tok, ids = tokenizer_and_ids(tok_dir, "idefics")
    rec = {"turns": [{"instruction": "Color?", "answer": "Red.", "images": ["0.jpg"]}]}
    s = build_sample(rec, tok, ids, template="idefics", max_seq_tokens=200, max_images=5)
    fake = "<fake_token_around_image>"
    assert text(tok, s.input_ids) == (f"<s>User:{fake}<image>{fake}Color?<end_of_utterance>\nAssistant:<answer>"
                                      "Red.<end_of_utterance>\n</s>")
    assert targets(tok, s) == ["Red.<end_of_utterance>", "</s>"]


def test_pairs_are_one_image_documents(tok_dir):
    tok, ids = tokenizer_and_ids(tok_dir, "simple")
    members = {"jpg": b"x", "txt": b" a red square \n", "json": b"{}"}
    s = build_pair(members, tok, ids, template="simple", max_seq_tokens=64, sample_id="p0")
    assert text(tok, s.input_ids) == "<s><image>a red square<|endofchunk|></s>"
    assert targets(tok, s) == ["a red square<|endofchunk|>"] and s.images == [b"x"]
    for bad, reason in (({"txt": b"x"}, "missing_image"), ({"jpg": b"x"}, "missing_caption"),
                        ({"jpg": b"x", "txt": b"  "}, "empty_text"), ({"jpg": b"x", "txt": b"\xff\xfe"}, "bad_caption")):
        with pytest.raises(BadSample) as e:
            build_pair(bad, tok, ids, template="simple", max_seq_tokens=64, sample_id="p1")
        assert e.value.reason == reason


def test_video_frames_are_resampled_evenly(tok_dir):
    tok, ids = tokenizer_and_ids(tok_dir, "simple")
    frames = [f"f{i}.jpg" for i in range(20)]
    rec = {"turns": [{"instruction": "What happens?", "answer": "It runs.", "frames": frames}]}
    s = build_sample(rec, tok, ids, template="simple", max_seq_tokens=200, max_images=8, max_frames=4)
    assert s.image_names == ["f0.jpg", "f6.jpg", "f13.jpg", "f19.jpg"]
    assert s.input_ids.count(ids.image) == 4


# --- Fuyu -----------------------------------------------------------------------------------


def test_fuyu_scaling_bounds():
    spec = PatchSpec(patch_px=30, min_px=448, max_px=1024)
    assert scaled_size(2048, 1024, spec) == (1024, 512)
    assert scaled_size(200, 100, spec) == (448, 224)
    assert scaled_size(600, 500, spec) == (600, 500)


def test_fuyu_patches_match_transformers_patchify_and_pad_white():
    from transformers.models.fuyu.image_processing_fuyu import FuyuImageProcessor

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (70, 95, 3), dtype=np.uint8)
    png = io.BytesIO()
    Image.fromarray(pixels).save(png, format="PNG")
    spec = PatchSpec(patch_px=30, min_px=30, max_px=200)
    grid = image_to_patches(png.getvalue(), spec)
    assert grid.shape == (3, 4, 2700)
    canvas = np.full((90, 120, 3), 255, np.uint8)
    canvas[:70, :95] = pixels
    theirs = FuyuImageProcessor().patchify_image(torch.from_numpy(canvas).permute(2, 0, 1)[None].float())
    np.testing.assert_array_equal(grid.reshape(12, 2700), theirs[0].numpy().astype(np.uint8))


def test_fuyu_sample_puts_patch_rows_before_bos_and_trains_the_answer(tok_dir):
    tok, ids = tokenizer_and_ids(tok_dir, "fuyu")
    rec = {"turns": [{"instruction": "Color?", "answer": "Red.", "images": ["0.jpg"]}]}
    s = build_sample(rec, tok, ids, template="fuyu", max_seq_tokens=400, max_images=1,
                     members={"0.jpg": jpeg((64, 40))})
    grid = image_to_patches(s.images[0], PatchSpec(patch_px=30, min_px=60, max_px=64))
    s = place_patches(s, [grid], ids, max_seq_tokens=400)
    rows, cols = 2, 3  # 64x40 -> 3 x 2 patches of 30 px
    assert grid.shape[:2] == (rows, cols)
    grid_text = ("|SPEAKER|" * cols + "|NEWLINE|") * rows
    assert text(tok, s.input_ids) == grid_text + "<s>User:Color? Assistant:\x04 Red.</s>"
    assert targets(tok, s) == [" Red.</s>"]
    batch = collate([[s]], Layout(400, 1, ids.pad, patch_dim=2700, image_token_id=ids.image))
    assert batch["image_patches"].shape == (1, rows * cols, 2700) and batch["image_patches"].dtype == torch.uint8
    idx = batch["image_patch_indices"][0]
    assert idx[: cols].tolist() == list(range(cols)) and idx[cols] == -1 and idx[cols + 1] == cols
    assert (idx >= 0).sum() == rows * cols


def test_huge_image_is_skipped_from_its_header():
    big = io.BytesIO()
    Image.new("L", (20000, 20000)).save(big, format="PNG")  # compresses to a few hundred kB
    with pytest.raises(BadSample) as e:
        decode_image(big.getvalue(), ImageSpec(size_px=8))
    assert e.value.reason == "image_too_large"
    with pytest.raises(BadSample) as e:
        image_to_patches(big.getvalue(), PatchSpec())
    assert e.value.reason == "image_too_large"
