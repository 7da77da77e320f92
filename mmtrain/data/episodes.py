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

import numpy as np

from mmtrain.data.formats import BadSample, FormatError, validate_episode
from mmtrain.data.tokenizer import (
    ANSWER_TOKEN,
    END_OF_CHUNK_TOKEN,
    END_OF_UTTERANCE_TOKEN,
    FAKE_IMAGE_TOKEN,
    IMAGE_TOKEN,
    TokenIds,
    encode_texts,
)

IGNORE_INDEX = -100
TEMPLATES = ("simple", "llama2", "idefics", "fuyu")
# Fuyu marks the beginning of the answer with the byte 0x04 (`<0x04>` in its vocabulary), as text.
FUYU_ANSWER_TEXT = "\x04"

# Pieces of a rendered turn: str is free text, a _Special stands for one special token.
_Special = Tuple[str]
_IMAGE: _Special = ("image",)
_ANSWER: _Special = ("answer",)
_EOC: _Special = ("end_of_chunk",)
_BOA: _Special = ("fuyu_answer",)  # Fuyu's beginning of answer: FUYU_ANSWER_TEXT, tokenized as text
_FAKE: _Special = ("fake_image",)
_EOU: _Special = ("end_of_utterance",)
_SPECIAL_TEXT = {_IMAGE: IMAGE_TOKEN, _ANSWER: ANSWER_TOKEN, _EOC: END_OF_CHUNK_TOKEN,
                 _FAKE: FAKE_IMAGE_TOKEN, _EOU: END_OF_UTTERANCE_TOKEN, _BOA: FUYU_ANSWER_TEXT}


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
    ref: Any = None
    """Where the loader read it (opaque to this module)."""


@dataclass
class Prompt:
    """An evaluation prompt: the episode with the target turn cut right after `<answer>`."""

    sample_id: str
    input_ids: List[int]
    image_names: List[str]
    answer: str
    images: List[Any] = field(default_factory=list)
    num_dropped_turns: int = 0


def idefics_images(num_images: int) -> List[_Special]:
    """IDEFICS' image run: `<fake><image><fake>`, consecutive images sharing the fake between them."""
    if num_images == 0:
        return []
    return [_FAKE] + [p for _ in range(num_images) for p in (_IMAGE, _FAKE)]


def turn_images(turn: Mapping) -> List[str]:
    """The image members of a turn in `<image>` order: its stills, then its video's frames."""
    return list(turn.get("images", [])) + list(turn.get("frames", []))


def _turn_pieces(turn: Mapping, template: str, prompt_only: bool) -> List[Union[str, _Special]]:
    n = len(turn_images(turn))
    q, a = turn["instruction"], turn["answer"]
    if template == "simple":
        pieces: List[Union[str, _Special]] = [_IMAGE] * n + [f"User:{q} GPT:", _ANSWER]
        end: List[Union[str, _Special]] = [a, _EOC]
    elif template == "llama2":
        pieces = ["[INST]"] + [_IMAGE] * n + [f"\n{q}[/INST]", _ANSWER]
        end = [a, _EOC]
    elif template == "idefics":
        pieces = ["User:"] + idefics_images(n) + [q, _EOU, "\nAssistant:", _ANSWER]
        end = [a, _EOU, "\n"]
    elif template == "fuyu":
        # Fuyu's images go before <bos> (the loader places them); the turn is text only.
        pieces = [f"User:{q} Assistant:", _BOA]
        end = [f" {a}"]
    else:
        raise ValueError(f"unknown template {template!r}; known: {', '.join(TEMPLATES)}")
    return pieces if prompt_only else pieces + end


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
    """Token ids of free text: no bos/eos added, special-token strings split as ordinary text
    (mmtrain.data.tokenizer.encode_texts, which also refuses invalid unicode and forged media ids)."""
    return encode_texts(tokenizer, [text], token_ids)[0]


def _turn_ids(turn: Mapping, template: str, tokenizer, token_ids: TokenIds, prompt_only: bool) -> List[int]:
    ids: List[int] = []
    for piece in _turn_pieces(turn, template, prompt_only):
        if isinstance(piece, str):
            ids += encode_text(tokenizer, piece, token_ids)
        elif piece == _BOA:
            ids += encode_text(tokenizer, FUYU_ANSWER_TEXT, token_ids)
        else:
            ids.append(getattr(token_ids, piece[0]))
    return ids


def otter_labels(input_ids: Sequence[int], token_ids: TokenIds, end_id: Optional[int] = None) -> List[int]:
    """Otter's label mask: targets are the span (<answer>, next `end_id`] and every eos; the first
    token never is. `end_id` is `<|endofchunk|>`, or `<end_of_utterance>` for the IDEFICS template."""
    end_id = token_ids.end_of_chunk if end_id is None else end_id
    labels = [IGNORE_INDEX] * len(input_ids)
    inside = False
    for i, t in enumerate(input_ids):
        if t == token_ids.answer:
            inside = True
        elif inside:
            labels[i] = t
            if t == end_id:
                inside = False
        elif t == token_ids.eos:
            labels[i] = t
    if labels:
        labels[0] = IGNORE_INDEX
    return labels


def _check_record(record: Any, where: str, max_frames: int = 8) -> List[Mapping]:
    try:
        validate_episode(record, where)
    except FormatError as e:
        raise BadSample("bad_record", str(e)) from None
    return [_resample_frames(turn, max_frames) for turn in record["turns"]]


def _resample_frames(turn: Mapping, max_frames: int) -> Mapping:
    """A video keeps `max_frames` frames spread evenly over it (Otter resamples with linspace)."""
    frames = turn.get("frames", [])
    if len(frames) <= max_frames:
        return turn
    picks = np.linspace(0, len(frames) - 1, max_frames).round().astype(int)
    return {**turn, "frames": [frames[i] for i in picks]}


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
        n_images = len(turn_images(turns[i]))
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
    return [name for turn in turns for name in turn_images(turn)]


def _checked_image_names(turns: List[Mapping], input_ids: List[int], token_ids: TokenIds, template: str) -> List[str]:
    """The images in `<image>` order, checked against the ids. Fuyu takes the first image only (as
    OtterHD does); its patch rows are placed before `<bos>` once the image's size is known."""
    names = _image_names(turns)
    if template == "fuyu":
        return names[:1]
    if input_ids.count(token_ids.image) != len(names):
        raise BadSample("image_count_mismatch", f"{input_ids.count(token_ids.image)} <image> ids, {len(names)} images")
    return names


def _labels(input_ids: List[int], tokenizer, token_ids: TokenIds, template: str, answer: str) -> List[int]:
    if template == "fuyu":
        # By position, not by searching for the \x04 id: an answer may contain that byte too.
        return fuyu_labels(input_ids, len(encode_text(tokenizer, f" {answer}", token_ids)))
    return otter_labels(input_ids, token_ids, token_ids.end_of_utterance if template == "idefics" else None)


def fuyu_labels(input_ids: Sequence[int], num_answer_tokens: int) -> List[int]:
    """OtterHD's rule: the target turn's answer and the final eos are the targets (the tokens after
    its `\\x04`); the sequence ends with them, so they are its last `num_answer_tokens` + 1 ids."""
    labels = [IGNORE_INDEX] * len(input_ids)
    start = len(input_ids) - num_answer_tokens - 1
    labels[start:] = input_ids[start:]
    return labels


def build_sample(
    record: Mapping,
    tokenizer,
    token_ids: TokenIds,
    *,
    template: str = "simple",
    max_seq_tokens: int,
    max_images: int,
    max_frames: int = 8,
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
    turns = _check_record(record, sid or "episode", max_frames)
    kept, first = _select_turns(turns, template, tokenizer, token_ids, max_seq_tokens - 2, max_images, prompt=False)
    input_ids = [token_ids.bos] + [t for ids in kept for t in ids] + [token_ids.eos]
    names = _checked_image_names(turns[first:], input_ids, token_ids, template)
    return Sample(
        sample_id=sid,
        input_ids=input_ids,
        labels=_labels(input_ids, tokenizer, token_ids, template, turns[-1]["answer"]),
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
    max_frames: int = 8,
    members: Optional[Mapping[str, Any]] = None,
    sample_id: Optional[str] = None,
) -> Prompt:
    """The evaluation prompt of an episode: rendered like training, target cut right after `<answer>`.

    `<bos>` + in-context turns (dropped oldest first to fit `max_seq_tokens` and `max_images`) + the
    target turn up to and including `<answer>`; no eos. `Prompt.answer` is the reference answer.
    """
    sid = sample_id if sample_id is not None else str(record.get("id", "")) if isinstance(record, dict) else ""
    turns = _check_record(record, sid or "episode", max_frames)
    kept, first = _select_turns(turns, template, tokenizer, token_ids, max_seq_tokens - 1, max_images, prompt=True)
    input_ids = [token_ids.bos] + [t for ids in kept for t in ids]
    names = _checked_image_names(turns[first:], input_ids, token_ids, template)
    return Prompt(
        sample_id=sid,
        input_ids=input_ids,
        image_names=names,
        answer=turns[-1]["answer"],
        images=_attach_images(names, members),
        num_dropped_turns=first,
    )
