"""Shape buckets and the compiled prefill / decode graphs.

Every call is padded up to a bucket: prefill to [batch bucket, length bucket], decode to
[batch bucket, 1] attending over a context bucket (the first L cache positions, L the smallest
context bucket that holds every running sequence; with no context buckets, the whole cache).
With `torch.compile(fullgraph=True, dynamic=False)` each bucket is one graph, compiled on first
use (or ahead of time by `warmup`). After that, any mix of requests inside the warmed buckets
replays existing graphs: no recompiles, no graph breaks.
"""
from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass

import torch
import torch._dynamo

from zoo.kv_cache import KVCache


def _log(msg: str) -> None:
    print(f"[zoo] {msg}", file=sys.stderr, flush=True)


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


class GraphRunner:
    """Calls prefill / decode with inputs padded to a bucket. The two callables come from a backend:
    the eager module methods, torch.compile'd ones (see compile_entry_points), or exported graphs."""

    def __init__(self, prefill_fn, decode_fn, cache: KVCache, buckets: Buckets, compiled: bool,
                 description: str = "eager", graph_cache=None):
        self._prefill, self._decode = prefill_fn, decode_fn
        self.cache, self.buckets, self.compiled = cache, buckets, compiled
        self.description = description  # backend and options, shown when a graph compiles
        self.graph_cache = graph_cache  # zoo.graph_cache.GraphCache or None
        self.first_call_seconds: dict[tuple, float] = {}  # bucket -> time of its first call (compile)
        self.log_compiles = True  # False on tensor-parallel ranks other than 0 (one log line per compile)

    @property
    def device(self) -> torch.device:
        return self.cache.k[0].device

    @property
    def compile_seconds(self) -> float:
        return sum(self.first_call_seconds.values()) if self.compiled else 0.0

    def _timed_first_call(self, key: tuple, fn, *args, **kwargs):
        if key in self.first_call_seconds:
            return fn(*args, **kwargs)
        if self.compiled and self.log_compiles:
            what = {"prefill": "length", "decode": "context"}[key[0]]
            _log(f"compiling {key[0]} graph for batch {key[1]}" + (f", {what} {key[2]}" if len(key) > 2 else "")
                 + f" ({self.description})")
        start = time.perf_counter()
        with self.graph_cache.compiling() if self.graph_cache else contextlib.nullcontext():
            out = fn(*args, **kwargs)
        self.first_call_seconds[key] = time.perf_counter() - start
        if self.compiled and self.log_compiles:
            _log(f"  ... {self.first_call_seconds[key]:.1f} s")
        return out

    @torch.no_grad()
    def prefill(self, prompts: list[list[int]], slots: list[int]) -> torch.Tensor:
        """Prompts (token ids) written into cache `slots` -> logits of each prompt's last token [n, V]."""
        n = len(prompts)
        B = self.buckets.batch_for(n)
        S = self.buckets.prefill_len_for(max(len(p) for p in prompts))
        input_ids = torch.zeros(B, S, dtype=torch.long)
        lengths = torch.ones(B, dtype=torch.long)  # padding rows: length 1 ...
        slot_ids = torch.full((B,), self.cache.scratch_slot, dtype=torch.long)  # ... in the scratch slot
        for i, (prompt, slot) in enumerate(zip(prompts, slots)):
            input_ids[i, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
            lengths[i], slot_ids[i] = len(prompt), slot
        dev = self.device
        logits = self._timed_first_call(("prefill", B, S), self._prefill, input_ids.to(dev), lengths.to(dev),
                                        slot_ids.to(dev), self.cache.k, self.cache.v)
        return logits[:n]

    @torch.no_grad()
    def decode(self, input_ids: torch.Tensor, positions: torch.Tensor, context: int | None = None) -> torch.Tensor:
        """input_ids [B, 1], positions [B] on the device, B a batch bucket -> logits [B, V].
        context: the longest sequence among the rows, counting this step's token (host-side
        bookkeeping, never read from the device); None attends over the whole cache."""
        B = input_ids.shape[0]
        L = None if context is None else self.buckets.context_len_for(context)
        key, kwargs = (("decode", B), {}) if L is None else (("decode", B, L), {"context_len": L})
        return self._timed_first_call(key, self._decode, input_ids, positions, self.cache.k, self.cache.v, **kwargs)

    def warmup(self, batch_sizes=None, prefill_lens=None, decode: bool = True, context_lens=None) -> None:
        """Build (compile) the graphs for these buckets now, writing only to scratch cache space.
        context_lens: the decode context buckets to build (default: all)."""
        batch_sizes = batch_sizes or self.buckets.batch_sizes
        prefill_lens = self.buckets.prefill_lens if prefill_lens is None else prefill_lens
        contexts = self.buckets.context_lens if context_lens is None else context_lens
        contexts = sorted({self.buckets.context_len_for(c) for c in contexts}) or [None]
        scratch_slot, scratch_pos = self.cache.scratch_slot, self.cache.scratch_position
        dev = self.device
        with torch.no_grad():
            for B in batch_sizes:
                B = self.buckets.batch_for(B)
                for S in prefill_lens:
                    S = self.buckets.prefill_len_for(S)
                    if ("prefill", B, S) not in self.first_call_seconds:
                        self._timed_first_call(
                            ("prefill", B, S), self._prefill, torch.zeros(B, S, dtype=torch.long, device=dev),
                            torch.ones(B, dtype=torch.long, device=dev),
                            torch.full((B,), scratch_slot, dtype=torch.long, device=dev), self.cache.k, self.cache.v)
                for L in contexts if decode else []:
                    # idle rows write only at the scratch position
                    self.decode(torch.zeros(B, 1, dtype=torch.long, device=dev),
                                torch.full((B,), scratch_pos, dtype=torch.long, device=dev), L)


def compile_entry_points(module: torch.nn.Module, backend: str, options: dict, buckets: Buckets):
    """torch.compile the module's prefill and decode: fullgraph (a graph break is an error, so no
    host sync can hide inside), static shapes (one graph per bucket)."""
    # Every bucket is one more cache entry on the same code object; allow them all.
    n_graphs = len(buckets.batch_sizes) * (len(buckets.prefill_lens) + max(1, len(buckets.context_lens)))
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, n_graphs + 2)
    if backend == "inductor":
        return tuple(torch.compile(fn, fullgraph=True, dynamic=False, options=options)
                     for fn in (module.prefill, module.decode))
    if backend == "torchair":
        from zoo.backends.npu import npu_backend

        compiler = npu_backend(options)  # torchair.get_npu_backend(compiler_config=...)
        return tuple(torch.compile(fn, fullgraph=True, dynamic=False, backend=compiler)
                     for fn in (module.prefill, module.decode))
    raise ValueError(f"unknown compile backend {backend!r}")
