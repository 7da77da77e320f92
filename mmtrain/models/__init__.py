"""Model families, their flavours (registry) and weight IO.

Importing the package registers every family's flavours (and imports their model code).
"""

from mmtrain.models import (
    flamingo,  # noqa: F401  (registers the flamingo flavours)
    fuyu,  # noqa: F401  (registers the fuyu flavours)
)
from mmtrain.models.registry import (
    ModelSpec,
    build_model,
    get_spec,
    list_specs,
    model_from_config_dict,
    register,
)

__all__ = ["ModelSpec", "build_model", "get_spec", "list_specs", "model_from_config_dict", "register"]
