"""OpenFlamingo's and Otter's checkpoint names ↔ mmtrain's, for the flavours in the `mmtrain` param layout.

OpenFlamingo (`open_flamingo/src/{flamingo,flamingo_lm,helpers,factory}.py`) wraps every decoder layer
i in a `FlamingoLayer(gated_cross_attn_layer, decoder_layer)` (the gated block None unless
(i+1) % n == 0), so `Flamingo.state_dict()` holds (LM = `lang_encoder.transformer` for MPT,
`lang_encoder.model` for LLaMA; layers = `blocks` / `layers`):

  vision_encoder.*                                open_clip `visual.*` (incl. `proj`, which we drop)
  perceiver.latents, perceiver.norm.*
  perceiver.layers.K.0.{norm_media, norm_latents, to_q, to_kv, to_out}.*   PerceiverAttention
  perceiver.layers.K.1.{0, 1, 3}.*                FeedForward: LayerNorm, Linear, (GELU), Linear
  LM.layers.i.gated_cross_attn_layer.{attn_gate, ff_gate, attn.{norm, to_q, to_kv, to_out}.*, ff.{0,1,3}.*}
  LM.layers.i.decoder_layer.*                     the decoder's own layer (transformers' names)
  LM.{wte | embed_tokens}.weight, LM.{norm_f | norm}.weight, lang_encoder.lm_head.weight (LLaMA only:
                                                  MPT's head is its embedding)
plus the same modules again under the aliases `lang_encoder.old_decoder_blocks.i.*` and
`lang_encoder.gated_cross_attn_layers.i.*` (OpenFlamingo's save_checkpoint drops those, the vision
encoder and every frozen parameter but the embeddings). The token tables are resized to the
tokenizer: the added tokens (`<|endofchunk|>`, `<image>`, `<PAD>`) are the last rows; in mmtrain
they live in the decoupled `additional_embedding` / `additional_fc` tables.

Otter (`src/otter_ai/models/otter/modeling_otter.py`, OtterForConditionalGeneration) has the same
structure and math under other names: HF CLIPVisionModel `vision_encoder.vision_model.*`, perceiver
`perceiver.layers.K.{norm_media, ..., to_out, feed_forward.{0,1,3}}`, gated blocks with
`feed_forward.{0,1,3}`, no aliases; and it resizes only LLaMA's tables (MPT's keep their 50432 rows).

Every tensor maps one to one except the token tables, which are one published tensor split by rows
over two of ours (`row_splits`). `to_openflamingo` / `from_openflamingo` convert whole state dicts.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from mmtrain.models.flamingo.config import FlamingoConfig
from mmtrain.models.flamingo.decoders import DECODERS

SOURCES = ("openflamingo", "otter")

# Index of each of our FeedForward's parts in OpenFlamingo's nn.Sequential(LayerNorm, Linear, GELU, Linear).
_FF_INDEX = {"norm": "0", "fc_in": "1", "fc_out": "3"}
_PERCEIVER_ATTN_NAMES = {"media_norm": "norm_media", "latents_norm": "norm_latents"}
# Published keys that are not weights of ours: open_clip's pooled projection (unused by Flamingo) and
# buffers some writers saved (older transformers' RoPE frequencies, CLIP position ids).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "embeddings.position_ids")


def _check(config: FlamingoConfig, source: str) -> None:
    if source not in SOURCES:
        raise ValueError(f"source: {source!r} is not one of {list(SOURCES)}")
    wanted = {
        "param_layout": (config.param_layout, "mmtrain"),
        "cross_attn_style": (config.cross_attn_style, "openflamingo"),
        "perceiver.style": (config.perceiver.style, "openflamingo"),
        "cross_attn_placement": (config.cross_attn_placement, "before_(i+1)%n"),
    }
    problems = [f"{name} is {value!r}, needs {want!r}" for name, (value, want) in wanted.items() if value != want]
    tower = {"openflamingo": "open_clip", "otter": "hf_clip"}[source]
    if config.vision.tower != tower:
        problems.append(f"vision.tower is {config.vision.tower!r}, {source} has {tower!r}")
    if problems:
        raise ValueError(f"not an {source} layout: " + "; ".join(problems))


def published_name(key: str, config: FlamingoConfig, source: str = "openflamingo") -> str:
    """Our parameter name → its key in an OpenFlamingo (or Otter) state dict. Both halves of a token
    table (base rows, added rows) map to the one published table."""
    kind = DECODERS[config.decoder.kind]
    lm = f"lang_encoder.{kind.causal_lm_prefix}."
    of = source == "openflamingo"
    ff = "ff" if of else "feed_forward"
    parts = key.split(".")
    head, rest = parts[0], parts[1:]
    if head == "vision_encoder":
        return key if of else "vision_encoder.vision_model." + ".".join(rest)
    if head == "perceiver" and rest[0] == "blocks":
        k, sub, leaf = rest[1], rest[2], rest[3:]
        if sub == "attn":
            leaf = [_PERCEIVER_ATTN_NAMES.get(leaf[0], leaf[0]), *leaf[1:]]
            return f"perceiver.layers.{k}{'.0' if of else ''}." + ".".join(leaf)
        return f"perceiver.layers.{k}.{'1' if of else 'feed_forward'}.{_FF_INDEX[leaf[0]]}." + ".".join(leaf[1:])
    if head == "perceiver":
        return key
    if head == "gated_cross_attn_layers":
        layer = config.cross_attn_layer_indices()[int(rest[0])]
        inner = rest[1:]
        if inner[0] == "ff":
            inner = [ff, _FF_INDEX[inner[1]], *inner[2:]]
        return f"{lm}{kind.layers}.{layer}.gated_cross_attn_layer." + ".".join(inner)
    if head == "decoder" and rest[0] == kind.layers:
        return f"{lm}{kind.layers}.{rest[1]}.decoder_layer." + ".".join(rest[2:])
    if head == "decoder" and rest[0] == kind.embedding:
        return f"{lm}{kind.embedding}.weight"
    if head == "decoder":
        return lm + ".".join(rest)
    if head == "lm_head":
        return "lang_encoder.lm_head.weight"
    raise KeyError(f"{key!r} has no {source} name")


def _our_keys(config: FlamingoConfig) -> List[str]:
    """Our state dict's keys for `config` (built on the meta device: nothing allocated)."""
    from mmtrain.models.flamingo.model import FlamingoForCausalLM

    with torch.device("meta"):
        model = FlamingoForCausalLM(config, {"image": 0}, flavour="")
    return list(model.state_dict())


def _grouped(config: FlamingoConfig, source: str) -> Dict[str, List[str]]:
    _check(config, source)
    groups: Dict[str, List[str]] = defaultdict(list)
    for key in _our_keys(config):  # module order: a table's base rows before its added rows
        groups[published_name(key, config, source)].append(key)
    return dict(groups)


def openflamingo_key_map(config: FlamingoConfig, source: str = "openflamingo") -> Dict[str, str]:
    """{published key: our key} for every tensor that maps one to one (all but the token tables)."""
    return {published: ours[0] for published, ours in _grouped(config, source).items() if len(ours) == 1}


def row_splits(config: FlamingoConfig, source: str = "openflamingo") -> Dict[str, List[Tuple[str, int, int]]]:
    """{published token table: [(our key, first row, rows), ...]}: the base table's rows, then the
    added tokens' (ids base_vocab_size, ...), as OpenFlamingo's resized table holds them."""
    base, added = config.base_vocab_size, config.num_added_tokens
    splits = {}
    for published, ours in _grouped(config, source).items():
        if len(ours) > 1:
            base_key, added_key = sorted(ours, key=lambda key: ".additional_" in key)
            splits[published] = [(base_key, 0, base), (added_key, base, added)]
    return splits


def to_openflamingo(
    state_dict: Mapping[str, torch.Tensor],
    config: FlamingoConfig,
    source: str = "openflamingo",
    table_rows: Optional[int] = None,
) -> Dict[str, torch.Tensor]:
    """Our (complete) state dict → OpenFlamingo's (or Otter's) names, without aliases.

    Token tables are the base rows then the added rows; `table_rows` pads them with zero rows to a
    published size (Otter-MPT's 50432). OpenFlamingo's `vision_encoder.proj` is not written.
    """
    out = {published: state_dict[ours] for published, ours in openflamingo_key_map(config, source).items()}
    for published, parts in row_splits(config, source).items():
        table = torch.cat([state_dict[key] for key, _, _ in parts])
        if table_rows is not None and table_rows > table.shape[0]:
            table = torch.cat([table, table.new_zeros(table_rows - table.shape[0], *table.shape[1:])])
        out[published] = table
    return out


def from_openflamingo(
    state_dict: Mapping[str, torch.Tensor], config: FlamingoConfig, source: str = "openflamingo"
) -> Dict[str, torch.Tensor]:
    """An OpenFlamingo (or Otter) state dict → ours: the full one or a saved checkpoint's subset
    (the result then holds only what it had; the rest comes from the decoder's and tower's own
    checkpoints). Aliases (`old_decoder_blocks`, `gated_cross_attn_layers`) are read as the layers
    they name; OpenFlamingo v1's `vision_encoder.visual.*` (v1 kept the whole open_clip CLIP) as
    `vision_encoder.*`; its text tower, open_clip's `proj`, saved buffers and a tied MPT `lm_head`
    copy are skipped; any other unknown key is an error. A token table's rows beyond ours (padding)
    are dropped; if it has fewer added rows than we have added tokens, the added table comes back
    shorter: the rows it lacks (tokens the checkpoint never had) are the loader's to initialise.
    """
    key_map = openflamingo_key_map(config, source)
    splits = row_splits(config, source)
    kind = DECODERS[config.decoder.kind]
    layers = f"lang_encoder.{kind.causal_lm_prefix}.{kind.layers}."
    aliases = {
        "lang_encoder.old_decoder_blocks.": "decoder_layer",
        "lang_encoder.gated_cross_attn_layers.": "gated_cross_attn_layer",
    }
    ignored = ["vision_encoder.proj"] + (["lang_encoder.lm_head.weight"] if config.decoder.tie_word_embeddings else [])
    # OpenFlamingo v1 kept the whole open_clip CLIP as vision_encoder: `visual.*` is the tower, the
    # rest its text tower (whose names would clash with the tower's v2 ones).
    whole_clip = source == "openflamingo" and any(key.startswith("vision_encoder.visual.") for key in state_dict)
    out: Dict[str, torch.Tensor] = {}
    unknown = []
    for key, tensor in state_dict.items():
        if whole_clip and key.startswith("vision_encoder."):
            if not key.startswith("vision_encoder.visual."):
                continue
            key = "vision_encoder." + key[len("vision_encoder.visual.") :]
        for alias, wrapped in aliases.items():
            if key.startswith(alias):
                index, _, leaf = key[len(alias) :].partition(".")
                key = f"{layers}{index}.{wrapped}.{leaf}"
        if key in key_map:
            out[key_map[key]] = tensor
        elif key in splits:
            if tensor.shape[0] < config.base_vocab_size:
                raise ValueError(
                    f"{key}: {tensor.shape[0]} rows, fewer than the base vocabulary's {config.base_vocab_size}"
                )
            for ours, first, rows in splits[key]:
                out[ours] = tensor[first : first + rows]
        elif not (key in ignored or key.endswith(_IGNORED_SUFFIXES)):
            unknown.append(key)
    if unknown:
        raise KeyError(f"{len(unknown)} keys are not in the {source} layout of this config, e.g. {sorted(unknown)[:5]}")
    return out


def source_of(config: FlamingoConfig) -> Optional[str]:
    """"openflamingo" or "otter" (by the vision tower) when the config is in that layout, else None."""
    source = {"open_clip": "openflamingo", "hf_clip": "otter"}.get(config.vision.tower)
    if source is None:
        return None
    try:
        _check(config, source)
    except ValueError:
        return None
    return source


def published_keys(keys: Sequence[str], config: FlamingoConfig, source: str = "openflamingo") -> Dict[str, Optional[str]]:
    """One file's keys → their keys in the full OpenFlamingo (Otter) state dict, or None (skipped).

    A file is one of (told apart by its keys): ours (`decoder.*`: kept as they are); an open_clip
    state dict (`visual.*` → `vision_encoder.*`; its text tower, `proj` and `logit_scale` skipped); an
    HF CLIP (`vision_model.*` → Otter's `vision_encoder.vision_model.*`, the rest skipped); an
    OpenFlamingo / Otter state dict or checkpoint.pt (`lang_encoder.*`, `perceiver.*`,
    `vision_encoder.*`; aliases read as the layers they name, v1's whole CLIP as its tower); else
    the base LM's own HF checkpoint (`transformer.*` / `model.*`, `lm_head.*`: under `lang_encoder.`,
    decoder layers as `...decoder_layer.*`). A tied `lm_head` copy and open_clip's `proj` are skipped.
    """
    kind = DECODERS[config.decoder.kind]
    lm = f"lang_encoder.{kind.causal_lm_prefix}."
    layers = f"{kind.causal_lm_prefix}.{kind.layers}."
    tied_head = config.decoder.tie_word_embeddings
    skip = {"vision_encoder.proj"} | ({"lang_encoder.lm_head.weight"} if tied_head else set())

    def kept(key: str) -> Optional[str]:
        return None if key in skip else key

    if any(key.startswith("decoder.") for key in keys):
        return {key: key for key in keys}
    if any(key.startswith("visual.") for key in keys):
        return {key: kept("vision_encoder." + key[len("visual.") :]) if key.startswith("visual.") else None
                for key in keys}
    if any(key.startswith("vision_model.") for key in keys) and not any(key.startswith(lm[len("lang_encoder."):]) for key in keys):
        return {key: "vision_encoder." + key if key.startswith("vision_model.") else None for key in keys}
    flamingo = ("lang_encoder.", "perceiver.", "vision_encoder.")
    if any(key.startswith(flamingo) for key in keys):
        whole_clip = source == "openflamingo" and any(key.startswith("vision_encoder.visual.") for key in keys)
        aliases = {
            "lang_encoder.old_decoder_blocks.": "decoder_layer",
            "lang_encoder.gated_cross_attn_layers.": "gated_cross_attn_layer",
        }
        out: Dict[str, Optional[str]] = {}
        for key in keys:
            name = key
            if whole_clip and name.startswith("vision_encoder."):
                if not name.startswith("vision_encoder.visual."):
                    out[key] = None
                    continue
                name = "vision_encoder." + name[len("vision_encoder.visual.") :]
            for alias, wrapped in aliases.items():
                if name.startswith(alias):
                    index, _, leaf = name[len(alias) :].partition(".")
                    name = f"{lm}{kind.layers}.{index}.{wrapped}.{leaf}"
            out[key] = kept(name)
        return out
    out = {}
    for key in keys:
        if key.startswith(layers):
            index, _, leaf = key[len(layers) :].partition(".")
            out[key] = f"{lm}{kind.layers}.{index}.decoder_layer.{leaf}"
        else:
            out[key] = kept("lang_encoder." + key)
    return out


def openflamingo_layout(model):
    """The PublishedLayout of an OpenFlamingo / Otter flavour (None when the config is in neither):
    our names map to the full Flamingo state dict's, the token tables are split by rows, and a
    checkpoint may come in parts (see `published_keys`); files in our own names load as well."""
    from mmtrain.models.weights import PublishedLayout

    config = model.config
    source = source_of(config)
    if source is None:
        return None
    names = {name for name, _ in model.named_parameters()}
    split_names = {name: published for published, parts in row_splits(config, source).items()
                   for name, _, _ in parts}
    to_published = {ours: published for published, ours in openflamingo_key_map(config, source).items()}
    to_published.update(split_names)
    splits = {published: tuple(tuple(part) for part in parts) for published, parts in row_splits(config, source).items()}
    added = frozenset(name for name in split_names if ".additional_" in name)
    return PublishedLayout(
        name=source,
        to_published=lambda name: to_published.get(name, name),
        aliases=lambda key: key if key in names else None,
        resizable_rows=added,
        ignored_suffixes=_IGNORED_SUFFIXES + ("rotary_emb.original_inv_freq",),
        row_splits=splits,
        source_keys=lambda keys: published_keys(keys, config, source),
    )
