"""The engine: requests, on-device sampling, and the continuous-batching scheduler."""
from zoo.engine.engine import Engine
from zoo.engine.request import (GenerationResult, PrefilledKV, Request, StreamEvent, encode_prompt,
                                stream_events)
from zoo.engine.sampling import SamplingParams, TokenLogprob

__all__ = ["Engine", "GenerationResult", "PrefilledKV", "Request", "SamplingParams", "StreamEvent",
           "TokenLogprob", "encode_prompt", "stream_events"]
