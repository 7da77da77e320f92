"""Recipe schema, loading and DeepSpeed JSON generation. Imports no torch."""

from mmtrain.config.deepspeed import deepspeed_json
from mmtrain.config.load import load_config, normalize_overrides, to_dict, to_yaml
from mmtrain.config.schema import ConfigError, RunConfig, derive_batch

__all__ = [
    "ConfigError",
    "RunConfig",
    "deepspeed_json",
    "derive_batch",
    "load_config",
    "normalize_overrides",
    "to_dict",
    "to_yaml",
]
