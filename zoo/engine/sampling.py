"""Token sampling on the device: greedy, temperature, top-k, top-p, per-request seeds.

Rows are independent: a request's random stream comes from its own generator, so a seeded
request gives the same tokens whatever else is in the batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def validate(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"top_k must be an int >= 1 or None, got {self.top_k!r}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] or None, got {self.top_p!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be non-empty strings, got {self.stop!r}")

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
