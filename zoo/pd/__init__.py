"""zoo.pd: separated prefill / decode deployment (PD disaggregation) with KV hand-over into decode
batch slots.

A PROMPT process prefills requests and holds each one's KV (real tokens only) keyed by req id; a
DECODER process pulls that KV over a per-link torch.distributed process group (gloo on cpu), merges
it into a slot of its static KV cache and decodes it with zoo's continuous batching. Metadata goes
over a typed JSON channel. `python -m zoo.pd --help`, docs/pd.md.
"""
from zoo.pd.api import LLMEngine, PDStream
from zoo.pd.decoder import PulledKV
from zoo.pd.protocol import LLMException, LLMStatusCode
from zoo.pd.request import LLMReq, LLMRole, PrefillResult

__all__ = ["LLMEngine", "LLMRole", "LLMReq", "LLMException", "LLMStatusCode", "PrefillResult", "PulledKV",
           "PDStream"]
