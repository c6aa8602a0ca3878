"""Shape buckets: every call is padded up to one, so each bucket is one graph.

Static lengths (the default): prefill is padded to [batch bucket, length bucket]; decode to
[batch bucket, 1] attending over a context bucket (the first L cache positions, L the smallest
context bucket that holds every running sequence; with no context buckets, the whole cache). One
graph per (batch, length) and per (batch, context).

Dynamic lengths (`dynamic_lengths`): the prompt length and the decode context are a dynamic
dimension of the graph, padded up to a multiple of `length_multiple` only. One prefill and one
decode graph per batch bucket serve every length up to max_seq_len; on CPU this costs what a
static graph of the same length costs (benches/results/dynamic_lengths-*.md) and pads far less.

`prefill_tokens` caps the padded tokens (batch bucket x length) of one prefill call: larger groups
of prompts are split, and with static lengths the (batch, length) graphs past the cap are never
built. A prompt longer than one call takes (`chunk_tokens`) is prefilled in chunks, one per engine
step (chunked prefill). With dynamic lengths each chunk runs in one forward with the decode step of
the running requests (a prefill-and-decode graph per batch bucket), so the weights are read once
for both; with static lengths the chunks and the decode steps take turns.

A prefill also attends over what its rows already hold in the KV cache (a cached prefix, earlier
chunks): with static lengths its graph is one per (batch, length, context bucket), the context
bucket holding every row's whole prompt; with dynamic lengths the context is a second dynamic
dimension of the one graph per batch bucket.
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
    prefill_lens: tuple[int, ...]  # prompt length buckets (dynamic lengths: just (max_seq_len,))
    # decode attends over the first L cache positions, L from these; () = always the whole cache.
    # Decode reads L positions of K and V per row and layer, so on a long cache a short
    # conversation would otherwise pay for the whole max_seq_len at every step.
    context_lens: tuple[int, ...] = ()
    dynamic_lengths: bool = False  # prompt length and decode context: a dynamic graph dimension
    length_multiple: int = 32  # dynamic lengths are padded up to a multiple of this
    prefill_tokens: int | None = None  # most padded tokens (B x S) in one prefill call; None: no cap

    @classmethod
    def default(cls, max_batch_size: int, max_seq_len: int) -> "Buckets":
        return cls(tuple(_powers_of_two_up_to(max_batch_size)),
                   tuple(_powers_of_two_up_to(max_seq_len, start=min(32, max_seq_len))))

    @classmethod
    def dynamic(cls, batch_sizes: tuple[int, ...], max_seq_len: int, length_multiple: int = 32,
                prefill_tokens: int | None = None) -> "Buckets":
        """One prefill and one decode graph per batch bucket, for every length up to max_seq_len."""
        return cls(tuple(batch_sizes), (max_seq_len,), (max_seq_len,), True, length_multiple, prefill_tokens)

    @property
    def max_len(self) -> int:
        return self.prefill_lens[-1]

    def batch_for(self, n: int) -> int:
        return _smallest_at_least(self.batch_sizes, n, "batch size")

    def prefill_len_for(self, n: int) -> int:
        if self.dynamic_lengths:
            return self._round_up(n, self.max_len, "prompt length")
        return _smallest_at_least(self.prefill_lens, n, "prompt length")

    def context_len_for(self, n: int) -> int | None:
        """The context bucket for sequences of up to n tokens; None = the whole cache."""
        if self.dynamic_lengths:
            return self._round_up(n, self.context_lens[-1], "context length")
        return _smallest_at_least(self.context_lens, n, "context length") if self.context_lens else None

    def _round_up(self, n: int, limit: int, what: str) -> int:
        if n > limit:
            raise ValueError(f"{what} {n} exceeds the maximum {limit}")
        m = self.length_multiple
        return min(-(-max(n, 1) // m) * m, limit)

    @property
    def chunk_tokens(self) -> int:
        """The most tokens of one prompt one prefill call computes; longer prompts run in chunks."""
        if self.prefill_tokens is None or self.prefill_tokens >= self.max_len:
            return self.max_len
        if self.dynamic_lengths:
            return max(self.length_multiple, self.prefill_tokens // self.length_multiple * self.length_multiple)
        fitting = [S for S in self.prefill_lens if S <= self.prefill_tokens]
        return fitting[-1] if fitting else self.prefill_lens[0]

    def prefill_fits(self, rows: int, longest: int) -> bool:
        """Whether `rows` prompt chunks, the longest `longest` tokens (<= chunk_tokens), run as one
        prefill call."""
        if rows == 1 or self.prefill_tokens is None:
            return rows <= self.batch_sizes[-1]
        return rows <= self.batch_sizes[-1] and self.batch_for(rows) * self.prefill_len_for(longest) <= self.prefill_tokens

    # ---- the graphs --------------------------------------------------------------------------
    def prefill_graphs(self) -> list[tuple[int, int | None, int | None]]:
        """(batch, length, context) of every prefill graph, small lengths first; length and
        context None with dynamic lengths; context None: the whole block table."""
        if self.dynamic_lengths:
            return [(B, None, None) for B in self.batch_sizes]
        contexts = self.context_lens or (None,)
        return [(B, S, T) for S in self.prefill_lens if S <= self.chunk_tokens for T in contexts
                if T is None or T >= S for B in self.batch_sizes if self.prefill_fits(B, S)]

    def decode_graphs(self) -> list[tuple[int, int | None]]:
        """(batch, context) of every decode graph; context None: dynamic, or the whole cache."""
        if self.dynamic_lengths or not self.context_lens:
            return [(B, None) for B in self.batch_sizes]
        return [(B, L) for B in self.batch_sizes for L in self.context_lens]

    def mixed_graphs(self) -> list[int]:
        """The decode batch of every prefill-and-decode graph (a prompt chunk riding with a decode
        step): one per batch bucket with dynamic lengths when prompts run in chunks, else none
        (with static lengths the chunks run as prefill calls of their own)."""
        return list(self.batch_sizes) if self.dynamic_lengths and self.chunk_tokens < self.max_len else []

    @property
    def num_graphs(self) -> int:
        return len(self.prefill_graphs()) + len(self.decode_graphs())

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
        if self.prefill_tokens is not None and self.prefill_tokens < 1:
            raise ValueError(f"buckets.prefill_tokens must be a positive int, got {self.prefill_tokens}")
        if self.dynamic_lengths:
            if self.prefill_lens != (max_seq_len,) or self.context_lens != (max_seq_len,):
                raise ValueError("with dynamic lengths, prefill_lens and context_lens are just (max_seq_len,)")
            if not 2 <= self.length_multiple <= max_seq_len // 2:
                # a dynamic dimension needs a range of at least two values above 1 (torch
                # specializes sizes 0 and 1)
                raise ValueError(f"buckets.length_multiple must be between 2 and max_seq_len / 2 = "
                                 f"{max_seq_len // 2} for dynamic lengths, got {self.length_multiple}")


def _smallest_at_least(sizes, n: int, what: str) -> int:
    for size in sizes:
        if size >= n:
            return size
    raise ValueError(f"{what} {n} exceeds the largest bucket {sizes[-1]}")
