"""Episode rendering, Otter label masks (checked on decoded strings), truncation, image-token counts."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmtrain.data.episodes import IGNORE_INDEX, build_prompt, build_sample, otter_labels, render_text
from mmtrain.data.formats import BadSample
from mmtrain.data.tokenizer import TokenIds, load_tokenizer, train_tiny_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(train_tiny_tokenizer(str(tmp_path_factory.mktemp("tok"))))


@pytest.fixture(scope="module")
def ids(tok):
    return TokenIds.from_tokenizer(tok)


def decode(tok, token_ids):
    return tok.decode(list(token_ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def targets(tok, sample):
    """The label-selected tokens, decoded; labels sit at the position of the token they predict."""
    assert len(sample.labels) == len(sample.input_ids)
    for t, y in zip(sample.input_ids, sample.labels):
        assert y in (IGNORE_INDEX, t)
    return decode(tok, [y for y in sample.labels if y != IGNORE_INDEX])


EPISODE = {
    "id": "VQA_INS_00042",
    "turns": [
        {"instruction": "What color is the square?", "answer": "The square is red.", "images": ["0.jpg"]},
        {"instruction": "How many circles?", "answer": "Two.", "images": []},
        {"instruction": "Describe the picture.", "answer": "A blue triangle.", "images": ["1.jpg", "2.jpg"]},
    ],
}


@pytest.mark.parametrize("template", ["simple", "llama2"])
def test_labels_are_every_answer_and_its_chunk_end_and_the_eos(tok, ids, template):
    s = build_sample(EPISODE, tok, ids, template=template, max_seq_tokens=512, max_images=5)
    assert decode(tok, s.input_ids) == render_text(EPISODE, template)
    assert targets(tok, s) == "The square is red.<|endofchunk|>Two.<|endofchunk|>A blue triangle.<|endofchunk|></s>"
    assert s.input_ids[0] == ids.bos and s.input_ids[-1] == ids.eos
    assert s.labels[0] == IGNORE_INDEX  # bos never
    assert all(y == IGNORE_INDEX for t, y in zip(s.input_ids, s.labels) if t in (ids.answer, ids.image))
    assert s.sample_id == "VQA_INS_00042"


def test_simple_template_text(tok, ids):
    assert render_text(EPISODE, "simple") == (
        "<s><image>User:What color is the square? GPT:<answer>The square is red.<|endofchunk|>"
        "User:How many circles? GPT:<answer>Two.<|endofchunk|>"
        "<image><image>User:Describe the picture. GPT:<answer>A blue triangle.<|endofchunk|></s>"
    )
    assert render_text(EPISODE, "llama2").startswith(
        "<s>[INST]<image>\nWhat color is the square?[/INST]<answer>The square is red.<|endofchunk|>[INST]\nHow many"
    )


def test_image_order_and_count(tok, ids):
    members = {"0.jpg": b"zero", "1.jpg": b"one", "2.jpg": b"two", "9.jpg": b"unused"}
    s = build_sample(EPISODE, tok, ids, max_seq_tokens=512, max_images=5, members=members)
    assert s.image_names == ["0.jpg", "1.jpg", "2.jpg"]
    assert s.images == [b"zero", b"one", b"two"]
    assert s.input_ids.count(ids.image) == 3


def test_text_cannot_forge_special_tokens(tok, ids):
    ep = {"turns": [{"instruction": "is <image> a tag? <answer> <s>", "answer": "no <|endofchunk|> </s> <pad>", "images": []}]}
    s = build_sample(ep, tok, ids, max_seq_tokens=512, max_images=5)
    assert s.input_ids.count(ids.image) == 0
    assert s.input_ids.count(ids.answer) == 1 and s.input_ids.count(ids.end_of_chunk) == 1
    assert s.input_ids.count(ids.eos) == 1 and ids.pad not in s.input_ids
    assert targets(tok, s) == "no <|endofchunk|> </s> <pad><|endofchunk|></s>"


def test_truncation_drops_oldest_in_context_turns_and_keeps_the_target(tok, ids):
    full = build_sample(EPISODE, tok, ids, max_seq_tokens=512, max_images=5)
    last_two = build_sample({"turns": EPISODE["turns"][1:]}, tok, ids, max_seq_tokens=512, max_images=5)
    target = build_sample({"turns": EPISODE["turns"][2:]}, tok, ids, max_seq_tokens=512, max_images=5)
    # One token short of the full episode: only the first turn goes.
    s = build_sample(EPISODE, tok, ids, max_seq_tokens=len(full.input_ids) - 1, max_images=5)
    assert s.input_ids == last_two.input_ids and s.num_dropped_turns == 1
    assert targets(tok, s) == "Two.<|endofchunk|>A blue triangle.<|endofchunk|></s>"
    # Exactly the target turn's length: every in-context turn goes.
    s = build_sample(EPISODE, tok, ids, max_seq_tokens=len(target.input_ids), max_images=5)
    assert s.input_ids == target.input_ids and s.num_dropped_turns == 2
    assert s.image_names == ["1.jpg", "2.jpg"] and s.input_ids.count(ids.image) == 2
    assert targets(tok, s) == "A blue triangle.<|endofchunk|></s>"
    with pytest.raises(BadSample) as e:
        build_sample(EPISODE, tok, ids, max_seq_tokens=len(target.input_ids) - 1, max_images=5)
    assert e.value.reason == "too_long"


def test_max_images_drops_oldest_turns(tok, ids):
    s = build_sample(EPISODE, tok, ids, max_seq_tokens=512, max_images=2)
    assert s.image_names == ["1.jpg", "2.jpg"] and s.num_dropped_turns == 1  # the text-only turn fits
    s = build_sample(EPISODE, tok, ids, max_seq_tokens=512, max_images=3)
    assert s.image_names == ["0.jpg", "1.jpg", "2.jpg"]
    with pytest.raises(BadSample) as e:
        build_sample(EPISODE, tok, ids, max_seq_tokens=512, max_images=1)
    assert e.value.reason == "too_many_images"


def test_bad_records_and_missing_images(tok, ids):
    for record in ({"turns": []}, {"turns": [{"instruction": 3, "answer": "a"}]}, ["not", "a", "dict"]):
        with pytest.raises(BadSample) as e:
            build_sample(record, tok, ids, max_seq_tokens=64, max_images=2)
        assert e.value.reason == "bad_record"
    with pytest.raises(BadSample) as e:
        build_sample(EPISODE, tok, ids, max_seq_tokens=512, max_images=5, members={"0.jpg": b"x"})
    assert e.value.reason == "missing_image"


@pytest.mark.parametrize("template", ["simple", "llama2"])
def test_prompt_is_the_training_sequence_cut_after_answer(tok, ids, template):
    s = build_sample(EPISODE, tok, ids, template=template, max_seq_tokens=512, max_images=5)
    p = build_prompt(EPISODE, tok, ids, template=template, max_seq_tokens=512, max_images=5)
    assert p.input_ids[-1] == ids.answer
    assert s.input_ids[: len(p.input_ids)] == p.input_ids
    assert decode(tok, s.input_ids[len(p.input_ids) :]) == "A blue triangle.<|endofchunk|></s>"
    assert p.answer == "A blue triangle." and p.image_names == ["0.jpg", "1.jpg", "2.jpg"]
    assert p.input_ids.count(ids.image) == 3
    short = build_prompt(EPISODE, tok, ids, template=template, max_seq_tokens=len(p.input_ids) - 1, max_images=5)
    assert short.num_dropped_turns == 1 and short.input_ids[-1] == ids.answer


def test_otter_labels_rule(ids):
    a, e, x = ids.answer, ids.end_of_chunk, 7
    seq = [ids.bos, x, a, 10, 11, e, x, x, a, 12, e, ids.eos]
    assert otter_labels(seq, ids) == [-100, -100, -100, 10, 11, e, -100, -100, -100, 12, e, ids.eos]
    # An <answer> with no chunk end supervises to the end of the sequence; a leading token never.
    assert otter_labels([a, 5, 6], ids) == [-100, 5, 6]


words = st.sampled_from(["red", "blue", "<image>", "<answer>", "</s>", "square", "?", " ", "two circles", "é"])
text = st.lists(words, min_size=0, max_size=6).map("".join)
turn = st.builds(
    lambda q, a, n: {"instruction": q, "answer": a, "images": [f"{i}.jpg" for i in range(n)]},
    text, text, st.integers(0, 3),
)


# derandomize: the same 60 examples on every run (a CI run is red only for a real bug); the
# converters' and builders' fuzzing (test_fuzz_builders.py) does the same.
@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(turns=st.lists(turn, min_size=1, max_size=5), max_seq=st.integers(4, 120), max_images=st.integers(1, 6),
       template=st.sampled_from(["simple", "llama2"]))
def test_invariants_on_random_episodes(tok, ids, turns, max_seq, max_images, template):
    episode = {"turns": turns}
    try:
        s = build_sample(episode, tok, ids, template=template, max_seq_tokens=max_seq, max_images=max_images)
    except BadSample as e:
        assert e.reason in ("too_long", "too_many_images")
        return
    kept = turns[s.num_dropped_turns :]
    assert kept[-1] is turns[-1]
    assert len(s.input_ids) <= max_seq and len(s.image_names) <= max_images
    assert s.input_ids.count(ids.image) == len(s.image_names) == sum(len(t["images"]) for t in kept)
    assert s.input_ids.count(ids.answer) == len(kept)
    assert targets(tok, s) == "".join(t["answer"] + "<|endofchunk|>" for t in kept) + "</s>"
    assert decode(tok, s.input_ids) == render_text({"turns": kept}, template)
    if s.num_dropped_turns:  # the next older turn would not have fitted
        wider = {"turns": turns[s.num_dropped_turns - 1 :]}
        longer = build_sample(wider, tok, ids, template=template, max_seq_tokens=max_seq, max_images=max_images)
        assert longer.num_dropped_turns == 1
