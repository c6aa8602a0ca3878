"""What the engine keeps per request, and what it hands back: stream events and results."""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from zoo.engine.sampling import SamplingParams, TokenLogprob
from zoo.errors import RequestError
from zoo.tokenizers.base import IncrementalDetokenizer, Tokenizer


@dataclass
class StreamEvent:
    index: int  # which prompt of the call
    text: str  # new text since the previous event of this request
    token_ids: list[int]  # new token ids since the previous event
    finish_reason: str | None = None  # set on the last event: "stop" | "length" | "error"
    logprobs: list[TokenLogprob] | None = None  # one per new token id, when the request asked for logprobs


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
    logprobs: list[TokenLogprob] | None = None  # one per token id, when asked for (SamplingParams.logprobs)
    prompt_logprobs: list[TokenLogprob | None] | None = None  # one per prompt token (None for the first)

    @property
    def cumulative_logprob(self) -> float | None:
        """Sum of the new tokens' logprobs (how likely the model found this answer)."""
        return None if self.logprobs is None else sum(t.logprob for t in self.logprobs)

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


@dataclass
class PrefilledKV:
    """A prompt prefilled elsewhere: its first sampled token and its KV, per layer [KV, prompt_len, hd]."""

    first_token: int
    k: list[torch.Tensor]
    v: list[torch.Tensor]
    first_logprob: TokenLogprob | None = None  # when the request asked for logprobs
    prompt_logprobs: list[TokenLogprob | None] | None = None  # when it asked for prompt logprobs

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
    logprobs: list[TokenLogprob] = field(default_factory=list)  # per output token, when params.logprobs is set
    prompt_logprobs: list[TokenLogprob | None] | None = None  # when params.prompt_logprobs is set
    computed: int = 0  # positions of prefill_ids whose KV is in the slot's blocks (chunked prefill)
    preemptions: int = 0  # times its blocks were taken back for other requests (it then re-prefills)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def prefill_ids(self) -> list[int]:
        """What a prefill computes: the prompt, and after a preemption the tokens generated since
        (their KV is recomputed; the next token then comes from the prefill's logits)."""
        return self.prompt_ids + self.output_ids

    def result(self) -> GenerationResult:
        ttft = (self.t_first - self.t_submit) * 1e3 if self.t_first else float("nan")
        n = len(self.output_ids)
        tpot = (self.t_done - self.t_first) * 1e3 / (n - 1) if self.t_first and self.t_done and n > 1 else None
        logprobs = list(self.logprobs) if self.params.logprobs is not None else None
        return GenerationResult(self.index, self.prompt, self.prompt_ids, list(self.output_ids), self.text,
                                self.finish_reason, ttft, tpot, self.error, logprobs, self.prompt_logprobs)


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


def check_request(index: int, prompt_ids: list[int], params: SamplingParams, max_seq_len: int, vocab_size: int,
                  has_tokenizer: bool) -> None:
    """RequestError naming the problem if this request cannot run on a model of these sizes."""
    if not prompt_ids:
        raise RequestError(f"prompt {index} is empty: at least one token is needed")
    if len(prompt_ids) >= max_seq_len:
        raise RequestError(
            f"prompt {index} has {len(prompt_ids)} tokens, but max_seq_len is {max_seq_len} "
            "(the prompt and at least one new token must fit)")
    bad = [t for t in prompt_ids if not (isinstance(t, int) and 0 <= t < vocab_size)]
    if bad:
        raise RequestError(f"prompt {index} has token ids outside [0, {vocab_size}): {bad[:5]}")
    try:
        params.validate(vocab_size)
    except ValueError as e:
        raise RequestError(str(e)) from None
    if params.stop and not has_tokenizer:
        raise RequestError("stop strings need a tokenizer, and this model folder has none")


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
