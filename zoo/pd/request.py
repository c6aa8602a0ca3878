"""LLMRole and LLMReq: who a process is, and what one request asks for."""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from typing import TYPE_CHECKING

from zoo.pd.protocol import LLMException, LLMStatusCode

if TYPE_CHECKING:  # imported where used: parsing requests (the CLI) must not import torch
    from zoo.engine.sampling import SamplingParams, TokenLogprob


class LLMRole(enum.Enum):
    PROMPT = "prompt"  # prefills and keeps each request's KV until a decoder pulls it (or its TTL ends)
    DECODER = "decoder"  # pulls KV, merges it into a batch slot of its static cache, decodes


@dataclass
class LLMReq:
    """One request. `prompt` is text (the decoder tokenizes it) or token ids; it may be None when
    the KV was prefilled by someone else (a router) and the decoder only pulls it by `req_id`:
    the prompt side then sends the token ids and sampling options along with the KV.

    req_id must be unique among the requests a prompt process holds (an int in [0, 2**64)).
    prompt_cluster_id picks the prompt process; None = the decoder chooses (round robin).
    The sampling fields are those of zoo.engine.SamplingParams; logit_bias maps token ids (ints, or
    their decimal strings as JSON object keys give them) to biases."""

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
    min_p: float = 0.0
    min_tokens: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def __post_init__(self):
        if isinstance(self.req_id, bool) or not isinstance(self.req_id, int) or not 0 <= self.req_id < 2**64:
            raise LLMException(LLMStatusCode.LLM_PARAM_INVALID,
                               f"req_id must be an int in [0, 2**64), got {self.req_id!r}")

    def sampling_params(self) -> SamplingParams:
        from zoo.engine.sampling import SamplingParams

        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        bias = self.logit_bias or {}
        if isinstance(bias, dict):  # "42" -> 42 (JSON keys); anything else is left for validate() to refuse
            bias = {int(t) if isinstance(t, str) and t.isdigit() else t: b for t, b in bias.items()}
        return SamplingParams(max_new_tokens=self.max_new_tokens, temperature=float(self.temperature),
                              top_k=self.top_k, top_p=self.top_p, seed=self.seed, stop=stop,
                              stop_token_ids=tuple(self.stop_token_ids or ()), ignore_eos=self.ignore_eos,
                              min_p=self.min_p, min_tokens=self.min_tokens, presence_penalty=self.presence_penalty,
                              frequency_penalty=self.frequency_penalty, repetition_penalty=self.repetition_penalty,
                              logit_bias=bias, logprobs=self.logprobs, prompt_logprobs=self.prompt_logprobs)


def sampling_to_wire(p: SamplingParams) -> dict:
    """SamplingParams -> the wire form (protocol.SAMPLING_FIELDS): logit_bias as [token_id, bias] pairs."""
    return {"max_new_tokens": p.max_new_tokens, "temperature": p.temperature, "top_k": p.top_k, "top_p": p.top_p,
            "seed": p.seed, "stop": list(p.stop), "stop_token_ids": list(p.stop_token_ids),
            "ignore_eos": p.ignore_eos, "min_p": p.min_p, "min_tokens": p.min_tokens,
            "presence_penalty": p.presence_penalty, "frequency_penalty": p.frequency_penalty,
            "repetition_penalty": p.repetition_penalty,
            "logit_bias": [[token, bias] for token, bias in p.logit_bias.items()],
            "logprobs": p.logprobs, "prompt_logprobs": p.prompt_logprobs}


def sampling_from_wire(d: dict) -> SamplingParams:
    """A sampling dict already type-checked by protocol.check_sampling -> SamplingParams (the values
    are range-checked where a request is made of them, engine.make_request)."""
    from zoo.engine.sampling import SamplingParams

    return SamplingParams(max_new_tokens=d["max_new_tokens"], temperature=float(d["temperature"]),
                          top_k=d["top_k"], top_p=None if d["top_p"] is None else float(d["top_p"]),
                          seed=d["seed"], stop=tuple(d["stop"]), stop_token_ids=tuple(d["stop_token_ids"]),
                          ignore_eos=d["ignore_eos"], min_p=float(d["min_p"]), min_tokens=d["min_tokens"],
                          presence_penalty=float(d["presence_penalty"]),
                          frequency_penalty=float(d["frequency_penalty"]),
                          repetition_penalty=float(d["repetition_penalty"]),
                          logit_bias={token: float(bias) for token, bias in d["logit_bias"]},
                          logprobs=d["logprobs"], prompt_logprobs=d["prompt_logprobs"])


def logprob_to_wire(t: TokenLogprob | None) -> list | None:
    """TokenLogprob -> [token_id, logprob, [[token_id, logprob], ...]]; a logprob of -inf goes as null
    (JSON has no infinities)."""
    if t is None:
        return None
    return [t.token_id, _finite_or_none(t.logprob), [[token, _finite_or_none(lp)] for token, lp in t.top]]


def logprob_from_wire(value: list | None) -> TokenLogprob | None:
    """A wire logprob already type-checked by protocol.check_logprob -> TokenLogprob (null -> -inf)."""
    if value is None:
        return None
    from zoo.engine.sampling import TokenLogprob

    token, logprob, top = value
    return TokenLogprob(token, _inf_if_none(logprob), [(t, _inf_if_none(lp)) for t, lp in top])


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _inf_if_none(value) -> float:
    return float("-inf") if value is None else float(value)


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
