"""Interleaved documents (MMC4, OBELICS) and image-text pairs -> token ids, labels and image order.

Flamingo layout (templates `simple` and `llama2`, OpenFlamingo's rule): each image becomes
`<|endofchunk|><image>` in front of the text that follows it, except the first image, which gets no
`<|endofchunk|>`; the document ends with `<|endofchunk|><eos>`:

    parts:  "A cat." [img0] "It sleeps." [img1] "On a mat."
    ids:    <s>A cat.<image>It sleeps.<|endofchunk|><image>On a mat.<|endofchunk|></s>

Labels mask (-100) everything before the first `<image>`, every `<image>`, and everything after an
`<|endofchunk|>` up to the next `<image>` (so the final `<eos>` too); the `<|endofchunk|>` tokens
are targets. A pair is the one-image document `<s><image>{caption}<|endofchunk|></s>`.

IDEFICS layout (template `idefics`): `<s>` + text with each run of images as
`<fake_token_around_image><image><fake_token_around_image>` (consecutive images share the fake
token between them) + `<eos>`; every text token and the eos are targets, image and fake tokens never.

Fuyu layout (template `fuyu`): a pair is `<s>{caption}<eos>` with the caption and eos as targets;
the image's patch rows are put in front of `<s>` once its size is known (mmtrain.data.patches).
Interleaved documents are not a Fuyu format (it takes one image per sequence) and raise BadSample.

A document keeps at most `max_images` images: it is cut before the next one. One with more than
`max_doc_images` images in all is skipped (`too_many_images`: galleries, spam), as is one with no
image (`no_image`) or no text (`empty_text`). Too long a document is cut at `max_seq_tokens`
(the eos kept); images whose `<image>` was cut off are dropped with it.
"""

from __future__ import annotations

from typing import Any, List, Mapping, Optional, Union

from mmtrain.data.episodes import IGNORE_INDEX, Sample, _attach_images, idefics_images
from mmtrain.data.formats import PAIR_IMAGE_EXTENSIONS, BadSample, FormatError, validate_document
from mmtrain.data.tokenizer import TokenIds, encode_texts

# Text parts are joined with a space, as OpenFlamingo joins MMC4's sentences.
_TEXT_SEPARATOR = " "


def _encode_pieces(pieces: List[Union[int, str]], tokenizer, token_ids: TokenIds) -> List[int]:
    """Ids (ints) and free text (str) -> ids, every text of the document tokenized in one call."""
    encoded = iter(encode_texts(tokenizer, [p for p in pieces if isinstance(p, str)], token_ids))
    ids: List[int] = []
    for piece in pieces:
        if isinstance(piece, str):
            ids += next(encoded)
        else:
            ids.append(piece)
    return ids


def _flamingo_ids(parts: List[Mapping[str, str]], tokenizer, token_ids: TokenIds) -> List[int]:
    pieces: List[Union[int, str]] = [token_ids.bos]
    seen_image, previous_text = False, False
    for part in parts:
        if "image" in part:
            if seen_image:
                pieces.append(token_ids.end_of_chunk)
            pieces.append(token_ids.image)
            seen_image, previous_text = True, False
        else:
            pieces.append((_TEXT_SEPARATOR if previous_text else "") + part["text"])
            previous_text = True
    return _encode_pieces(pieces + [token_ids.end_of_chunk, token_ids.eos], tokenizer, token_ids)


def flamingo_labels(input_ids: List[int], token_ids: TokenIds) -> List[int]:
    """OpenFlamingo's MMC4 mask on the ids (see the module docstring)."""
    # Targets: the union over images of (image, next <|endofchunk|>] (to the end when none follows),
    # less the <image> tokens themselves. Found with list.index (C) rather than a loop over every
    # token: 3-5x faster on 200-token documents.
    n = len(input_ids)
    labels = [IGNORE_INDEX] * n
    images: List[int] = []
    start = 0
    while True:
        try:
            start = input_ids.index(token_ids.image, start) + 1
        except ValueError:
            break
        images.append(start - 1)
    for image in images:
        try:
            end = input_ids.index(token_ids.end_of_chunk, image + 1) + 1
        except ValueError:
            end = n
        labels[image + 1:end] = input_ids[image + 1:end]
    for image in images:
        labels[image] = IGNORE_INDEX
    return labels


def _idefics_ids(parts: List[Mapping[str, str]], tokenizer, token_ids: TokenIds) -> List[int]:
    pieces: List[Union[int, str]] = [token_ids.bos]
    i, previous_text = 0, False
    while i < len(parts):
        run = 0
        while i + run < len(parts) and "image" in parts[i + run]:
            run += 1
        if run:
            pieces += [getattr(token_ids, special[0]) for special in idefics_images(run)]
            i, previous_text = i + run, False
            continue
        pieces.append((_TEXT_SEPARATOR if previous_text else "") + parts[i]["text"])
        i, previous_text = i + 1, True
    return _encode_pieces(pieces + [token_ids.eos], tokenizer, token_ids)


def idefics_labels(input_ids: List[int], token_ids: TokenIds) -> List[int]:
    """Every token is a target except the first (bos), images and the fake tokens around them."""
    skip = {token_ids.image, token_ids.fake_image}
    labels = [IGNORE_INDEX if t in skip else t for t in input_ids]
    if labels:
        labels[0] = IGNORE_INDEX
    return labels


def _cut_to_fit(ids: List[int], max_seq_tokens: int, eos: int) -> List[int]:
    if len(ids) <= max_seq_tokens:
        return ids
    return ids[: max_seq_tokens - 1] + [eos]


def build_document(
    record: Mapping,
    tokenizer,
    token_ids: TokenIds,
    *,
    template: str,
    max_seq_tokens: int,
    max_images: int,
    max_doc_images: int = 64,
    members: Optional[Mapping[str, Any]] = None,
    sample_id: Optional[str] = None,
    source: str = "",
) -> Sample:
    """Render, tokenize, cut and label one interleaved document (module docstring has the rules)."""
    sid = sample_id if sample_id is not None else str(record.get("id", "")) if isinstance(record, dict) else ""
    try:
        validate_document(record, sid or "document")
    except FormatError as e:
        raise BadSample("bad_record", str(e)) from None
    if template == "fuyu":
        raise BadSample("unsupported", "interleaved documents have no Fuyu layout (one image per sequence)")
    parts = [p for p in record["parts"] if "image" in p or p["text"].strip()]
    num_images = sum("image" in p for p in parts)
    if num_images == 0:
        raise BadSample("no_image", sid)
    if num_images > max_doc_images:
        raise BadSample("too_many_images", f"{sid}: {num_images} images, data.max_doc_images={max_doc_images}")
    if num_images == len(parts):
        raise BadSample("empty_text", sid)
    kept, count = [], 0
    for part in parts:
        if "image" in part:
            if count == max_images:
                break
            count += 1
        kept.append(part)
    if all("image" in p for p in kept):
        raise BadSample("empty_text", f"{sid}: no text before image {max_images + 1} (data.max_images={max_images})")
    if template == "idefics":
        ids = _cut_to_fit(_idefics_ids(kept, tokenizer, token_ids), max_seq_tokens, token_ids.eos)
        labels = idefics_labels(ids, token_ids)
    else:
        ids = _cut_to_fit(_flamingo_ids(kept, tokenizer, token_ids), max_seq_tokens, token_ids.eos)
        labels = flamingo_labels(ids, token_ids)
        labels[-1] = IGNORE_INDEX  # the eos: masked after the last <|endofchunk|>, and after a cut too
    names = [p["image"] for p in kept if "image" in p][: ids.count(token_ids.image)]
    if not names:
        raise BadSample("too_long", f"{sid}: no image within the first {max_seq_tokens} tokens")
    return Sample(sample_id=sid, input_ids=ids, labels=labels, image_names=names,
                  images=_attach_images(names, members), source=source)


def build_pair(
    members: Mapping[str, Any],
    tokenizer,
    token_ids: TokenIds,
    *,
    template: str,
    max_seq_tokens: int,
    sample_id: str,
    source: str = "",
) -> Sample:
    """One img2dataset pair (`jpg`/`png`/`webp` + `txt`) as a one-image document."""
    image = next((ext for ext in PAIR_IMAGE_EXTENSIONS if ext in members), None)
    if image is None:
        raise BadSample("missing_image", f"{sample_id} has members {sorted(members)}")
    raw = members.get("txt")
    if raw is None:
        raise BadSample("missing_caption", f"{sample_id} has members {sorted(members)}")
    try:
        caption = (raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)).strip()
    except UnicodeDecodeError as e:
        raise BadSample("bad_caption", f"{sample_id}: {e}") from None
    if not caption:
        raise BadSample("empty_text", sample_id)
    if template == "fuyu":
        ids = _cut_to_fit(_encode_pieces([token_ids.bos, caption, token_ids.eos], tokenizer, token_ids),
                          max_seq_tokens, token_ids.eos)
        labels: List[int] = [IGNORE_INDEX] + ids[1:]
        return Sample(sample_id=sample_id, input_ids=ids, labels=labels, image_names=[image],
                      images=[members[image]], source=source)
    record = {"parts": [{"image": image}, {"text": caption}]}
    return build_document(record, tokenizer, token_ids, template=template, max_seq_tokens=max_seq_tokens,
                          max_images=1, members=members, sample_id=sample_id, source=source)


def render_ids(input_ids: List[int], tokenizer) -> str:
    """Ids back to text with the specials spelled out (for docs, `inspect` and tests)."""
    return tokenizer.decode(input_ids, skip_special_tokens=False)

