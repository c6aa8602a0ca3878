"""zoo: hand-adapted Llama / Qwen2 compiled into static-shape prefill and decode graphs.

    import zoo
    model = zoo.load()                      # the embedded tiny Llama; or zoo.load("path/to/hf-folder")
    print(model.generate("Beautiful is", max_new_tokens=20).text)
"""
from zoo.api import Model, embedded_model_path, load
from zoo.config import ConfigError, ModelConfig
from zoo.engine import GenerationResult, RequestError, StreamEvent
from zoo.graphs import Buckets
from zoo.loader import CheckpointError

__all__ = ["load", "Model", "embedded_model_path", "ModelConfig", "Buckets", "GenerationResult", "StreamEvent",
           "ConfigError", "CheckpointError", "RequestError"]
__version__ = "0.1.0"
