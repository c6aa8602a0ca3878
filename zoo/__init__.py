"""zoo: hand-adapted Llama / Qwen models compiled into static-shape prefill and decode graphs.

    import zoo
    model = zoo.load()                      # the embedded tiny Llama; or zoo.load("path/to/hf-folder")
    print(model.generate("Beautiful is", max_new_tokens=20).text)

The public names below are imported on first use (PEP 562), so `import zoo.<module>` of a light
module (errors, settings, the command-line option parsers) does not import torch: a CLI can refuse
a bad argument in a fraction of a second, before torch loads.
"""
import importlib

from zoo._version import __version__
from zoo.errors import (ChatTemplateError, CheckpointError, CompileConfigError, ConfigError, DeviceError, RequestError,
                        TPWorkerError, ZooError)

# public name -> the module that defines it
_LAZY = {
    "load": "zoo.api", "Model": "zoo.api", "TPModel": "zoo.api",
    "LoadSettings": "zoo.settings",
    "ModelConfig": "zoo.config",
    "GenerationResult": "zoo.engine", "StreamEvent": "zoo.engine", "SamplingParams": "zoo.engine",
    "TokenLogprob": "zoo.engine",
    "Buckets": "zoo.graphs",
    "embedded_model_path": "zoo.models",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'zoo' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["load", "Model", "TPModel", "LoadSettings", "embedded_model_path", "ModelConfig", "Buckets",
           "GenerationResult", "StreamEvent", "SamplingParams", "TokenLogprob", "ZooError", "ConfigError", "CheckpointError", "CompileConfigError",
           "DeviceError", "RequestError", "ChatTemplateError", "TPWorkerError", "__version__"]
