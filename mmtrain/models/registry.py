"""Registry of model flavours: name → family, default config, builder, image contract.

Everything family-specific that the engine, the data path or the CLI need is reached through a
:class:`ModelSpec`, never through `if family == ...` branches. Families register their flavours
when `mmtrain.models` is imported.

Overrides replace fields of the flavour's config dataclass; nested sections are dicts
(`{"decoder": {"num_hidden_layers": 2}}`) and an unknown field name is an error.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch
from torch.utils.checkpoint import checkpoint

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class ModelSpec:
    """One flavour of a model family. Treat `config` as read-only: builds work on a copy."""

    name: str
    family: str
    config: Any
    """The family's config dataclass, holding this flavour's defaults."""
    builder: Callable[[str, Any, Mapping[str, int]], "nn.Module"]
    """builder(flavour name, complete config, token ids) → model with random weights."""
    image_spec: Callable[[Any], Dict[str, Any]]
    """image_spec(config) → dict(size_px, mean, std) the data pipeline resizes and normalises to."""
    param_groups: Tuple[str, ...]
    """Names of the model's parameter groups (what `model.trainable` may list)."""
    default_trainable: Optional[Tuple[str, ...]] = None
    """Groups that train when the recipe leaves `model.trainable` unset; None: every group."""
    attention_implementations: Tuple[str, ...] = ("sdpa", "eager")
    """transformers attention kernels the decoder may use (config field `decoder.attn_implementation`)."""
    cross_attention_implementations: Tuple[str, ...] = ()
    """Kernels of the model's text-to-image cross-attention (config field `cross_attn_implementation`);
    empty for a model without one."""
    sdpa_dense_bias: bool = False
    """Its decoder's SDPA path takes a dense additive bias (MPT's ALiBi), so on CUDA `model.attention: auto`
    prefers flex_attention, which computes the bias in the kernel."""
    description: str = ""


_SPECS: Dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    if spec.name in _SPECS:
        raise ValueError(f"model flavour {spec.name!r} is registered twice")
    _SPECS[spec.name] = spec
    return spec


def get_spec(name: str) -> ModelSpec:
    try:
        return _SPECS[name]
    except KeyError:
        known = sorted(_SPECS)
        nearest = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean {nearest[0]!r}?)" if nearest else ""
        raise KeyError(f"unknown model {name!r}{hint}; known models: {known}") from None


def list_specs() -> List[ModelSpec]:
    return [_SPECS[name] for name in sorted(_SPECS)]


def replace_fields(config: Any, overrides: Optional[Mapping[str, Any]], prefix: str = "") -> Any:
    """Return a deep copy of the dataclass `config` with `overrides` applied (nested dicts for sections).

    `prefix` is the dotted path of `config` inside the root config, used in error messages.
    """
    known = {f.name for f in dataclasses.fields(config)}
    changes = {}
    for key, value in (overrides or {}).items():
        if key not in known:
            nearest = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" (did you mean '{prefix}{nearest[0]}'?)" if nearest else ""
            raise ValueError(
                f"unknown model config field '{prefix}{key}'{hint}; fields of {type(config).__name__}: {sorted(known)}"
            )
        current = getattr(config, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, Mapping):
                raise ValueError(f"model config field {prefix}{key!r} is a section; give a dict, got {value!r}")
            changes[key] = replace_fields(current, value, prefix=f"{prefix}{key}.")
        else:
            changes[key] = copy.deepcopy(value)
    return dataclasses.replace(copy.deepcopy(config), **changes)


def run_deferred_init(model: "nn.Module") -> None:
    """The initialisation a model leaves until construction is over (see its `deferred_init`)."""
    import torch

    with torch.no_grad():
        for module, init_fn in model.deferred_init():
            init_fn(module)


def build_model(
    name: str, overrides: Optional[Mapping[str, Any]], token_ids: Mapping[str, int], init_deferred: bool = True
) -> "nn.Module":
    """Build flavour `name` with random weights (deterministic from the torch seed).

    `token_ids` is `dataclasses.asdict(TokenIds)`: the vocabulary sizes and media token ids.
    `init_deferred=False` leaves the model's deferred initialisation to the caller: the engine runs
    it on gathered weights when it builds under DeepSpeed zero.Init.
    """
    spec = get_spec(name)
    config = replace_fields(spec.config, overrides)
    model = spec.builder(spec.name, config, dict(token_ids))
    if init_deferred:
        run_deferred_init(model)
    return model


def model_from_config_dict(config_dict: Mapping[str, Any]) -> "nn.Module":
    """Rebuild a model (random weights) from `model.config_dict()`, e.g. as stored next to saved weights."""
    spec = get_spec(config_dict["flavour"])
    if config_dict["family"] != spec.family:
        raise ValueError(
            f"config dict says family {config_dict['family']!r} but flavour {spec.name!r} is {spec.family!r}"
        )
    return build_model(spec.name, config_dict["config"], config_dict["token_ids"])


class FamilyModel:
    """What every family's model shares (mixed into its nn.Module): the weight-decay lookup by
    parameter name and the config round trip. The subclass sets `family`; its __init__ sets
    `flavour`, `config` (a dataclass), `token_ids`, `_param_names` and `_no_decay_names`."""

    family: str = ""

    gradient_checkpointing: bool = False
    checkpoint_every_n_layers: int = 1

    def set_activation_checkpointing(self, enabled: bool, every_n_layers: int = 1) -> None:
        """While training, recompute decoder layers in backward: those whose index is a multiple of
        `every_n_layers` (with a cross-attention block before one), the others storing activations."""
        if every_n_layers < 1:
            raise ValueError(f"every_n_layers must be >= 1, got {every_n_layers}")
        self.gradient_checkpointing = enabled
        self.checkpoint_every_n_layers = every_n_layers

    def _recomputes(self, layer_index: int) -> bool:
        return self.gradient_checkpointing and layer_index % self.checkpoint_every_n_layers == 0

    def _call(self, module: "nn.Module", recompute: bool, *args: Any, **kwargs: Any) -> Any:
        """module(*args, **kwargs), recomputed in backward when `recompute` and training."""
        if recompute and self.training and torch.is_grad_enabled():
            return checkpoint(module, *args, use_reentrant=False, **kwargs)
        return module(*args, **kwargs)

    def no_weight_decay(self, name: str) -> bool:
        """`name` is as in `named_parameters()`; an unknown name is a KeyError, not a silent False."""
        if name not in self._param_names:
            raise KeyError(f"{name!r} is not a parameter of {type(self).__name__}")
        return name in self._no_decay_names

    def zero3_leaf_blocks(self) -> List["nn.Module"]:
        """The repeated blocks (decoder layers, cross-attention blocks, vision layers) that ZeRO-3
        gathers as one unit each: every one must be run through its own __call__."""
        return []

    def config_dict(self) -> Dict[str, Any]:
        """JSON-serialisable; `from_config_dict` (or `model_from_config_dict`) rebuilds the model.

        Attention kernels are the machine's choice, not the model's (a run on CUDA may pick
        flex_attention or flash-attn, which a CPU reload cannot run): they are stored as sdpa, the
        kernel every machine has and the engine re-chooses from the recipe."""
        config = dataclasses.asdict(self.config)
        config["decoder"]["attn_implementation"] = "sdpa"
        if "cross_attn_implementation" in config:
            config["cross_attn_implementation"] = "sdpa"
        return {"family": self.family, "flavour": self.flavour, "config": config, "token_ids": dict(self.token_ids)}

    @classmethod
    def from_config_dict(cls, config_dict: Mapping[str, Any]):
        model = model_from_config_dict(config_dict)
        if not isinstance(model, cls):
            raise ValueError(f"config dict builds a {type(model).__name__}, not a {cls.__name__}")
        return model
