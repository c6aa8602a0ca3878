"""The hand-adapted models, one file per architecture, and the registry that names them."""
from zoo.models.registry import (ModelSpec, config_from_dict, embedded_model_path, read_config, spec_for,
                                 spec_for_family)

__all__ = ["ModelSpec", "config_from_dict", "embedded_model_path", "read_config", "spec_for", "spec_for_family"]
