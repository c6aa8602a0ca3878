"""OpenAI-compatible HTTP server on zoo's continuous-batching engine.

    python -m zoo.serve [--model-path DIR] [--compiled] [--host 127.0.0.1] [--port 8000] ...

or, in-process: `create_app(zoo.load(...))` gives a FastAPI app to run with uvicorn. See
docs/serving.md. Needs the `serve` extra (fastapi, uvicorn, prometheus_client).
"""
from zoo.serve.app import ServerSettings, create_app, default_model_name
from zoo.serve.engine_loop import EngineLoop

__all__ = ["create_app", "ServerSettings", "EngineLoop", "default_model_name"]
