"""zoo.pd: separated prefill / decode deployment (PD disaggregation) with KV hand-over into decode
batch slots.

A PROMPT process prefills requests and holds each one's KV (real tokens only) keyed by req id; a
DECODER process pulls that KV over a per-link torch.distributed process group (gloo on cpu), merges
it into a slot of its static KV cache and decodes it with zoo's continuous batching. Metadata goes
over a typed JSON channel. `python -m zoo.pd --help`, docs/pd.md.
"""
import importlib

from zoo.pd.protocol import LLMException, LLMStatusCode
from zoo.pd.request import LLMReq, LLMRole, PrefillResult

# imported on first use, so `python -m zoo.pd` checks its options before importing torch
_LAZY = {"LLMEngine": "zoo.pd.api", "PDStream": "zoo.pd.api", "PulledKV": "zoo.pd.decoder"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'zoo.pd' has no attribute {name!r}")


__all__ = ["LLMEngine", "LLMRole", "LLMReq", "LLMException", "LLMStatusCode", "PrefillResult", "PulledKV",
           "PDStream"]
