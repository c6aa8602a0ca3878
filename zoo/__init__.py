"""zoo: hand-adapted Llama / Qwen models compiled into static-shape prefill and decode graphs.

    import zoo
    model = zoo.load()                      # the embedded tiny Llama; or zoo.load("path/to/hf-folder")
    print(model.generate("Beautiful is", max_new_tokens=20).text)
"""
from zoo._version import __version__
from zoo.api import Model, TPModel, load
from zoo.config import ModelConfig
from zoo.engine import GenerationResult, StreamEvent
from zoo.errors import (ChatTemplateError, CheckpointError, CompileConfigError, ConfigError, DeviceError, RequestError,
                        TPWorkerError, ZooError)
from zoo.graphs import Buckets
from zoo.models import embedded_model_path
from zoo.settings import LoadSettings

__all__ = ["load", "Model", "TPModel", "LoadSettings", "embedded_model_path", "ModelConfig", "Buckets",
           "GenerationResult", "StreamEvent", "ZooError", "ConfigError", "CheckpointError", "CompileConfigError",
           "DeviceError", "RequestError", "ChatTemplateError", "TPWorkerError", "__version__"]
