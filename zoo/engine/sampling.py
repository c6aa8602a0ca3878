"""Token sampling on the device: logit bias, min_tokens, repetition / frequency / presence
penalties, temperature, top-k, top-p, min-p, per-request seeds, and logprobs.

Rows are independent: every parameter is a per-row tensor and a request's random stream comes
from its own generator, so a seeded request gives the same tokens whatever else is in the batch.
Processing follows vLLM's order: logit_bias -> min_tokens -> penalties -> temperature ->
top-k / top-p / min-p -> draw. Logprobs are those of the model (raw logits, before any of it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_LOGPROBS = 20  # top alternatives per token, as OpenAI
MAX_LOGIT_BIAS = 100.0  # OpenAI's bound on each logit_bias value


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_k: int | None = None  # None, 0 or -1: off (as in vLLM)
    top_p: float | None = None
    min_p: float = 0.0  # drop tokens less likely than min_p x the most likely one (0 = off)
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0  # no EOS / stop token / stop string before this many new tokens
    presence_penalty: float = 0.0  # [-2, 2]: subtracted once from each token already generated
    frequency_penalty: float = 0.0  # [-2, 2]: subtracted per occurrence among the generated tokens
    repetition_penalty: float = 1.0  # > 0: divides positive / multiplies negative logits of tokens
    # seen in the prompt or the output (transformers' RepetitionPenaltyLogitsProcessor); 1 = off
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    logprobs: int | None = None  # None: none; k: each new token's logprob and its k top alternatives
    prompt_logprobs: int | None = None  # None: none; k: the same for every prompt token after the first

    def validate(self, vocab_size: int | None = None) -> None:
        """ValueError naming the first bad field. Integers are bounded here, before any reaches torch
        (a top_k of 2**63 or a seed past int64 would otherwise fail inside a batched step)."""
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if not _is_number(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < -1):
            raise ValueError(f"top_k must be an int >= 1 (0 or -1: off) or None, got {self.top_k!r}")
        if self.top_p is not None and not (_is_number(self.top_p) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1] or None, got {self.top_p!r}")
        if not (_is_number(self.min_p) and 0 <= self.min_p <= 1):
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if self.seed is not None and (not _is_int(self.seed) or not INT64_MIN <= self.seed <= INT64_MAX):
            raise ValueError(f"seed must be an int in [-2**63, 2**63 - 1] or None, got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be non-empty strings, got {self.stop!r}")
        if any(not _is_int(t) or not 0 <= t <= INT64_MAX for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be token ids (ints >= 0), got {list(self.stop_token_ids)!r}")
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_new_tokens:
            raise ValueError(f"min_tokens must be an int in [0, max_new_tokens={self.max_new_tokens}], "
                             f"got {self.min_tokens!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not (_is_number(value) and -2 <= value <= 2):
                raise ValueError(f"{name} must be a number in [-2, 2], got {value!r}")
        if not (_is_number(self.repetition_penalty) and self.repetition_penalty > 0):
            raise ValueError(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty!r}")
        if not isinstance(self.logit_bias, dict):
            raise ValueError(f"logit_bias must be a dict of token id -> bias, got {type(self.logit_bias).__name__}")
        for token, bias in self.logit_bias.items():
            if not _is_int(token) or token < 0 or (vocab_size is not None and token >= vocab_size):
                raise ValueError(f"logit_bias keys must be token ids in [0, {vocab_size or 'vocab size'}), "
                                 f"got {token!r}")
            if not (_is_number(bias) and -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS):
                raise ValueError(f"logit_bias values must be numbers in [-100, 100], got {bias!r} for token {token}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or not 0 <= value <= MAX_LOGPROBS):
                raise ValueError(f"{name} must be an int in [0, {MAX_LOGPROBS}] or None, got {value!r}")

    def top_k_for(self, vocab_size: int) -> int:
        """top_k as the sampler takes it: the vocabulary size when off (None, 0, -1), capped at it."""
        return vocab_size if not self.top_k or self.top_k < 0 else min(self.top_k, vocab_size)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def processes_logits(self) -> bool:
        """Whether anything changes the logits before the draw besides temperature / top-k / top-p."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1
                    or self.logit_bias or self.min_tokens or self.min_p)


@dataclass
class TokenLogprob:
    """One token's logprob under the model and the `top` most likely tokens at its position
    (token id, logprob), most likely first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class LogitsState:
    """Per-row tensors for apply_penalties: what each row has generated and seen, and its settings.
    Rows of a batch are cache slots (the engine keeps one row per slot)."""

    output_counts: torch.Tensor  # [N, V] int32: how often each token was generated
    prompt_seen: torch.Tensor  # [N, V] bool: the token occurs in the prompt
    bias: torch.Tensor  # [N, V] float32: logit_bias, and -inf on stop tokens while below min_tokens
    presence: torch.Tensor  # [N]
    frequency: torch.Tensor  # [N]
    repetition: torch.Tensor  # [N]
    min_p: torch.Tensor  # [N]

    @classmethod
    def empty(cls, rows: int, vocab_size: int, device) -> "LogitsState":
        return cls(torch.zeros(rows, vocab_size, dtype=torch.int32, device=device),
                   torch.zeros(rows, vocab_size, dtype=torch.bool, device=device),
                   torch.zeros(rows, vocab_size, device=device),
                   torch.zeros(rows, device=device), torch.zeros(rows, device=device),
                   torch.ones(rows, device=device), torch.zeros(rows, device=device))


def apply_penalties(logits: torch.Tensor, state: LogitsState, rows: torch.Tensor) -> torch.Tensor:
    """logits [B, V] float32 of cache rows `rows` [B] -> logits with bias, min_tokens and the
    repetition / frequency / presence penalties applied (temperature and filters come later)."""
    logits = logits + state.bias[rows]
    counts = state.output_counts[rows]  # [B, V]
    seen = counts > 0
    repetition = state.repetition[rows][:, None]  # [B, 1]
    penalized = torch.where(logits > 0, logits / repetition, logits * repetition)
    logits = torch.where(seen | state.prompt_seen[rows], penalized, logits)
    return logits - state.frequency[rows][:, None] * counts - state.presence[rows][:, None] * seen


def filter_logits(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  min_p: torch.Tensor | None = None) -> torch.Tensor:
    """logits [B, V] float32 -> temperature-scaled logits with -inf on the tokens top-k (V = off),
    top-p (1.0 = off) and min-p (0 = off) drop, all [B] per row."""
    V = logits.shape[-1]
    scaled = logits / temperature.clamp(min=1e-6)[:, None]
    sorted_logits, order = scaled.sort(dim=-1, descending=True)  # [B, V]
    ranks = torch.arange(V, device=logits.device)[None, :]
    keep = ranks < top_k[:, None]
    probs = sorted_logits.softmax(dim=-1)
    keep &= (probs.cumsum(dim=-1) - probs) < top_p[:, None]  # smallest prefix with mass >= top_p
    if min_p is not None:
        keep &= probs >= min_p[:, None] * probs[:, :1]  # at least min_p x the most likely token
    sorted_logits = sorted_logits.masked_fill(~keep, float("-inf"))
    return torch.full_like(scaled, float("-inf")).scatter(-1, order, sorted_logits)


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           noise: torch.Tensor | None, min_p: torch.Tensor | None = None) -> torch.Tensor:
    """logits [B, V] float32; per-row [B] parameters as filter_logits takes them; noise [B, V]
    Exp(1) samples, or None when every row is greedy -> token ids [B]."""
    greedy = logits.argmax(dim=-1)
    if noise is None:
        return greedy
    filtered = filter_logits(logits, temperature, top_k, top_p, min_p)
    # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p, with no host sync.
    sampled = (filtered.softmax(dim=-1) / noise).argmax(dim=-1)
    return torch.where(temperature > 0, sampled, greedy)


def host_logprobs(logprobs: tuple[torch.Tensor, ...], tokens: list[int], ks: list[int | None]
                  ) -> list[TokenLogprob | None]:
    """token_logprobs' tensors -> per row, a TokenLogprob with ks[row] alternatives (None where
    ks[row] is None); tokens are the rows' token ids, already on the host."""
    chosen, top_v, top_i = (t.tolist() for t in logprobs)
    return [None if k is None else TokenLogprob(tokens[row], chosen[row], list(zip(top_i[row][:k], top_v[row][:k])))
            for row, k in enumerate(ks)]


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    """logits [B, V] float32, tokens [B] -> (logprob of each token [B], top-k logprobs [B, k], their
    token ids [B, k]); k may be 0."""
    logprobs = logits.log_softmax(dim=-1)
    chosen = logprobs.gather(-1, tokens[:, None])[:, 0]
    top_values, top_ids = logprobs.topk(k, dim=-1) if k else (logprobs[:, :0], tokens[:, None][:, :0])
    return chosen, top_values, top_ids
