"""Property-based fuzzing (hypothesis) of the sample builders, image decoding and the packer.

Arbitrary records -- valid ones, broken ones (wrong types, missing keys, empty lists), text holding
special-token strings and odd unicode, huge image counts, video frames -- and image bytes (valid tiny
images of many modes and formats, garbage, truncated and bit-flipped files) go through build_sample,
build_prompt, build_document, build_pair, decode_image, image_to_patches and place_patches; random
samples go through Packer and collate. Every builder must either return a well-formed sample or raise
BadSample, never another exception; what a well-formed sample is, is checked against independent
oracles (the rendered text, the Otter / OpenFlamingo / IDEFICS label rules, the special-id counts).

Deterministic in CI: every test runs under `FUZZ` (derandomize=True, no example database); no global
hypothesis profile is loaded or changed.
"""

from __future__ import annotations

import io
import math
from collections import Counter
from typing import Any, Dict, List, Mapping, Optional

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from mmtrain.data.batching import Layout, Packer
from mmtrain.data.documents import build_document, build_pair
from mmtrain.data.episodes import IGNORE_INDEX, Sample, build_prompt, build_sample, render_text
from mmtrain.data.formats import PAIR_IMAGE_EXTENSIONS, BadSample, FormatError, validate_document, validate_episode
from mmtrain.data.images import ImageSpec, decode_image
from mmtrain.data.patches import PatchSpec, image_to_patches, place_patches, scaled_size
from mmtrain.data.tokenizer import TokenIds, load_tokenizer, train_tiny_tokenizer

FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=40,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


def fuzz(max_examples: int) -> settings:
    return settings(FUZZ, max_examples=max_examples)


TEMPLATES = ("simple", "llama2", "idefics", "fuyu")
# Every reason a builder may give; a new one must be added here (and to BadSample's docstring) on purpose.
KNOWN_REASONS = {
    "bad_record", "missing_image", "bad_image", "image_too_large", "too_long", "too_many_images",
    "special_token_in_text", "image_count_mismatch", "unsupported", "no_image", "empty_text",
    "missing_caption", "bad_caption",
}


# ------------------------------------------------------------------------------------------ set-up


class _Toks(dict):
    def __repr__(self) -> str:  # keeps hypothesis' falsifying-example reports short
        return "<tiny tokenizers>"


@pytest.fixture(scope="module")
def toks(tmp_path_factory) -> Dict[str, Any]:
    """template -> (tokenizer, TokenIds): one tiny byte-level BPE, trained once for the module."""
    path = train_tiny_tokenizer(str(tmp_path_factory.mktemp("fuzz_tok")))
    out = _Toks()
    for template in TEMPLATES:
        tok = load_tokenizer(path, template)
        out[template] = (tok, TokenIds.from_tokenizer(tok, template))
    return out


def decode(tok, ids) -> str:
    return tok.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def call(fn, *args, **kwargs):
    """(result, None) or (None, BadSample); any other exception fails the test."""
    try:
        out = fn(*args, **kwargs)
    except BadSample as e:
        assert e.reason in KNOWN_REASONS, f"unknown BadSample reason {e.reason!r}: {e}"
        event(f"{fn.__name__}: BadSample {e.reason}")
        return None, e
    event(f"{fn.__name__}: ok")
    return out, None


def check_labels(sample) -> None:
    """labels: same length, each -100 or the id at its position, never on the first token."""
    assert len(sample.labels) == len(sample.input_ids)
    assert all(y == IGNORE_INDEX or y == t for t, y in zip(sample.input_ids, sample.labels))
    if sample.labels:
        assert sample.labels[0] == IGNORE_INDEX


def special_counts(ids: TokenIds, input_ids) -> Counter:
    specials = ids.special_ids()
    return Counter(t for t in input_ids if t in specials)


def expect_specials(ids: TokenIds, input_ids, **expected: int) -> None:
    """The special ids of the sequence are exactly `expected` (field name -> count); none from text."""
    want = Counter()
    for name, n in expected.items():
        if n:
            want[getattr(ids, name)] += n
    assert special_counts(ids, input_ids) == want


def targets(tok, sample) -> str:
    return decode(tok, [y for y in sample.labels if y != IGNORE_INDEX])


# -------------------------------------------------------------------------------------- strategies

SPECIAL_STRINGS = [
    "<image>", "<|endofchunk|>", "<answer>", "<s>", "</s>", "<pad>", "<unk>", "<fake_token_around_image>",
    "<end_of_utterance>", "|SPEAKER|", "|NEWLINE|", "\x04", "[INST]", "[/INST]", "User:", " GPT:", "Assistant:",
    "<image", "image>", "<|", "|>", "<<image>>", "<im<image>age>",
]
WORDS = ["red", " square", "two circles", "?", ".", " ", "   ", "\n", "\t", "\r\n", "é", "日本語", "🙂",
         "\u200b", "\x00", "Ġ", "ĊĠ", "\ufeff", "e\u0301", "\U0010ffff"]
fragments = st.one_of(st.sampled_from(SPECIAL_STRINGS), st.sampled_from(WORDS), st.text(max_size=6))
texts = st.lists(fragments, max_size=5).map("".join)
image_names = st.one_of(st.sampled_from([f"{i}.jpg" for i in range(6)] + ["0.png", "x.webp", "", "<image>"]),
                        st.text(max_size=4))
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=False, width=16), texts)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.sampled_from(["turns", "parts", "instruction", "answer", "images", "frames", "text", "image",
                                       "id"]) | st.text(max_size=3), inner, max_size=4),
    max_leaves=8,
)
# Small budgets (truncation, too_long) and roomy ones (whole episodes kept).
SEQ_BUDGETS = st.integers(0, 3).flatmap(lambda k: st.integers(1, 48) if k == 0 else st.integers(48, 600))
not_a_list = st.one_of(st.none(), st.integers(), texts, st.dictionaries(st.text(max_size=2), st.integers(), max_size=2))
not_a_str = st.one_of(st.none(), st.integers(), st.floats(allow_nan=False), st.lists(texts, max_size=2),
                      st.dictionaries(st.text(max_size=2), texts, max_size=2))


@st.composite
def episode_turns(draw, huge: bool = False) -> Dict[str, Any]:
    turn: Dict[str, Any] = {"instruction": draw(texts), "answer": draw(texts)}
    if draw(st.booleans()):
        turn["images"] = draw(st.lists(image_names, max_size=4))
    if draw(st.integers(0, 3)) == 0:  # a video: unique frame names so resampling can be checked
        n = draw(st.integers(0, 40))
        turn["frames"] = [f"f{i}.jpg" for i in range(n)]
    if huge and draw(st.booleans()):
        turn["images"] = [f"{i % 3}.jpg" for i in range(draw(st.integers(50, 3000)))]
    if huge and draw(st.booleans()):
        turn["frames"] = [f"f{i}.jpg" for i in range(draw(st.integers(100, 5000)))]
    if draw(st.integers(0, 4)) == 0:
        turn["note"] = draw(json_values)  # unknown keys are ignored
    return turn


@st.composite
def valid_episodes(draw) -> Dict[str, Any]:
    huge = draw(st.integers(0, 6)) == 0
    record: Dict[str, Any] = {"turns": draw(st.lists(episode_turns(huge=huge), min_size=1, max_size=4))}
    if draw(st.booleans()):
        record["id"] = draw(st.one_of(texts, st.integers()))
    if draw(st.booleans()):
        record["source"] = draw(texts)
    return record


@st.composite
def broken_episodes(draw) -> Any:
    """A record validate_episode must reject (so the builders must give bad_record)."""
    record = draw(valid_episodes())
    turns = record["turns"]
    i = draw(st.integers(0, len(turns) - 1))
    kind = draw(st.sampled_from(["record", "no_turns", "turns_type", "empty_turns", "turn_type", "missing_field",
                                 "field_type", "members_type", "member_type"]))
    if kind == "record":
        return draw(st.one_of(st.lists(json_values, max_size=2), not_a_str.filter(lambda v: not isinstance(v, dict))))
    if kind == "no_turns":
        del record["turns"]
    elif kind == "turns_type":
        record["turns"] = draw(not_a_list)
    elif kind == "empty_turns":
        record["turns"] = []
    elif kind == "turn_type":
        turns[i] = draw(st.one_of(not_a_str.filter(lambda v: not isinstance(v, dict)), st.lists(texts, max_size=2)))
    elif kind == "missing_field":
        del turns[i][draw(st.sampled_from(["instruction", "answer"]))]
    elif kind == "field_type":
        turns[i][draw(st.sampled_from(["instruction", "answer"]))] = draw(not_a_str)
    elif kind == "members_type":
        turns[i][draw(st.sampled_from(["images", "frames"]))] = draw(not_a_list)
    else:
        good = draw(st.lists(image_names, max_size=2))
        turns[i][draw(st.sampled_from(["images", "frames"]))] = good + [draw(not_a_str)]
    return record


@st.composite
def members_for(draw, names: List[str]) -> Optional[Dict[str, bytes]]:
    """None (no images attached), every named member, or all but some of them."""
    mode = draw(st.sampled_from(["none", "all", "all", "some"]))
    if mode == "none":
        return None
    members = {name: b"bytes of " + name.encode("utf-8", "surrogatepass") for name in set(names)}
    if mode == "some" and members:
        for name in draw(st.lists(st.sampled_from(sorted(members)), max_size=2)):
            members.pop(name, None)
    members["json"] = b"{}"
    return members


def rendered_turn(turn: Mapping, max_frames: int) -> Dict[str, Any]:
    """The turn as render_text must see it: only the number of images matters."""
    n = len(turn.get("images", [])) + min(len(turn.get("frames", [])), max_frames)
    return {"instruction": turn["instruction"], "answer": turn["answer"], "images": ["x"] * n}


def is_subsequence(small: List[str], big: List[str]) -> bool:
    it = iter(big)
    return all(any(x == y for y in it) for x in small)


# -------------------------------------------------------------------------------- episodes: sample


def check_episode_sample(s: Sample, record, tok, ids: TokenIds, template: str, max_seq: int, max_images: int,
                         max_frames: int, members) -> None:
    turns = record["turns"]
    kept = turns[s.num_dropped_turns:]
    assert s.num_turns == len(kept) >= 1 and s.num_dropped_turns + s.num_turns == len(turns)
    assert len(s.input_ids) == len(s.labels) <= max_seq
    assert s.input_ids[0] == ids.bos and s.input_ids[-1] == ids.eos
    check_labels(s)

    # Image order: each kept turn's stills, then its frames resampled to at most max_frames (evenly: the first
    # and, from two frames on, the last kept; in order, no repeats). Fuyu takes the first image only.
    per_turn = [len(t.get("images", [])) + min(len(t.get("frames", [])), max_frames) for t in kept]
    flat = [n for t in kept for n in list(t.get("images", [])) + list(t.get("frames", []))]
    if template == "fuyu":
        assert s.image_names == flat[:1]
    else:
        assert s.input_ids.count(ids.image) == len(s.image_names) == sum(per_turn) <= max_images
        got = list(s.image_names)
        for turn in kept:
            stills, frames = list(turn.get("images", [])), list(turn.get("frames", []))
            n_frames = min(len(frames), max_frames)
            assert got[: len(stills)] == stills
            turn_frames, got = got[len(stills): len(stills) + n_frames], got[len(stills) + n_frames:]
            assert is_subsequence(turn_frames, frames) and len(set(turn_frames)) == n_frames
            if n_frames:
                assert turn_frames[0] == frames[0]
            if n_frames >= 2:
                assert turn_frames[-1] == frames[-1]
        assert got == []
    if members is None:
        assert s.images == []
    else:
        assert s.images == [members[n] for n in s.image_names]

    # The special ids are exactly the template's: text never forges one (literal "<image>" stays text).
    k = len(kept)
    if template in ("simple", "llama2"):
        expect_specials(ids, s.input_ids, bos=1, eos=1, image=sum(per_turn), answer=k, end_of_chunk=k)
    elif template == "idefics":
        expect_specials(ids, s.input_ids, bos=1, eos=1, image=sum(per_turn), answer=k, end_of_utterance=2 * k,
                        fake_image=sum(n + 1 for n in per_turn if n))
    else:
        expect_specials(ids, s.input_ids, bos=1, eos=1)

    # Decoding gives the rendered text; the targets are Otter's (OtterHD's for Fuyu).
    shown = {"turns": [rendered_turn(t, max_frames) for t in kept]}
    text = render_text(shown, template)
    assert decode(tok, s.input_ids) == text
    if template in ("simple", "llama2"):
        assert targets(tok, s) == "".join(t["answer"] + "<|endofchunk|>" for t in kept) + "</s>"
    elif template == "idefics":
        assert targets(tok, s) == "".join(t["answer"] + "<end_of_utterance>" for t in kept) + "</s>"
    else:  # OtterHD: the target turn's answer (after its \x04 marker) and the eos, even with \x04 inside it
        assert targets(tok, s) == " " + kept[-1]["answer"] + "</s>"


@fuzz(60)
@given(data=st.data())
@pytest.mark.parametrize("template", TEMPLATES)
def test_build_sample_valid_episodes(toks, template, data):
    tok, ids = toks[template]
    record = data.draw(valid_episodes(), "record")
    max_seq = data.draw(SEQ_BUDGETS, "max_seq_tokens")
    max_images = data.draw(st.integers(1, 8), "max_images")
    max_frames = data.draw(st.integers(1, 10), "max_frames")
    all_names = [n for t in record["turns"] for n in list(t.get("images", [])) + list(t.get("frames", []))]
    members = data.draw(members_for(all_names), "members")
    s, err = call(build_sample, record, tok, ids, template=template, max_seq_tokens=max_seq, max_images=max_images,
                  max_frames=max_frames, members=members)
    if err is not None:
        assert err.reason in ("too_long", "too_many_images", "missing_image"), err
        if err.reason == "missing_image":
            assert members is not None and any(n not in members for n in all_names)
        if err.reason == "too_many_images":
            target = record["turns"][-1]
            assert len(target.get("images", [])) + min(len(target.get("frames", [])), max_frames) > max_images
        return
    check_episode_sample(s, record, tok, ids, template, max_seq, max_images, max_frames, members)
    assert s.sample_id == (str(record.get("id", "")))
    if s.num_dropped_turns:  # whole turns dropped, oldest first, only as many as needed
        wider = {"turns": record["turns"][s.num_dropped_turns - 1:]}
        longer = build_sample(wider, tok, ids, template=template, max_seq_tokens=max_seq, max_images=max_images,
                              max_frames=max_frames)
        assert longer.num_dropped_turns == 1


@fuzz(40)
@given(data=st.data())
@pytest.mark.parametrize("template", TEMPLATES)
def test_build_sample_and_prompt_reject_broken_records(toks, template, data):
    tok, ids = toks[template]
    record = data.draw(st.one_of(broken_episodes(), json_values), "record")
    max_seq = data.draw(st.integers(1, 160), "max_seq_tokens")
    try:
        validate_episode(record, "fuzz")
        valid = True
    except FormatError:
        valid = False
    for build in (build_sample, build_prompt):
        out, err = call(build, record, tok, ids, template=template, max_seq_tokens=max_seq, max_images=4)
        if not valid:
            assert err is not None and err.reason == "bad_record", (build.__name__, err)
        elif err is not None:
            assert err.reason in ("too_long", "too_many_images"), err


# -------------------------------------------------------------------------------- episodes: prompt


@fuzz(40)
@given(data=st.data())
@pytest.mark.parametrize("template", TEMPLATES)
def test_build_prompt_is_the_training_prefix(toks, template, data):
    tok, ids = toks[template]
    record = data.draw(valid_episodes(), "record")
    max_seq = data.draw(SEQ_BUDGETS, "max_seq_tokens")
    max_images = data.draw(st.integers(1, 8), "max_images")
    p, err = call(build_prompt, record, tok, ids, template=template, max_seq_tokens=max_seq, max_images=max_images)
    if err is not None:
        assert err.reason in ("too_long", "too_many_images"), err
        return
    kept = record["turns"][p.num_dropped_turns:]
    assert len(p.input_ids) <= max_seq and p.input_ids[0] == ids.bos
    assert p.answer == record["turns"][-1]["answer"]
    if template == "fuyu":
        assert p.input_ids[-1] == tok("\x04", add_special_tokens=False)["input_ids"][-1]
        assert ids.image not in p.input_ids
    else:
        assert p.input_ids[-1] == ids.answer
        assert p.input_ids.count(ids.image) == len(p.image_names) <= max_images
    assert ids.eos not in p.input_ids
    assert decode(tok, p.input_ids) == render_text({"turns": [rendered_turn(t, 8) for t in kept]}, template, prompt=True)
    s, err = call(build_sample, record, tok, ids, template=template, max_seq_tokens=max_seq, max_images=max_images)
    if s is not None and s.num_dropped_turns == p.num_dropped_turns:
        assert s.input_ids[: len(p.input_ids)] == p.input_ids
        assert s.image_names == p.image_names


# ------------------------------------------------------------------------------------- documents


@st.composite
def valid_documents(draw) -> Dict[str, Any]:
    n = draw(st.integers(1, 10))
    parts = []
    for _ in range(n):
        if draw(st.booleans()):
            parts.append({"image": draw(image_names)})
        else:
            parts.append({"text": draw(st.one_of(texts, st.sampled_from(["", " ", "\n\t "])))})
    if draw(st.integers(0, 12)) == 0:  # a gallery
        parts += [{"image": f"{i}.jpg"} for i in range(draw(st.integers(30, 400)))]
        parts.append({"text": "caption"})
    record: Dict[str, Any] = {"parts": parts}
    if draw(st.booleans()):
        record["id"] = draw(texts)
    if draw(st.booleans()):
        record["meta"] = draw(json_values)
    return record


@st.composite
def broken_documents(draw) -> Any:
    record = draw(valid_documents())
    parts = record["parts"]
    i = draw(st.integers(0, len(parts) - 1))
    kind = draw(st.sampled_from(["record", "no_parts", "parts_type", "empty_parts", "part_type", "two_keys", "no_keys",
                                 "bad_key", "value_type"]))
    if kind == "record":
        return draw(st.one_of(st.lists(json_values, max_size=2), not_a_str.filter(lambda v: not isinstance(v, dict))))
    if kind == "no_parts":
        del record["parts"]
    elif kind == "parts_type":
        record["parts"] = draw(not_a_list)
    elif kind == "empty_parts":
        record["parts"] = []
    elif kind == "part_type":
        parts[i] = draw(not_a_str.filter(lambda v: not isinstance(v, dict)))
    elif kind == "two_keys":
        parts[i] = {"text": draw(texts), "image": draw(image_names)}
    elif kind == "no_keys":
        parts[i] = {}
    elif kind == "bad_key":
        parts[i] = {draw(st.sampled_from(["Text", "img", "images", "caption", ""])): draw(texts)}
    else:
        parts[i] = {draw(st.sampled_from(["text", "image"])): draw(not_a_str)}
    return record


def flamingo_text(parts) -> str:
    out, seen, previous_text = "<s>", False, False
    for part in parts:
        if "image" in part:
            out += ("<|endofchunk|>" if seen else "") + "<image>"
            seen, previous_text = True, False
        else:
            out += (" " if previous_text else "") + part["text"]
            previous_text = True
    return out + "<|endofchunk|></s>"


def idefics_text(parts) -> str:
    out, previous = "<s>", None
    for part in parts:
        if "image" in part:
            out += ("" if previous == "image" else "<fake_token_around_image>") + "<image><fake_token_around_image>"
            previous = "image"
        else:
            out += (" " if previous == "text" else "") + part["text"]
            previous = "text"
    return out + "</s>"


def expected_document_failure(record, template: str, max_doc_images: int, max_images: int) -> Optional[str]:
    try:
        validate_document(record, "fuzz")
    except FormatError:
        return "bad_record"
    if template == "fuyu":
        return "unsupported"
    parts = [p for p in record["parts"] if "image" in p or p["text"].strip()]
    n = sum("image" in p for p in parts)
    if n == 0:
        return "no_image"
    if n > max_doc_images:
        return "too_many_images"
    if n == len(parts) or all("image" in p for p in kept_parts(record, max_images)):
        return "empty_text"  # no text at all, or none before the cut at max_images
    return None


def kept_parts(record, max_images: int):
    kept, count = [], 0
    for part in record["parts"]:
        if "text" in part and not part["text"].strip():
            continue
        if "image" in part:
            if count == max_images:
                break
            count += 1
        kept.append(part)
    return kept


@fuzz(70)
@given(data=st.data())
@pytest.mark.parametrize("template", TEMPLATES)
def test_build_document(toks, template, data):
    tok, ids = toks[template]
    record = data.draw(st.one_of(valid_documents(), valid_documents(), valid_documents(), broken_documents(),
                                 json_values), "record")
    max_seq = data.draw(SEQ_BUDGETS, "max_seq_tokens")
    max_images = data.draw(st.integers(1, 6), "max_images")
    max_doc_images = data.draw(st.sampled_from([2, 8, 64, 64]), "max_doc_images")
    names = [p["image"] for p in record.get("parts", []) if isinstance(p, dict) and isinstance(p.get("image"), str)] \
        if isinstance(record, dict) and isinstance(record.get("parts"), list) else []
    members = data.draw(members_for(names), "members")
    kwargs = dict(template=template, max_seq_tokens=max_seq, max_images=max_images, max_doc_images=max_doc_images)
    s, err = call(build_document, record, tok, ids, members=members, **kwargs)
    expected = expected_document_failure(record, template, max_doc_images, max_images)
    if expected is not None:
        assert err is not None and err.reason == expected, (expected, err)
        return
    full, _ = call(build_document, record, tok, ids, **{**kwargs, "max_seq_tokens": 10**9})
    assert full is not None
    if err is not None:
        assert err.reason in ("too_long", "missing_image"), err
        if err.reason == "too_long":  # no <image> survives the cut (the eos takes the last slot)
            assert full.input_ids.index(ids.image) >= max_seq - 1
        else:
            assert members is not None and any(n not in members for n in full.image_names)
        return

    # Shape of the sequence; the image names are the first kept images in document order.
    assert len(s.input_ids) == len(s.labels) <= max_seq
    assert s.input_ids[0] == ids.bos and s.input_ids[-1] == ids.eos
    check_labels(s)
    kept = kept_parts(record, max_images)
    doc_names = [p["image"] for p in kept if "image" in p]
    assert 1 <= len(s.image_names) == s.input_ids.count(ids.image) <= max_images
    assert s.image_names == doc_names[: len(s.image_names)]
    assert s.images == ([] if members is None else [members[n] for n in s.image_names])

    # Uncut: the full rendering; cut: a prefix of the full ids plus eos.
    if len(full.input_ids) <= max_seq:
        assert s.input_ids == full.input_ids
    else:
        assert len(s.input_ids) == max_seq and s.input_ids[:-1] == full.input_ids[: max_seq - 1]
    assert full.image_names == doc_names
    if template == "idefics":
        assert decode(tok, full.input_ids) == idefics_text(kept)
        runs = sum(1 for i, p in enumerate(kept) if "image" in p and (i == 0 or "image" not in kept[i - 1]))
        expect_specials(ids, full.input_ids, bos=1, eos=1, image=len(doc_names), fake_image=len(doc_names) + runs)
    else:
        assert decode(tok, full.input_ids) == flamingo_text(kept)
        expect_specials(ids, full.input_ids, bos=1, eos=1, image=len(doc_names), end_of_chunk=len(doc_names))
    allowed = {ids.bos, ids.eos, ids.image, ids.end_of_chunk if template != "idefics" else ids.fake_image}
    assert set(special_counts(ids, s.input_ids)) <= allowed
    assert s.input_ids.count(ids.bos) == 1 and s.input_ids.count(ids.eos) == 1

    # Label rules, checked position by position.
    for i, (t, y) in enumerate(zip(s.input_ids, s.labels)):
        if template == "idefics":
            want = i > 0 and t not in (ids.image, ids.fake_image)
        else:  # trained iff the latest <image>/<|endofchunk|> before it is an <image>; never the final eos
            last = next((u for u in reversed(s.input_ids[:i]) if u in (ids.image, ids.end_of_chunk)), None)
            want = t != ids.image and last == ids.image and i < len(s.input_ids) - 1
        assert (y == t) == want, (i, t, y)
    if template != "idefics":
        assert all(y == t for t, y in zip(s.input_ids, s.labels) if t == ids.end_of_chunk)
        assert full.labels[-1] == IGNORE_INDEX  # the final eos after <|endofchunk|> is no target


# ----------------------------------------------------------------------------------------- pairs


@st.composite
def pair_members(draw) -> Dict[str, Any]:
    exts = draw(st.sets(st.sampled_from(["jpg", "jpeg", "png", "webp", "gif", "json"])))
    if draw(st.integers(0, 3)):
        exts.add(draw(st.sampled_from(PAIR_IMAGE_EXTENSIONS)))
    members: Dict[str, Any] = {ext: b"image " + ext.encode() for ext in exts}
    if draw(st.integers(0, 5)):
        members["txt"] = draw(st.one_of(texts.map(lambda t: t.encode("utf-8")), texts.map(lambda t: t.encode("utf-8")),
                                        st.binary(max_size=24), texts, st.sampled_from([b"", b"  \n", b"\xff\xfe"])))
    return members


@fuzz(60)
@given(members=pair_members(), max_seq=st.one_of(st.integers(1, 6), SEQ_BUDGETS))
@pytest.mark.parametrize("template", TEMPLATES)
def test_build_pair(toks, template, members, max_seq):
    tok, ids = toks[template]
    s, err = call(build_pair, members, tok, ids, template=template, max_seq_tokens=max_seq, sample_id="000000042")
    image = next((e for e in PAIR_IMAGE_EXTENSIONS if e in members), None)
    raw = members.get("txt")
    caption = None
    if image is None:
        expected = "missing_image"
    elif raw is None:
        expected = "missing_caption"
    else:
        try:
            caption = (raw.decode("utf-8") if isinstance(raw, bytes) else raw).strip()
            expected = None if caption else "empty_text"
        except UnicodeDecodeError:
            expected = "bad_caption"
    if expected is not None:
        assert err is not None and err.reason == expected, (expected, err)
        return
    if err is not None:  # the cut left no <image>
        assert template != "fuyu" and err.reason == "too_long", err
        assert max_seq < (4 if template == "idefics" else 3)  # <s>[<fake>]<image> does not fit before the eos
        return
    assert len(s.input_ids) == len(s.labels) <= max_seq
    assert s.input_ids[-1] == ids.eos
    check_labels(s)
    assert s.image_names == [image] and s.images == [members[image]]
    if template == "fuyu":
        if max_seq >= 2:
            assert s.input_ids[0] == ids.bos
        assert ids.image not in s.input_ids
        full = "<s>" + caption + "</s>"
        assert s.labels[1:] == s.input_ids[1:]
    else:
        assert s.input_ids[0] == ids.bos
        assert s.input_ids.count(ids.image) == 1
        full = ("<s><fake_token_around_image><image><fake_token_around_image>" + caption + "</s>" if template == "idefics"
                else "<s><image>" + caption + "<|endofchunk|></s>")
    full_ids, _ = call(build_pair, members, tok, ids, template=template, max_seq_tokens=10**9, sample_id="k")
    assert decode(tok, full_ids.input_ids) == full
    assert s.input_ids[:-1] == full_ids.input_ids[: len(s.input_ids) - 1]


# ---------------------------------------------------------------------------------------- images

MODES = ["RGB", "L", "LA", "RGBA", "P", "1", "I", "I;16", "F", "CMYK", "YCbCr"]
FORMATS = ["PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF", "PPM"]


def image_bytes(mode: str, fmt: str, width: int, height: int, seed: int) -> Optional[bytes]:
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")
    try:
        img = rgb.convert("L").convert(mode) if mode == "I;16" else rgb.convert(mode)
        if mode == "P" and seed % 2:
            img.info["transparency"] = 0
        out = io.BytesIO()
        img.save(out, format=fmt)
        return out.getvalue()
    except (OSError, ValueError, KeyError, TypeError):
        return None  # this format cannot hold this mode


# The (mode, format) pairs this Pillow can write.
MODE_FORMATS = [(m, f) for m in MODES for f in FORMATS if image_bytes(m, f, 3, 2, 1) is not None]


@st.composite
def valid_images(draw):
    mode, fmt = draw(st.sampled_from(MODE_FORMATS))
    width, height = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    data = image_bytes(mode, fmt, width, height, draw(st.integers(0, 2**16)))
    assume(data is not None)
    return data, (width, height)


@st.composite
def any_image_bytes(draw):
    """(bytes, size or None): a valid image (size known) or broken bytes (size None)."""
    kind = draw(st.sampled_from(["valid", "valid", "garbage", "magic", "truncated", "flipped"]))
    if kind == "garbage":
        return draw(st.binary(max_size=300)), None
    if kind == "magic":
        magic = draw(st.sampled_from([b"\xff\xd8\xff\xe0", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"BM", b"RIFF\0\0\0\0WEBPVP8 ",
                                      b"II*\0", b"P6\n"]))
        return magic + draw(st.binary(max_size=200)), None
    data, size = draw(valid_images())
    if kind == "valid":
        return data, size
    if kind == "truncated":
        return data[: draw(st.integers(0, max(0, len(data) - 1)))], None
    if not data[:2] == b"\xff\xd8" and not data[:4] == b"\x89PNG":  # flip bytes of JPEGs and PNGs only
        return data[: len(data) // 2], None
    flipped = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(flipped) - 1))
        flipped[i] ^= draw(st.integers(1, 255))
    return bytes(flipped), None


@pytest.mark.filterwarnings("ignore::UserWarning:PIL")  # PIL warns about the corrupt files it is fed
@fuzz(150)
@given(image=any_image_bytes(), size_px=st.integers(1, 12))
def test_decode_image(image, size_px):
    data, size = image
    out, err = call(decode_image, data, ImageSpec(size_px=size_px))
    if err is not None:
        assert size is None, f"a valid image was refused: {err}"
        assert err.reason in ("bad_image", "image_too_large"), err
        return
    assert isinstance(out, torch.Tensor) and out.dtype == torch.uint8 and tuple(out.shape) == (3, size_px, size_px)
    assert out.is_contiguous()


@pytest.mark.filterwarnings("ignore::UserWarning:PIL")  # PIL warns about the corrupt files it is fed
@fuzz(120)
@given(image=any_image_bytes(), patch_px=st.integers(1, 8), min_px=st.integers(1, 24), extra=st.integers(0, 24))
def test_image_to_patches(image, patch_px, min_px, extra):
    data, size = image
    assume(patch_px <= min_px)
    spec = PatchSpec(patch_px=patch_px, min_px=min_px, max_px=min_px + extra)
    out, err = call(image_to_patches, data, spec)
    if err is not None:
        assert size is None, f"a valid image was refused: {err}"
        assert err.reason in ("bad_image", "image_too_large"), err
        return
    assert isinstance(out, np.ndarray) and out.dtype == np.uint8 and out.ndim == 3
    assert out.shape[2] == spec.patch_dim and out.shape[0] >= 1 and out.shape[1] >= 1
    if size is not None:
        width, height = scaled_size(*size, spec)
        assert out.shape[:2] == (math.ceil(height / patch_px), math.ceil(width / patch_px))
        assert spec.min_px <= max(width, height) <= spec.max_px or max(size) == max(width, height)
        # Padding (bottom rows / right columns beyond the scaled image) is white.
        canvas = out.reshape(out.shape[0], out.shape[1], patch_px, patch_px, 3).transpose(0, 2, 1, 3, 4)
        canvas = canvas.reshape(out.shape[0] * patch_px, out.shape[1] * patch_px, 3)
        assert (canvas[height:] == 255).all() and (canvas[:, width:] == 255).all()


@fuzz(60)
@given(data=st.data())
def test_place_patches(toks, data):
    tok, ids = toks["fuyu"]
    caption = data.draw(texts.filter(lambda t: t.strip()), "caption")
    max_seq = data.draw(st.integers(2, 120), "max_seq_tokens")
    s = build_pair({"jpg": b"x", "txt": caption.encode()}, tok, ids, template="fuyu", max_seq_tokens=max_seq,
                   sample_id="k")
    before_ids, before_labels = list(s.input_ids), list(s.labels)
    patch_dim = 12
    shapes = data.draw(st.lists(st.tuples(st.integers(1, 5), st.integers(1, 5)), max_size=2), "grids")
    grids = [np.full((r, c, patch_dim), k, dtype=np.uint8) for k, (r, c) in enumerate(shapes)]
    prefix = sum(r * (c + 1) for r, c in shapes)
    out, err = call(place_patches, s, grids, ids, max_seq)
    if err is not None:
        assert err.reason == "too_long" and prefix + len(before_ids) > max_seq
        return
    assert prefix + len(before_ids) <= max_seq
    assert out.input_ids[prefix:] == before_ids and out.labels == [IGNORE_INDEX] * prefix + before_labels
    head = out.input_ids[:prefix]
    assert head.count(ids.image) == sum(r * c for r, c in shapes) and head.count(ids.image_newline) == sum(
        r for r, _ in shapes)
    assert set(head) <= {ids.image, ids.image_newline}
    assert out.input_ids.count(ids.image) == sum(r * c for r, c in shapes)  # none from the caption
    if grids:
        assert len(out.images) == 1 and out.images[0].shape == (sum(r * c for r, c in shapes), patch_dim)
        assert out.images[0].tolist() == np.concatenate([g.reshape(-1, patch_dim) for g in grids]).tolist()
    else:
        assert out.images == []


# ----------------------------------------------------------------------------------- packing/collate

PAD, IMAGE_ID = 0, 7


@st.composite
def pack_cases(draw):
    patches = draw(st.booleans())
    max_seq = draw(st.integers(1, 48))
    max_images = draw(st.integers(1, 5))
    num_rows = draw(st.integers(1, 4))
    packing = draw(st.booleans())
    samples = []
    for k in range(draw(st.integers(1, 16))):
        n = draw(st.integers(1, max_seq))
        seed = draw(st.integers(0, 2**16))
        rng = np.random.default_rng(seed)
        input_ids = rng.integers(10, 400, n).tolist()
        if patches:
            n_patches = draw(st.integers(0, n))
            for pos in rng.choice(n, n_patches, replace=False).tolist():
                input_ids[pos] = IMAGE_ID
            images = [np.full((n_patches, 6), k + 1, dtype=np.uint8)] if n_patches else []
        else:
            images = [np.full((3, 2, 2), 16 * (k % 8) + j + 1, dtype=np.uint8)
                      for j in range(draw(st.integers(0, max_images)))]
        labels = [t if rng.random() < 0.5 else IGNORE_INDEX for t in input_ids]
        labels[0] = IGNORE_INDEX
        samples.append(Sample(sample_id=f"s{k}", input_ids=input_ids, labels=labels, image_names=[], images=images))
    layout = (Layout(max_seq_tokens=max_seq, max_images=max_images, pad_id=PAD, patch_dim=6, image_token_id=IMAGE_ID)
              if patches else Layout(max_seq_tokens=max_seq, max_images=max_images, pad_id=PAD, image_size_px=2))
    return layout, num_rows, packing, samples


@fuzz(250)
@given(case=pack_cases())
def test_packer_and_collate(case):
    layout, num_rows, packing, samples = case
    packer = Packer(num_rows, layout, packing)
    placed, refused = [], None
    # Reference first-fit, kept independently of the packer.
    ref_rows: List[List[int]] = [[] for _ in range(num_rows)]
    def fits(row: List[int], s: Sample) -> bool:
        if not row:
            return True
        if not packing:
            return False
        tokens = sum(len(samples[j].input_ids) for j in row) + len(s.input_ids)
        images = sum(len(samples[j].images) for j in row) + len(s.images)
        return tokens <= layout.max_seq_tokens and (layout.patches or images <= layout.max_images)

    for k, s in enumerate(samples):
        target = next((r for r in range(num_rows) if fits(ref_rows[r], s)), None)
        accepted = packer.offer(s)
        assert accepted == (target is not None), (k, target)
        if not accepted:
            refused = k
            break
        ref_rows[target].append(k)
        placed.append(k)
    # Every offered sample up to the first refusal is in exactly one row, rows keep offer order, none split.
    index = {id(s): k for k, s in enumerate(samples)}
    rows = [[index[id(s)] for s in row.samples] for row in packer.rows]
    assert rows == ref_rows
    assert sorted(k for row in rows for k in row) == placed == list(range(len(placed)))
    assert all(row == sorted(row) for row in rows)
    if refused is not None:
        assert all(samples[refused] is not s for row in packer.rows for s in row.samples)
    else:
        assert len(placed) == len(samples)
    for row in packer.rows:
        assert row.num_tokens == sum(len(s.input_ids) for s in row.samples)
        assert row.num_images == sum(len(s.images) for s in row.samples)
        if len(row.samples) > 1:
            assert packing and row.num_tokens <= layout.max_seq_tokens
            assert layout.patches or row.num_images <= layout.max_images
    if not packing:
        assert packer.full == all(row.samples for row in packer.rows)
        assert all(len(row.samples) <= 1 for row in packer.rows)
    else:
        assert not packer.full

    batch = packer.batch()
    used = [row.samples for row in packer.rows if row.samples]
    b = len(used)
    t = max(sum(len(s.input_ids) for s in row) for row in used)
    for key in ("input_ids", "labels", "attention_mask", "position_ids"):
        assert tuple(batch[key].shape) == (b, t) and batch[key].dtype == torch.int64
    for i, row in enumerate(used):
        ids_row = [x for s in row for x in s.input_ids]
        n = len(ids_row)
        assert n <= max(layout.max_seq_tokens, len(row[0].input_ids))
        assert batch["input_ids"][i].tolist() == ids_row + [PAD] * (t - n)
        assert batch["labels"][i].tolist() == [y for s in row for y in s.labels] + [IGNORE_INDEX] * (t - n)
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (t - n)
        assert int(batch["attention_mask"][i].sum()) == n
        positions = batch["position_ids"][i].tolist()
        start = 0
        for s in row:  # restart at 0 at every sample start
            assert positions[start: start + len(s.input_ids)] == list(range(len(s.input_ids)))
            start += len(s.input_ids)
        last = len(row[-1].input_ids)
        assert positions[n:] == list(range(last, last + t - n))  # padding continues the last sample
        if layout.patches:
            patches = [p for s in row for p in s.images]
            count = sum(len(p) for p in patches)
            got = batch["image_patches"][i]
            if patches:
                assert got[:count].tolist() == np.concatenate(patches).tolist()
            assert (got[count:] == 0).all()
            indices = batch["image_patch_indices"][i].tolist()
            placeholders = [j for j, x in enumerate(ids_row) if x == IMAGE_ID]
            assert [indices[j] for j in placeholders] == list(range(count))
            assert all(v == -1 for j, v in enumerate(indices) if j not in placeholders)
        else:
            images = [im for s in row for im in s.images]
            assert int(batch["num_images"][i]) == len(images)
            assert len(images) <= max(layout.max_images, len(row[0].images))
            slots = batch["images"][i]
            for j, im in enumerate(images):  # slot j holds the row's j-th image
                assert slots[j].tolist() == im.tolist()
            assert (slots[len(images):] == 0).all()
    if layout.patches:
        assert batch["image_patches"].shape[0] == b and batch["image_patches"].shape[1] >= 1
    else:
        assert tuple(batch["images"].shape[2:]) == (3, 2, 2) and batch["images"].shape[1] >= 1


# ------------------------------------------------------------------------------- builders -> batch


def tiny_jpeg(seed: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (6 + seed % 5, 5), (seed * 37 % 256, seed * 11 % 256, 90)).save(out, format="JPEG")
    return out.getvalue()


@fuzz(12)
@given(data=st.data())
@pytest.mark.parametrize("template", ["simple", "llama2", "idefics"])
def test_built_samples_pack_and_collate(toks, template, data):
    """Episodes and documents built from random records, images decoded, packed: images[b, j] is the image
    of the j-th <image> id of row b."""
    tok, ids = toks[template]
    spec = ImageSpec(size_px=4)
    max_seq = data.draw(st.integers(16, 96), "max_seq_tokens")
    max_images = data.draw(st.integers(1, 4), "max_images")
    pool = {f"{i}.jpg": tiny_jpeg(i) for i in range(6)}
    samples = []
    for k in range(data.draw(st.integers(1, 8), "n")):
        if data.draw(st.booleans()):
            record = data.draw(valid_episodes(), "episode")
            record["turns"] = [{**t, "frames": []} for t in record["turns"]]
            members = {name: pool.get(name, tiny_jpeg(k)) for t in record["turns"] for name in t.get("images", [])}
            s, err = call(build_sample, record, tok, ids, template=template, max_seq_tokens=max_seq,
                          max_images=max_images, members=members)
        else:
            record = data.draw(valid_documents(), "document")
            members = {p["image"]: pool.get(p["image"], tiny_jpeg(k)) for p in record["parts"] if "image" in p}
            s, err = call(build_document, record, tok, ids, template=template, max_seq_tokens=max_seq,
                          max_images=max_images, members=members)
        if s is not None:
            raw = list(s.images)
            s.images = [decode_image(x, spec) for x in raw]
            s.ref = raw
            samples.append(s)
    assume(samples)
    layout = Layout(max_seq_tokens=max_seq, max_images=max_images, pad_id=ids.pad, image_size_px=4)
    packer = Packer(data.draw(st.integers(1, 3), "rows"), layout, packing=True)
    for s in samples:
        if not packer.offer(s):
            break
    batch = packer.batch()
    for i, row in enumerate(r.samples for r in packer.rows if r.samples):
        ids_row = batch["input_ids"][i].tolist()
        n_image_ids = ids_row.count(ids.image)
        assert n_image_ids == int(batch["num_images"][i]) == sum(len(s.image_names) for s in row) <= max_images
        decoded = [decode_image(raw, spec) for s in row for raw in s.ref]
        for j, im in enumerate(decoded):
            assert torch.equal(batch["images"][i, j], im)
        assert int(batch["attention_mask"][i].sum()) == sum(len(s.input_ids) for s in row) <= max_seq
        starts = [j for j, p in enumerate(batch["position_ids"][i].tolist()) if p == 0]
        assert len(starts) == len(row) and ids_row[0] == ids.bos
        assert all(ids_row[j] == ids.bos for j in starts)


# ------------------------------------------------------------- findings of the fuzzing, now regressions


LONE_SURROGATE = "\ud800"  # what json.loads('"\\ud800"') returns: valid JSON, not encodable text


@pytest.mark.parametrize("template", TEMPLATES)
def test_lone_surrogate_text_is_a_bad_sample(toks, template):
    tok, ids = toks[template]
    episode = {"turns": [{"instruction": "hi " + LONE_SURROGATE, "answer": "x", "images": []}]}
    document = {"parts": [{"image": "0.jpg"}, {"text": "a" + LONE_SURROGATE}]}
    for build, record in ((build_sample, episode), (build_prompt, episode), (build_document, document)):
        with pytest.raises(BadSample):
            build(record, tok, ids, template=template, max_seq_tokens=64, max_images=2)
    with pytest.raises(BadSample):
        build_pair({"jpg": b"x", "txt": LONE_SURROGATE}, tok, ids, template=template, max_seq_tokens=64, sample_id="k")


def test_fuyu_answer_marker_in_text_does_not_move_the_targets(toks):
    tok, ids = toks["fuyu"]
    record = {"turns": [{"instruction": "q", "answer": "first part\x04second part", "images": []}]}
    s = build_sample(record, tok, ids, template="fuyu", max_seq_tokens=200, max_images=1)
    assert targets(tok, s) == " first part\x04second part</s>"


def test_decode_image_to_one_pixel():
    out = io.BytesIO()
    Image.new("RGB", (3, 3), (9, 9, 9)).save(out, format="JPEG")
    assert tuple(decode_image(out.getvalue(), ImageSpec(size_px=1)).shape) == (3, 1, 1)


def test_prompt_resamples_frames_like_training(toks):
    tok, ids = toks["simple"]
    record = {"turns": [{"instruction": "what happens?", "answer": "a dog runs", "frames": [f"f{i}.jpg" for i in range(6)]}]}
    s = build_sample(record, tok, ids, max_seq_tokens=200, max_images=8, max_frames=3)
    p = build_prompt(record, tok, ids, max_seq_tokens=200, max_images=8, max_frames=3)
    assert p.image_names == s.image_names and s.input_ids[: len(p.input_ids)] == p.input_ids
