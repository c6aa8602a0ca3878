"""The engine: requests, on-device sampling, and the continuous-batching scheduler."""
from zoo.engine.engine import Engine
from zoo.engine.request import (GenerationResult, PrefilledKV, Request, StreamEvent, encode_prompt,
                                stream_events)
from zoo.engine.sampling import SamplingParams

__all__ = ["Engine", "GenerationResult", "PrefilledKV", "Request", "SamplingParams", "StreamEvent",
           "encode_prompt", "stream_events"]
