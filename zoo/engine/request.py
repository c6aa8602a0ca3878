"""What the engine keeps per request, and what it hands back: stream events and results."""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from zoo.engine.sampling import SamplingParams
from zoo.errors import RequestError
from zoo.tokenizers.base import IncrementalDetokenizer, Tokenizer


@dataclass
class StreamEvent:
    index: int  # which prompt of the call
    text: str  # new text since the previous event of this request
    token_ids: list[int]  # new token ids since the previous event
    finish_reason: str | None = None  # set on the last event: "stop" | "length" | "error"


@dataclass
class GenerationResult:
    index: int
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]  # new tokens only (an EOS / stop token that ended it is included)
    text: str  # decoded new tokens, special tokens skipped, cut before a matched stop string
    finish_reason: str
    ttft_ms: float  # submit -> first new token
    tpot_ms: float | None  # mean time per output token after the first
    error: str | None = None

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


@dataclass
class PrefilledKV:
    """A prompt prefilled elsewhere: its first sampled token and its KV, per layer [KV, prompt_len, hd]."""

    first_token: int
    k: list[torch.Tensor]
    v: list[torch.Tensor]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


@dataclass(eq=False)  # requests compare by identity (engine.abort looks them up in the queue)
class Request:
    index: int
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    detokenizer: IncrementalDetokenizer | None
    generator: torch.Generator | None
    slot: int | None = None
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    emitted_chars: int = 0
    emitted_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None
    t_submit: float = field(default_factory=time.perf_counter)
    t_first: float | None = None
    t_done: float | None = None
    events: deque = field(default_factory=deque)
    prefilled: PrefilledKV | None = None  # set for requests prefilled by another engine
    submission: int = 0  # which submit() call queued it: admission is fair between submissions

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def result(self) -> GenerationResult:
        ttft = (self.t_first - self.t_submit) * 1e3 if self.t_first else float("nan")
        n = len(self.output_ids)
        tpot = (self.t_done - self.t_first) * 1e3 / (n - 1) if self.t_first and self.t_done and n > 1 else None
        return GenerationResult(self.index, self.prompt, self.prompt_ids, list(self.output_ids), self.text,
                                self.finish_reason, ttft, tpot, self.error)


def stream_events(requests: list["Request"], advance: Callable[[], None],
                  abort: Callable[[list["Request"], str], None]) -> Iterator[StreamEvent]:
    """Yield the requests' StreamEvents as they are produced, calling advance() (one engine step)
    whenever none is pending, until every request has finished. Closing the iterator early calls
    abort() on them (it must skip finished ones)."""
    try:
        while True:
            for req in requests:
                while req.events:
                    yield req.events.popleft()
            if all(r.finished and not r.events for r in requests):
                return
            advance()
    finally:
        abort(requests, "the stream was closed before the request finished")


def encode_prompt(tokenizer: Tokenizer | None, prompt, what: str, model_path: str) -> list[int]:
    """A prompt (text, or a list of token ids) -> token ids; RequestError naming `what` (e.g.
    "prompt 2") when it is empty, of the wrong type, or text for a model without a tokenizer."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise RequestError(f"{model_path!r} has no tokenizer files; pass {what} as a list of token ids")
        if not prompt:
            raise RequestError(f"{what} is empty: at least one token is needed")
        return tokenizer.encode(prompt)
    if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return list(prompt)
    raise RequestError(f"{what} must be a string or a list of token ids, got {type(prompt).__name__}")
