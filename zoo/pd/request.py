"""LLMRole and LLMReq: who a process is, and what one request asks for."""
from __future__ import annotations

import enum
from dataclasses import dataclass

from typing import TYPE_CHECKING

from zoo.pd.protocol import LLMException, LLMStatusCode

if TYPE_CHECKING:  # imported where used: parsing requests (the CLI) must not import torch
    from zoo.engine.sampling import SamplingParams


class LLMRole(enum.Enum):
    PROMPT = "prompt"  # prefills and keeps each request's KV until a decoder pulls it (or its TTL ends)
    DECODER = "decoder"  # pulls KV, merges it into a batch slot of its static cache, decodes


@dataclass
class LLMReq:
    """One request. `prompt` is text (the decoder tokenizes it) or token ids; it may be None when
    the KV was prefilled by someone else (a router) and the decoder only pulls it by `req_id`:
    the prompt side then sends the token ids and sampling options along with the KV.

    req_id must be unique among the requests a prompt process holds (an int in [0, 2**64)).
    prompt_cluster_id picks the prompt process; None = the decoder chooses (round robin)."""

    req_id: int
    prompt: str | list[int] | None = None
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] | list[str] | str | None = ()
    stop_token_ids: tuple[int, ...] | list[int] | None = ()
    ignore_eos: bool = False
    prompt_cluster_id: int | None = None

    def __post_init__(self):
        if isinstance(self.req_id, bool) or not isinstance(self.req_id, int) or not 0 <= self.req_id < 2**64:
            raise LLMException(LLMStatusCode.LLM_PARAM_INVALID,
                               f"req_id must be an int in [0, 2**64), got {self.req_id!r}")

    def sampling_params(self) -> SamplingParams:
        from zoo.engine.sampling import SamplingParams

        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(max_new_tokens=self.max_new_tokens, temperature=float(self.temperature),
                              top_k=self.top_k, top_p=self.top_p, seed=self.seed, stop=stop,
                              stop_token_ids=tuple(self.stop_token_ids or ()), ignore_eos=self.ignore_eos)


def sampling_to_wire(p: SamplingParams) -> dict:
    return {"max_new_tokens": p.max_new_tokens, "temperature": p.temperature, "top_k": p.top_k, "top_p": p.top_p,
            "seed": p.seed, "stop": list(p.stop), "stop_token_ids": list(p.stop_token_ids),
            "ignore_eos": p.ignore_eos}


def sampling_from_wire(d: dict) -> SamplingParams:
    """A sampling dict already type-checked by protocol.check_sampling -> SamplingParams."""
    from zoo.engine.sampling import SamplingParams

    return SamplingParams(max_new_tokens=d["max_new_tokens"], temperature=float(d["temperature"]),
                          top_k=d["top_k"], top_p=None if d["top_p"] is None else float(d["top_p"]),
                          seed=d["seed"], stop=tuple(d["stop"]), stop_token_ids=tuple(d["stop_token_ids"]),
                          ignore_eos=d["ignore_eos"])


@dataclass
class PrefillResult:
    """What a prompt process reports for one request it was asked to prefill."""

    req_id: int
    ok: bool
    first_token: int | None = None
    prompt_len: int | None = None
    nbytes: int | None = None  # KV bytes it holds for the request (real tokens only)
    status: LLMStatusCode | None = None  # when not ok
    message: str | None = None

    @classmethod
    def from_wire(cls, r: dict) -> "PrefillResult":
        """r was checked by the caller to be a dict with an int req_id and a bool ok."""
        if r["ok"]:
            return cls(r["req_id"], True, r.get("first_token"), r.get("prompt_len"), r.get("nbytes"))
        try:
            status = LLMStatusCode(r.get("status"))
        except ValueError:
            status = LLMStatusCode.LLM_FAILED
        return cls(r["req_id"], False, status=status, message=str(r.get("message")))
