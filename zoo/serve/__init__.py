"""OpenAI-compatible HTTP server on zoo's continuous-batching engine.

    python -m zoo.serve [--model-path DIR] [--compiled] [--host 127.0.0.1] [--port 8000] ...

or, in-process: `create_app(zoo.load(...))` gives a FastAPI app to run with uvicorn. See
docs/serving.md. Needs the `serve` extra (fastapi, uvicorn, prometheus_client). The names below
are imported on first use, so `python -m zoo.serve` checks its options before importing torch.
"""
import importlib

_LAZY = {"create_app": "zoo.serve.app", "ServerSettings": "zoo.serve.app", "default_model_name": "zoo.serve.app",
         "EngineLoop": "zoo.serve.engine_loop"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'zoo.serve' has no attribute {name!r}")


__all__ = ["create_app", "ServerSettings", "EngineLoop", "default_model_name"]
