"""Instruction episodes (MIMIC-IT style) -> token ids, labels and image order, with Otter's templates.

One turn renders as (docs/formats.md has worked examples):

    simple:  <image>...<image>User:{instruction} GPT:<answer>{answer}<|endofchunk|>
    llama2:  [INST]<image>...<image>\\n{instruction}[/INST]<answer>{answer}<|endofchunk|>

one `<image>` per image of the turn; the sequence is `<bos>` + turns (in-context first, target last)
+ `<eos>`. Free text (the template words, instructions, answers) is tokenized piece by piece without
the tokenizer's own specials and with special-token strings split as plain text, and the media /
bos / eos ids are inserted directly. So a literal "<image>" typed in an instruction can never become an
image token, and the number of `<image>` ids always equals the number of images.

Labels follow Otter's rule on the ids: -100 everywhere except the tokens after each `<answer>` up to
and including the next `<|endofchunk|>`, and the final `<eos>`; `<answer>` itself and `<bos>` never are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Mapping, Optional, Sequence, Tuple, Union

from mmtrain.data.formats import BadSample, FormatError, validate_episode
from mmtrain.data.tokenizer import ANSWER_TOKEN, END_OF_CHUNK_TOKEN, IMAGE_TOKEN, TokenIds

IGNORE_INDEX = -100
TEMPLATES = ("simple", "llama2")

# Pieces of a rendered turn: str is free text, a _Special stands for one special token.
_Special = Tuple[str]
_IMAGE: _Special = ("image",)
_ANSWER: _Special = ("answer",)
_EOC: _Special = ("end_of_chunk",)
_SPECIAL_TEXT = {_IMAGE: IMAGE_TOKEN, _ANSWER: ANSWER_TOKEN, _EOC: END_OF_CHUNK_TOKEN}


@dataclass
class Sample:
    """One training sequence. `images` holds what the caller attached (bytes or tensors), in `<image>` order."""

    sample_id: str
    input_ids: List[int]
    labels: List[int]
    image_names: List[str]
    images: List[Any] = field(default_factory=list)
    source: str = ""
    num_turns: int = 0
    num_dropped_turns: int = 0


@dataclass
class Prompt:
    """An evaluation prompt: the episode with the target turn cut right after `<answer>`."""

    sample_id: str
    input_ids: List[int]
    image_names: List[str]
    answer: str
    images: List[Any] = field(default_factory=list)
    num_dropped_turns: int = 0


def _turn_pieces(turn: Mapping, template: str, prompt_only: bool) -> List[Union[str, _Special]]:
    images = [_IMAGE] * len(turn.get("images", []))
    q, a = turn["instruction"], turn["answer"]
    if template == "simple":
        pieces: List[Union[str, _Special]] = images + [f"User:{q} GPT:", _ANSWER]
    elif template == "llama2":
        pieces = ["[INST]"] + images + [f"\n{q}[/INST]", _ANSWER]
    else:
        raise ValueError(f"unknown template {template!r}; known: {', '.join(TEMPLATES)}")
    if not prompt_only:
        pieces += [a, _EOC]
    return pieces


def render_text(record: Mapping, template: str = "simple", bos: str = "<s>", eos: str = "</s>", prompt: bool = False) -> str:
    """The text a whole episode renders to (for docs, logs and tests); `prompt=True` cuts the target after `<answer>`."""
    turns = record["turns"]
    out = [bos]
    for i, turn in enumerate(turns):
        cut = prompt and i == len(turns) - 1
        out += [p if isinstance(p, str) else _SPECIAL_TEXT[p] for p in _turn_pieces(turn, template, cut)]
    if not prompt:
        out.append(eos)
    return "".join(out)


def encode_text(tokenizer, text: str, token_ids: TokenIds) -> List[int]:
    """Token ids of free text: no bos/eos added, special-token strings split as ordinary text."""
    if not text:
        return []
    ids = tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    bad = token_ids.special_ids().intersection(ids)
    if bad:
        # Only a tokenizer that ignores split_special_tokens gets here; never let text forge media tokens.
        raise BadSample("special_token_in_text", f"text {text[:40]!r} encodes to special ids {sorted(bad)}")
    return list(ids)


def _turn_ids(turn: Mapping, template: str, tokenizer, token_ids: TokenIds, prompt_only: bool) -> List[int]:
    ids: List[int] = []
    for piece in _turn_pieces(turn, template, prompt_only):
        if isinstance(piece, str):
            ids += encode_text(tokenizer, piece, token_ids)
        else:
            ids.append(getattr(token_ids, piece[0]))
    return ids


def otter_labels(input_ids: Sequence[int], token_ids: TokenIds) -> List[int]:
    """Otter's label mask: targets are the span (<answer>, next <|endofchunk|>] and every eos; the first token never is."""
    labels = [IGNORE_INDEX] * len(input_ids)
    inside = False
    for i, t in enumerate(input_ids):
        if t == token_ids.answer:
            inside = True
        elif inside:
            labels[i] = t
            if t == token_ids.end_of_chunk:
                inside = False
        elif t == token_ids.eos:
            labels[i] = t
    if labels:
        labels[0] = IGNORE_INDEX
    return labels


def _check_record(record: Any, where: str) -> List[Mapping]:
    try:
        validate_episode(record, where)
    except FormatError as e:
        raise BadSample("bad_record", str(e)) from None
    return record["turns"]


def _select_turns(
    turns: List[Mapping], template: str, tokenizer, token_ids: TokenIds, budget_tokens: int, max_images: int, prompt: bool
) -> Tuple[List[List[int]], int]:
    """Keep the target turn and the longest run of in-context turns just before it that fits.

    Returns the kept turns' ids (oldest first) and the index of the first kept turn. Turns are
    tokenized from the target backwards, so a huge episode costs only what is kept (+1 turn).
    """
    kept: List[List[int]] = []
    used_tokens = used_images = 0
    first = len(turns)
    for i in range(len(turns) - 1, -1, -1):
        target = i == len(turns) - 1
        ids = _turn_ids(turns[i], template, tokenizer, token_ids, prompt_only=prompt and target)
        n_images = len(turns[i].get("images", []))
        if target:
            if len(ids) > budget_tokens:
                raise BadSample("too_long", f"target turn alone is {len(ids)} tokens, budget {budget_tokens}")
            if n_images > max_images:
                raise BadSample("too_many_images", f"target turn has {n_images} images, max_images={max_images}")
        elif used_tokens + len(ids) > budget_tokens or used_images + n_images > max_images:
            break  # this and every older in-context turn are dropped
        kept.append(ids)
        used_tokens += len(ids)
        used_images += n_images
        first = i
    kept.reverse()
    return kept, first


def _attach_images(names: List[str], members: Optional[Mapping[str, Any]]) -> List[Any]:
    if members is None:
        return []
    missing = [n for n in names if n not in members]
    if missing:
        raise BadSample("missing_image", f"record names {missing} but the sample has members {sorted(members)}")
    return [members[n] for n in names]


def _image_names(turns: List[Mapping]) -> List[str]:
    return [name for turn in turns for name in turn.get("images", [])]


def build_sample(
    record: Mapping,
    tokenizer,
    token_ids: TokenIds,
    *,
    template: str = "simple",
    max_seq_tokens: int,
    max_images: int,
    members: Optional[Mapping[str, Any]] = None,
    sample_id: Optional[str] = None,
    source: str = "",
) -> Sample:
    """Render, tokenize, truncate and label one episode.

    In-context turns are dropped oldest first until the sequence fits `max_seq_tokens` (bos and eos
    included) and has at most `max_images` images; a target turn that alone does not fit raises
    BadSample("too_long" / "too_many_images"). `members` (ext -> bytes/tensor) fills `Sample.images`
    in `<image>` order; a listed image missing from it raises BadSample("missing_image").
    """
    sid = sample_id if sample_id is not None else str(record.get("id", "")) if isinstance(record, dict) else ""
    turns = _check_record(record, sid or "episode")
    kept, first = _select_turns(turns, template, tokenizer, token_ids, max_seq_tokens - 2, max_images, prompt=False)
    input_ids = [token_ids.bos] + [t for ids in kept for t in ids] + [token_ids.eos]
    names = _image_names(turns[first:])
    if input_ids.count(token_ids.image) != len(names):
        raise BadSample("image_count_mismatch", f"{input_ids.count(token_ids.image)} <image> ids, {len(names)} images")
    return Sample(
        sample_id=sid,
        input_ids=input_ids,
        labels=otter_labels(input_ids, token_ids),
        image_names=names,
        images=_attach_images(names, members),
        source=source,
        num_turns=len(turns) - first,
        num_dropped_turns=first,
    )


def build_prompt(
    record: Mapping,
    tokenizer,
    token_ids: TokenIds,
    *,
    template: str = "simple",
    max_seq_tokens: int,
    max_images: int,
    members: Optional[Mapping[str, Any]] = None,
    sample_id: Optional[str] = None,
) -> Prompt:
    """The evaluation prompt of an episode: rendered like training, target cut right after `<answer>`.

    `<bos>` + in-context turns (dropped oldest first to fit `max_seq_tokens` and `max_images`) + the
    target turn up to and including `<answer>`; no eos. `Prompt.answer` is the reference answer.
    """
    sid = sample_id if sample_id is not None else str(record.get("id", "")) if isinstance(record, dict) else ""
    turns = _check_record(record, sid or "episode")
    kept, first = _select_turns(turns, template, tokenizer, token_ids, max_seq_tokens - 1, max_images, prompt=True)
    input_ids = [token_ids.bos] + [t for ids in kept for t in ids]
    names = _image_names(turns[first:])
    if input_ids.count(token_ids.image) != len(names):
        raise BadSample("image_count_mismatch", f"{input_ids.count(token_ids.image)} <image> ids, {len(names)} images")
    return Prompt(
        sample_id=sid,
        input_ids=input_ids,
        image_names=names,
        answer=turns[-1]["answer"],
        images=_attach_images(names, members),
        num_dropped_turns=first,
    )
