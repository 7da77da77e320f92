"""Tokenizer loading: media tokens and pad added when missing, TokenIds contract (docs/architecture.md)."""

import dataclasses

import pytest

from mmtrain.data.tokenizer import MEDIA_TOKENS, TokenIds, load_tokenizer, train_tiny_tokenizer


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return train_tiny_tokenizer(str(tmp_path_factory.mktemp("tok")))


def test_media_tokens_are_added_once_as_special_tokens(tiny_dir, tmp_path):
    tok = load_tokenizer(tiny_dir)
    base = tok.vocab_size
    ids = [tok.convert_tokens_to_ids(t) for t in MEDIA_TOKENS]
    assert len(set(ids)) == 3 and all(i >= base for i in ids)
    for t in MEDIA_TOKENS:
        assert t in tok.all_special_tokens
        # A media token written in text encodes to its single id (that is what makes it special).
        assert tok(t, add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids(t)]
    # Reloading a saved tokenizer that already has them adds nothing.
    tok.save_pretrained(str(tmp_path))
    again = load_tokenizer(str(tmp_path))
    assert len(again) == len(tok)
    assert [again.convert_tokens_to_ids(t) for t in MEDIA_TOKENS] == ids


def test_pad_token_added_when_missing(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.train_from_iterator(["a red square", "a blue circle"], trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>"]))
    PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(str(tmp_path))
    tok = load_tokenizer(str(tmp_path))
    assert tok.pad_token is not None
    ids = TokenIds.from_tokenizer(tok)
    assert ids.pad not in (ids.bos, ids.eos, ids.image, ids.answer, ids.end_of_chunk)
    assert ids.num_added_tokens == 4  # 3 media tokens + pad


def test_existing_extra_special_tokens_are_kept(tiny_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    key = "extra_special_tokens" if hasattr(tok, "extra_special_tokens") else "additional_special_tokens"
    tok.add_special_tokens({key: ["<fake_token_around_image>"]})
    tok.save_pretrained(str(tmp_path))
    loaded = load_tokenizer(str(tmp_path))
    assert "<fake_token_around_image>" in loaded.all_special_tokens
    assert all(t in loaded.all_special_tokens for t in MEDIA_TOKENS)


def test_token_ids_contract(tiny_dir):
    tok = load_tokenizer(tiny_dir)
    ids = TokenIds.from_tokenizer(tok)
    assert dataclasses.is_dataclass(ids)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ids.image = 0
    d = ids.as_dict()
    assert set(d) == {"image", "end_of_chunk", "answer", "bos", "eos", "pad", "base_vocab_size", "num_added_tokens",
                      "fake_image", "end_of_utterance", "image_newline"}
    assert ids.fake_image == ids.end_of_utterance == ids.image_newline == -1  # not in the simple template
    assert all(type(v) is int for v in d.values())
    assert d == dataclasses.asdict(ids)
    assert ids.image == tok.convert_tokens_to_ids("<image>")
    assert ids.end_of_chunk == tok.convert_tokens_to_ids("<|endofchunk|>")
    assert ids.answer == tok.convert_tokens_to_ids("<answer>")
    assert (ids.bos, ids.eos, ids.pad) == (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    assert ids.base_vocab_size == tok.vocab_size
    assert ids.base_vocab_size + ids.num_added_tokens == len(tok)


def test_token_ids_refuse_a_tokenizer_without_media_tokens(tiny_dir):
    from transformers import AutoTokenizer

    with pytest.raises(ValueError, match="load_tokenizer"):
        TokenIds.from_tokenizer(AutoTokenizer.from_pretrained(tiny_dir))


@pytest.mark.parametrize("template", ["idefics", "fuyu"])
def test_template_tokens_are_added_and_known(tiny_dir, template):
    from mmtrain.data.tokenizer import TEMPLATE_TOKENS

    tok = load_tokenizer(tiny_dir, template=template)
    ids = TokenIds.from_tokenizer(tok, template)
    for field, token in TEMPLATE_TOKENS[template].items():
        assert getattr(ids, field) == tok.convert_tokens_to_ids(token) >= ids.base_vocab_size
        assert getattr(ids, field) in ids.special_ids()
    with pytest.raises(ValueError, match="data.template"):
        load_tokenizer(tiny_dir, template="nope")
