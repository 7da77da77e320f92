"""Recipe loading: schema defaults ← recipe YAML ← command-line overrides, then checks.

    cfg, warnings = load_config("recipes/tiny/otter_shapes.yaml", ["optim.lr=3e-4"])

Overrides take the OmegaConf form `a.b=value`; the SageMaker/argparse forms `--a.b value` and
`--a.b=value` are accepted too, and the `--local_rank=N` that the deepspeed launcher appends is
dropped (the rank comes from the environment). Every error is a ConfigError naming the dotted key.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from typing import List, Sequence, Tuple

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException

from mmtrain.config.schema import ConfigError, RunConfig, check


def normalize_overrides(argv: Sequence[str]) -> List[str]:
    """Turn `--a.b v`, `--a.b=v` and `a.b=v` into `a.b=v`; drop the launcher's `--local_rank`."""
    out: List[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--local_rank") or arg.startswith("--local-rank"):
            i += 1 if "=" in arg else 2
            continue
        if arg.startswith("--"):
            body = arg[2:]
            if "=" not in body:
                if i + 1 >= len(argv):
                    raise ConfigError(body, "override has no value")
                body = f"{body}={argv[i + 1]}"
                i += 1
            arg = body
        if "=" not in arg:
            raise ConfigError(arg, "overrides take the form key=value (e.g. optim.lr=3e-4)")
        out.append(arg)
        i += 1
    return out


def _schema_fields(cls) -> dict:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _valid_keys_at(dotted_parent: str) -> List[str]:
    """Field names of the schema node at `dotted_parent` ('' is the root); [] when free-form."""
    cls = RunConfig
    for part in [p for p in dotted_parent.split(".") if p]:
        part = part.split("[")[0]
        hint = _schema_fields(cls).get(part) if dataclasses.is_dataclass(cls) else None
        if hint is None:
            return []
        args = typing.get_args(hint)
        if typing.get_origin(hint) in (list, List) and args:
            hint = args[0]
        if not dataclasses.is_dataclass(hint):
            return []
        cls = hint
    return [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else []


def _unknown_key_error(full_key: str) -> ConfigError:
    parent, _, leaf = full_key.rpartition(".")
    leaf_name = leaf.split("[")[0]
    valid = _valid_keys_at(parent)
    near = difflib.get_close_matches(leaf_name, valid, n=1, cutoff=0.5)
    hint = f"; did you mean {parent + '.' if parent else ''}{near[0]}?" if near else ""
    listing = f" Valid keys here: {', '.join(valid)}." if valid else ""
    return ConfigError(full_key, f"unknown key{hint}{listing}")


def _wrap(e: OmegaConfBaseException, origin: str) -> ConfigError:
    full_key = getattr(e, "full_key", None) or getattr(e, "key", None) or "<root>"
    if isinstance(e, (ConfigKeyError, ConfigAttributeError)):
        return _unknown_key_error(str(full_key))
    if isinstance(e, MissingMandatoryValue):
        return ConfigError(str(full_key), "is required but not set (add it to the recipe or pass key=value)")
    msg = getattr(e, "msg", str(e)).splitlines()[0]
    return ConfigError(str(full_key), f"{msg} (from {origin})")


def load_config(recipe: str, overrides: Sequence[str] = ()) -> Tuple[RunConfig, List[str]]:
    """Load, merge, type-check and cross-check a recipe. Returns the config and warnings."""
    if not os.path.isfile(recipe):
        raise ConfigError("recipe", f"{recipe} does not exist")
    schema = OmegaConf.structured(RunConfig)
    try:
        recipe_node = OmegaConf.load(recipe)
    except Exception as e:  # YAML syntax errors come in several types
        raise ConfigError("recipe", f"{recipe} is not valid YAML: {e}") from e
    if not isinstance(recipe_node, DictConfig):
        raise ConfigError("recipe", f"{recipe} must be a mapping at the top level")
    try:
        merged = OmegaConf.merge(schema, recipe_node)
    except OmegaConfBaseException as e:
        raise _wrap(e, recipe) from e
    for item in normalize_overrides(overrides):
        key, raw = item.split("=", 1)
        try:
            # YAML typing of the value (numbers, bools, lists), as OmegaConf's dotlist does.
            value = yaml.safe_load(raw) if raw.strip() else ""
            OmegaConf.update(merged, key, value, merge=True)
        except OmegaConfBaseException as e:
            raise _wrap(e, f"override {item}") from e
        except (yaml.YAMLError, TypeError, ValueError, IndexError) as e:
            raise ConfigError(key, f"cannot apply override {item!r}: {e}") from e
    try:
        missing = sorted(_missing_keys(merged))
        if missing:
            raise ConfigError(missing[0], "is required but not set (add it to the recipe or pass key=value)")
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise _wrap(e, recipe) from e
    warnings = check(cfg)
    return cfg, warnings


def _missing_keys(node, prefix: str = "") -> List[str]:
    """Dotted keys still at MISSING (`???`) anywhere under `node`."""
    out = []
    is_list = isinstance(node, ListConfig)
    for key in range(len(node)) if is_list else node.keys():
        full = f"{prefix}[{key}]" if is_list else (f"{prefix}.{key}" if prefix else str(key))
        if OmegaConf.is_missing(node, key):
            out.append(full)
            continue
        child = node[key]
        if isinstance(child, (DictConfig, ListConfig)):
            out.extend(_missing_keys(child, full))
    return out


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: RunConfig) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
