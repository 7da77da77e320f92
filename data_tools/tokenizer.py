"""Train a tiny byte-level BPE tokenizer on MIMIC-IT instruction files (for tiny recipes and tests).

Saved with transformers' `save_pretrained`, so `AutoTokenizer.from_pretrained(dir)` loads it:

    DIR/tokenizer.json          the `tokenizers` model (byte-level BPE, lossless decode)
    DIR/tokenizer_config.json   tokenizer_class PreTrainedTokenizerFast, specials, no cleanup of spaces

Special tokens in the base vocabulary: `<unk>`=0, `<s>`=1 (bos), `</s>`=2 (eos), `<pad>`=3.
Encoding with `add_special_tokens=True` prepends `<s>` only (LLaMA convention); eos is the
caller's to append. The media tokens (`<image>`, `<|endofchunk|>`, `<answer>`) are deliberately
*not* in the vocabulary: `mmtrain.data.tokenizer.load_tokenizer` adds them as added tokens, so their
ids sit at or above `vocab_size` and the model gives them the decoupled (trainable) embedding.

Byte-level pre-tokenization without a prefix space means any text round-trips exactly and text
glued to an added token (`GPT:<answer>red<|endofchunk|>`) decodes back to exactly itself.
"""

from __future__ import annotations

import json
import os
from typing import Iterator, List, Sequence

from . import DataToolError
from .mimicit import load_instructions

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = [UNK, BOS, EOS, PAD]  # ids 0..3 in this order
MEDIA_TOKENS = ("<image>", "<|endofchunk|>", "<answer>")
TEMPLATE_WORDS = ("User:", "GPT:", "[INST]", "[/INST]", "Assistant:")
_BYTE_ALPHABET_SIZE = 256


def _corpus(instruction_paths: Sequence[str]) -> Iterator[str]:
    # Template words alone and in the prompt shapes Otter uses, so merges learn them.
    for _ in range(20):
        yield from TEMPLATE_WORDS
        yield " ".join(TEMPLATE_WORDS)
    for path in instruction_paths:
        for entry in load_instructions(path).values():
            if not isinstance(entry, dict):
                continue
            q, a = entry.get("instruction"), entry.get("answer")
            q = q if isinstance(q, str) else ""
            a = a if isinstance(a, str) else ""
            # The answer appears both after a space and glued to `<answer>` (simple template).
            yield f"User:{q} GPT:{a}"
            yield f"User: {q} GPT: {a}"
            yield f"[INST]\n{q}[/INST]{a}"
            yield a


def train_tokenizer(out_dir: str, instruction_paths: Sequence[str], vocab_size: int = 512,
                    model_max_length: int = 1 << 20) -> str:
    """Train on the instruction/answer texts of `instruction_paths`; save to `out_dir`; return it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if not instruction_paths:
        raise DataToolError("--instructions: give at least one X_instructions.json")
    minimum = _BYTE_ALPHABET_SIZE + len(SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise DataToolError(f"--vocab-size {vocab_size}: byte-level BPE needs at least {minimum}")
    for path in instruction_paths:  # fail on a bad file before training anything
        load_instructions(path)

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(instruction_paths), trainer=trainer)
    for i, name in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(name) == i, (name, tok.token_to_id(name))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    for media in MEDIA_TOKENS:
        if tok.token_to_id(media) is not None:  # cannot happen with byte-level merges of this corpus
            raise DataToolError(f"media token {media} ended up in the base vocabulary")

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        clean_up_tokenization_spaces=False,  # decoding must be lossless
        model_max_length=model_max_length,
    )
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(out_dir)
    # transformers 5 records its backend class name; the 4.x-compatible name loads in both.
    config_path = os.path.join(out_dir, "tokenizer_config.json")
    with open(config_path) as f:
        config = json.load(f)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2)
    return out_dir


def check_round_trip(tok_dir: str) -> List[str]:
    """Problems found when loading `tok_dir` the way mmtrain does (empty when fine)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    problems = []
    base = tok.vocab_size
    for media in MEDIA_TOKENS:
        if media in tok.get_vocab():
            problems.append(f"{media} is in the base vocabulary")
    tok.add_special_tokens({"additional_special_tokens": list(MEDIA_TOKENS)})
    for media in MEDIA_TOKENS:
        if tok.convert_tokens_to_ids(media) < base:
            problems.append(f"{media} got id below vocab_size {base}")
    text = " red circle"
    if tok.decode(tok.encode(text, add_special_tokens=False)) != text:
        problems.append(f"{text!r} does not round-trip")
    ids = tok.encode("<image>User:What color is the shape? GPT:<answer>red<|endofchunk|>", add_special_tokens=False)
    a, e = tok.convert_tokens_to_ids("<answer>"), tok.convert_tokens_to_ids("<|endofchunk|>")
    if a not in ids or e not in ids:
        problems.append("media tokens not split out of the text")
    else:
        answer = tok.decode(ids[ids.index(a) + 1: ids.index(e)])
        if answer != "red":
            problems.append(f"answer ids decode to {answer!r}, expected 'red'")
    return problems
