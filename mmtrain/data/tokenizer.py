"""Tokenizer loading with the media tokens, and the token ids the model side needs (docs/architecture.md).

`load_tokenizer` returns a transformers tokenizer in which `<image>`, `<|endofchunk|>` and `<answer>`
exist (added as special tokens when missing) and which has a pad token. `TokenIds` carries the ids as
plain ints so `models` never has to import `data`. `encode_texts` tokenizes the free-text pieces of one
sample in one call.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence

from mmtrain.data.formats import BadSample

IMAGE_TOKEN = "<image>"
END_OF_CHUNK_TOKEN = "<|endofchunk|>"
ANSWER_TOKEN = "<answer>"
MEDIA_TOKENS = (IMAGE_TOKEN, END_OF_CHUNK_TOKEN, ANSWER_TOKEN)
FAKE_IMAGE_TOKEN = "<fake_token_around_image>"
END_OF_UTTERANCE_TOKEN = "<end_of_utterance>"
FUYU_IMAGE_TOKEN = "|SPEAKER|"
FUYU_NEWLINE_TOKEN = "|NEWLINE|"
DEFAULT_PAD_TOKEN = "<pad>"

# TokenIds field -> token string, per prompt template (data.template). The published tokenizers
# already hold them (IDEFICS: <fake_token_around_image>, <image>; Fuyu: |SPEAKER| as the image-patch
# placeholder and |NEWLINE| ending each patch row); small trained tokenizers get them added.
TEMPLATE_TOKENS: Dict[str, Dict[str, str]] = {
    "simple": {"image": IMAGE_TOKEN, "end_of_chunk": END_OF_CHUNK_TOKEN, "answer": ANSWER_TOKEN},
    "llama2": {"image": IMAGE_TOKEN, "end_of_chunk": END_OF_CHUNK_TOKEN, "answer": ANSWER_TOKEN},
    "idefics": {"image": IMAGE_TOKEN, "end_of_chunk": END_OF_CHUNK_TOKEN, "answer": ANSWER_TOKEN,
                "fake_image": FAKE_IMAGE_TOKEN, "end_of_utterance": END_OF_UTTERANCE_TOKEN},
    "fuyu": {"image": FUYU_IMAGE_TOKEN, "image_newline": FUYU_NEWLINE_TOKEN},
}


def _has_token(tok, token: str) -> bool:
    return token in tok.get_vocab()


def add_media_tokens(tok, template: str = "simple") -> int:
    """Add the template's media tokens (as special tokens) and a pad token where missing; returns how
    many were added. Existing extra special tokens (e.g. IDEFICS' `<fake_token_around_image>`) are kept.
    """
    missing = [t for t in _template_tokens(template).values() if not _has_token(tok, t)]
    added = 0
    if missing:
        # transformers 5 calls them "extra_special_tokens" and by default *replaces* the existing list;
        # older releases call them "additional_special_tokens". Ask for whichever this one has.
        key = "extra_special_tokens" if hasattr(tok, "extra_special_tokens") else "additional_special_tokens"
        kwargs = {}
        if "replace_extra_special_tokens" in inspect.signature(tok.add_special_tokens).parameters:
            kwargs["replace_extra_special_tokens"] = False
        elif "replace_additional_special_tokens" in inspect.signature(tok.add_special_tokens).parameters:
            kwargs["replace_additional_special_tokens"] = False
        added += tok.add_special_tokens({key: missing}, **kwargs)
    if tok.pad_token is None:
        added += tok.add_special_tokens({"pad_token": DEFAULT_PAD_TOKEN})
    return added


def _template_tokens(template: str) -> Dict[str, str]:
    if template not in TEMPLATE_TOKENS:
        raise ValueError(f"data.template: {template!r} is not one of {', '.join(TEMPLATE_TOKENS)}")
    return TEMPLATE_TOKENS[template]


def load_tokenizer(name_or_path: str, template: str = "simple", **kwargs):
    """Load a tokenizer (local directory or hub id) and make sure the media tokens and a pad token exist.

    A local directory never touches the network. A hub id goes through transformers' cache as usual
    (set HF_HUB_OFFLINE=1 to forbid downloads).
    """
    from transformers import AutoTokenizer

    if os.path.isdir(name_or_path):
        kwargs.setdefault("local_files_only", True)
    tok = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    add_media_tokens(tok, template)
    # Right padding is the batch contract; generation feeds a single unpadded prompt.
    tok.padding_side = "right"
    return tok


@dataclass(frozen=True)
class TokenIds:
    """The special ids shared by the data pipeline and the model, as plain ints (-1: the template
    has no such token)."""

    image: int
    bos: int
    eos: int
    pad: int
    base_vocab_size: int
    num_added_tokens: int
    end_of_chunk: int = -1
    answer: int = -1
    fake_image: int = -1
    end_of_utterance: int = -1
    image_newline: int = -1

    @classmethod
    def from_tokenizer(cls, tok, template: str = "simple") -> "TokenIds":
        ids = {}
        for field, token in _template_tokens(template).items():
            if not _has_token(tok, token):
                raise ValueError(f"tokenizer lacks {token!r}; load it with mmtrain.data.tokenizer.load_tokenizer")
            ids[field] = int(tok.convert_tokens_to_ids(token))
        if tok.eos_token_id is None:
            raise ValueError("tokenizer has no eos token; set eos_token in its tokenizer_config.json")
        if tok.pad_token_id is None:
            raise ValueError("tokenizer has no pad token; load it with mmtrain.data.tokenizer.load_tokenizer")
        eos = int(tok.eos_token_id)
        # Tokenizers without a bos (GPT-NeoX, MPT) start documents with their eos token.
        bos = int(tok.bos_token_id) if tok.bos_token_id is not None else eos
        base = int(tok.vocab_size)
        return cls(bos=bos, eos=eos, pad=int(tok.pad_token_id), base_vocab_size=base,
                   num_added_tokens=int(len(tok)) - base, **ids)

    def as_dict(self) -> Dict[str, int]:
        return dataclasses.asdict(self)

    def special_ids(self) -> frozenset:
        """Ids that must never come out of tokenizing free text (instructions, answers)."""
        ids = (self.image, self.end_of_chunk, self.answer, self.fake_image, self.end_of_utterance, self.image_newline,
               self.bos, self.eos, self.pad)
        return frozenset(i for i in ids if i >= 0)


# Tokenizer class -> whether its Rust backend, called directly, gives exactly the ids of its __call__.
_DIRECT_BACKEND: Dict[type, bool] = {}


def _calls_backend_directly(cls: type) -> bool:
    """True for transformers' TokenizersBackend classes that override nothing on the encode path:
    their `__call__(text, add_special_tokens=False, split_special_tokens=True)` is, per text, the
    backend's `encode_batch` with truncation and padding off and `encode_special_tokens` on."""
    try:
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:  # transformers < 5 names these differently: take the general path
        return False
    return (issubclass(cls, TokenizersBackend) and cls.__call__ is PreTrainedTokenizerBase.__call__
            and cls._encode_plus is TokenizersBackend._encode_plus
            # Translation tokenizers switch prefix tokens in and out here; never bypass them.
            and not hasattr(cls, "_switch_to_input_mode"))


def _tokenizers_parallel() -> bool:
    """Whether tokenizers' batch calls use its thread pool: its own rule, on unless
    TOKENIZERS_PARALLELISM is "", off, false, f, no, n or 0 (the loader's workers set false)."""
    value = os.environ.get("TOKENIZERS_PARALLELISM")
    return value is None or value.lower() not in ("", "off", "false", "f", "no", "n", "0")


def encode_texts(tokenizer, texts: Sequence[str], token_ids: TokenIds) -> List[List[int]]:
    """Token ids of each free-text piece: no bos/eos added, special-token strings split as ordinary
    text, an empty piece gives []. The ids are exactly those of
    `tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]` per text.

    Why one call for many pieces: a transformers call costs ~25 us of Python around the Rust
    encoder, and `encode_batch_fast` skips the character offsets nobody here reads; together ~40%
    of the tokenizer's time on 800-character documents (bench/README.md). Where tokenizers'
    parallelism is on, pieces are encoded one by one with the backend (~20% instead).
    """
    try:
        "".join(texts).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate is valid JSON ("\ud800") but no tokenizer takes it
        for text in texts:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise BadSample("bad_record", f"text {text[:40]!r} is not valid unicode: {e.reason}") from None
    todo = [text for text in texts if text]
    direct = _DIRECT_BACKEND.get(type(tokenizer))
    if direct is None:
        direct = _DIRECT_BACKEND[type(tokenizer)] = _calls_backend_directly(type(tokenizer))
    if not todo:
        encoded: List[List[int]] = []
    elif direct:
        backend = tokenizer._tokenizer
        # The state transformers' own call sets (and leaves) before encoding; a baseline or an eval
        # call with padding="max_length" may have left padding or truncation on.
        if backend.truncation is not None:
            backend.no_truncation()
        if backend.padding is not None:
            backend.no_padding()
        if not backend.encode_special_tokens:
            backend.encode_special_tokens = True
        if _tokenizers_parallel():
            # A batch would go to tokenizers' thread pool: for a few short pieces that costs more than
            # it saves (ms per call on a pinned core), so piece by piece (the same ids; offsets too).
            encoded = [backend.encode(text, add_special_tokens=False).ids for text in todo]
        else:
            encode = getattr(backend, "encode_batch_fast", backend.encode_batch)  # _fast: tokenizers >= 0.21
            encoded = [e.ids for e in encode(todo, add_special_tokens=False)]
    else:
        encoded = [list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])
                   for text in todo]
    special = token_ids.special_ids()
    for text, ids in zip(todo, encoded):
        bad = special.intersection(ids)
        if bad:
            # Only a tokenizer that ignores split_special_tokens gets here; never let text forge media tokens.
            raise BadSample("special_token_in_text", f"text {text[:40]!r} encodes to special ids {sorted(bad)}")
    pieces = iter(encoded)
    return [next(pieces) if text else [] for text in texts]


_TINY_TEXTS = (
    "User: What color is the square? GPT: The square is red.",
    "User: How many circles are in the image? GPT: There are two circles.",
    "User: Describe the picture. GPT: A small blue triangle next to a green circle on a white background.",
    "User: Is the shape on the left larger than the one on the right? GPT: Yes, it is larger.",
    "[INST] What is shown here? [/INST] A yellow star and a black line.",
    "the quick brown fox jumps over the lazy dog 0 1 2 3 4 5 6 7 8 9",
)


def train_tiny_tokenizer(out_dir: str, texts: Optional[Iterable[str]] = None, vocab_size: int = 512) -> str:
    """Train and save a small byte-level BPE tokenizer (offline; for tiny recipes and tests).

    It has `<s>`, `</s>`, `<pad>`, `<unk>`; the media tokens are *not* included, `load_tokenizer` adds
    them. Byte-level, so any text encodes and decodes back exactly. Returns `out_dir`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(list(texts) if texts is not None else list(_TINY_TEXTS), trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tok.save_pretrained(out_dir)
    return out_dir
