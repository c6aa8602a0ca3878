"""Token sampling on the device: greedy, temperature, top-k, top-p, per-request seeds.

Rows are independent: a request's random stream comes from its own generator, so a seeded
request gives the same tokens whatever else is in the batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_k: int | None = None  # None, 0 or -1: off (as in vLLM)
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def validate(self) -> None:
        """ValueError naming the first bad field. Integers are bounded here, before any reaches torch
        (a top_k of 2**63 or a seed past int64 would otherwise fail inside a batched step)."""
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not 0 <= self.temperature < float("inf"):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < -1):
            raise ValueError(f"top_k must be an int >= 1 (0 or -1: off) or None, got {self.top_k!r}")
        if self.top_p is not None and not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1] or None, got {self.top_p!r}")
        if self.seed is not None and (not _is_int(self.seed) or not INT64_MIN <= self.seed <= INT64_MAX):
            raise ValueError(f"seed must be an int in [-2**63, 2**63 - 1] or None, got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be non-empty strings, got {self.stop!r}")
        if any(not _is_int(t) or not 0 <= t <= INT64_MAX for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be token ids (ints >= 0), got {list(self.stop_token_ids)!r}")

    def top_k_for(self, vocab_size: int) -> int:
        """top_k as the sampler takes it: the vocabulary size when off (None, 0, -1), capped at it."""
        return vocab_size if not self.top_k or self.top_k < 0 else min(self.top_k, vocab_size)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           noise: torch.Tensor | None) -> torch.Tensor:
    """logits [B, V] float32; temperature / top_k (V = off) / top_p (1.0 = off) [B];
    noise [B, V] Exp(1) samples, or None when every row is greedy -> token ids [B]."""
    greedy = logits.argmax(dim=-1)
    if noise is None:
        return greedy
    V = logits.shape[-1]
    scaled = logits / temperature.clamp(min=1e-6)[:, None]
    sorted_logits, order = scaled.sort(dim=-1, descending=True)  # [B, V]
    ranks = torch.arange(V, device=logits.device)[None, :]
    keep = ranks < top_k[:, None]
    probs = sorted_logits.softmax(dim=-1)
    keep &= (probs.cumsum(dim=-1) - probs) < top_p[:, None]  # smallest prefix with mass >= top_p
    sorted_logits = sorted_logits.masked_fill(~keep, float("-inf"))
    filtered = torch.full_like(scaled, float("-inf")).scatter(-1, order, sorted_logits)
    # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p, with no host sync.
    sampled = (filtered.softmax(dim=-1) / noise).argmax(dim=-1)
    return torch.where(temperature > 0, sampled, greedy)
