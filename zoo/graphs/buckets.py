"""Shape buckets: every call is padded up to one, so each bucket is one static-shape graph.

Prefill is padded to [batch bucket, length bucket]; decode to [batch bucket, 1] attending over a
context bucket (the first L cache positions, L the smallest context bucket that holds every running
sequence; with no context buckets, the whole cache).
"""
from __future__ import annotations

from dataclasses import dataclass


def _powers_of_two_up_to(limit: int, start: int = 1) -> list[int]:
    sizes, n = [], start
    while n < limit:
        sizes.append(n)
        n *= 2
    return sizes + [limit]


@dataclass(frozen=True)
class Buckets:
    batch_sizes: tuple[int, ...]  # prefill and decode batch buckets
    prefill_lens: tuple[int, ...]  # prompt length buckets
    # decode attends over the first L cache positions, L from these; () = always the whole cache.
    # Decode reads L positions of K and V per row and layer, so on a long cache a short
    # conversation would otherwise pay for the whole max_seq_len at every step.
    context_lens: tuple[int, ...] = ()

    @classmethod
    def default(cls, max_batch_size: int, max_seq_len: int) -> "Buckets":
        return cls(tuple(_powers_of_two_up_to(max_batch_size)),
                   tuple(_powers_of_two_up_to(max_seq_len, start=min(32, max_seq_len))))

    def batch_for(self, n: int) -> int:
        return _smallest_at_least(self.batch_sizes, n, "batch size")

    def prefill_len_for(self, n: int) -> int:
        return _smallest_at_least(self.prefill_lens, n, "prompt length")

    def context_len_for(self, n: int) -> int | None:
        """The context bucket for sequences of up to n tokens; None = the whole cache."""
        return _smallest_at_least(self.context_lens, n, "context length") if self.context_lens else None

    def validate(self, max_batch_size: int, max_seq_len: int) -> None:
        for name, values, limit in (("batch_sizes", self.batch_sizes, max_batch_size),
                                    ("prefill_lens", self.prefill_lens, max_seq_len),
                                    ("context_lens", self.context_lens, max_seq_len)):
            if name == "context_lens" and not values:
                continue  # optional
            if not values or list(values) != sorted(set(values)) or values[0] < 1:
                raise ValueError(f"buckets.{name} must be increasing positive ints, got {values}")
            if values[-1] != limit:
                raise ValueError(f"buckets.{name} must end at {limit} (the configured maximum), got {values}")


def _smallest_at_least(sizes, n: int, what: str) -> int:
    for size in sizes:
        if size >= n:
            return size
    raise ValueError(f"{what} {n} exceeds the largest bucket {sizes[-1]}")
