"""GraphRunner: calls prefill / decode with inputs padded to a shape bucket (zoo.graphs.buckets).

The callables come from a backend (zoo.graphs.build.build_runner): the eager module methods,
torch.compile'd ones or exported graphs. With `torch.compile(fullgraph=True, dynamic=False)` each
bucket is one graph, compiled on first use (or ahead of time by `warmup`). After that, any mix of
requests inside the warmed buckets replays existing graphs: no recompiles, no graph breaks.
"""
from __future__ import annotations

import contextlib
import threading
import time

import torch

from zoo.graphs.buckets import Buckets
from zoo.graphs.kv_cache import KVCache
from zoo.log import log


class GraphRunner:
    """Calls prefill / decode with inputs padded to a bucket. The two callables come from a backend:
    the eager module methods, torch.compile'd ones or exported graphs (zoo.graphs.build)."""

    def __init__(self, prefill_fn, decode_fn, cache: KVCache, buckets: Buckets, compiled: bool,
                 description: str = "eager", graph_cache=None, module: torch.nn.Module | None = None,
                 mixed_fn=None):
        self._prefill, self._decode = prefill_fn, decode_fn
        # prefill_and_decode (a prompt chunk and a decode step in one forward); None where the
        # backend has no such graph (static buckets, exports, torchair): chunks then run apart
        self._mixed = mixed_fn
        self.module = module  # the eager model: prompt logprobs, and buckets not compiled yet, run on it
        self._background: threading.Thread | None = None  # compiles every bucket (compile_in_background)
        self.eager_calls = 0  # calls that ran eagerly because their graph was still being compiled
        self.cache, self.buckets, self.compiled = cache, buckets, compiled
        self.description = description  # backend and options, shown when a graph compiles
        self.graph_cache = graph_cache  # zoo.graphs.cache.GraphCache or None
        self.first_call_seconds: dict[tuple, float] = {}  # bucket -> time of its first call (compile)
        self.log_compiles = True  # False on tensor-parallel ranks other than 0 (one log line per compile)

    @property
    def device(self) -> torch.device:
        return self.cache.k[0].device

    @property
    def compile_seconds(self) -> float:
        return sum(self.first_call_seconds.values()) if self.compiled else 0.0

    @property
    def graphs_total(self) -> int:
        """Graphs of every bucket (Buckets.prefill_graphs, decode_graphs and mixed_graphs)."""
        return self.buckets.num_graphs + (len(self.buckets.mixed_graphs()) if self.can_mix and self.compiled else 0)

    @property
    def can_mix(self) -> bool:
        """Whether a prompt chunk can run in one forward with a decode step (prefill_and_decode)."""
        return self._mixed is not None

    @property
    def graphs_ready(self) -> int:
        return len(self.first_call_seconds)

    @property
    def compiling_in_background(self) -> bool:
        return self._background is not None and self._background.is_alive()

    def compile_in_background(self) -> None:
        """Compile every bucket's graph in a background thread; until a bucket's graph is ready, its
        calls run eagerly on the model (the same tokens: compiled matches eager), so a server answers
        from its first second. Only for compiled runners with the eager model at hand."""
        if not self.compiled or self.module is None or self._background is not None:
            return
        # torch's dynamo and inductor configs are per thread: the compiling thread takes this one's
        configs = {module: module.get_config_copy() for module in (torch._dynamo.config, torch._inductor.config)}
        self._background = threading.Thread(target=self._compile_all, args=(configs,), name="zoo-compile",
                                            daemon=True)
        self._background.start()

    def _compile_all(self, configs: dict) -> None:
        with contextlib.ExitStack() as stack:
            for module, values in configs.items():
                here = module.get_config_copy()
                stack.enter_context(module.patch({k: v for k, v in values.items() if here.get(k) != v}))
            self._compile_every_bucket()

    def _compile_every_bucket(self) -> None:
        # decode first (every request needs it at every step), small shapes first
        b = self.buckets
        todo = [self._decode_key(B, L) for B, L in b.decode_graphs()]
        todo += [self._prefill_key(B, S, T) for B, S, T in b.prefill_graphs()]
        todo += [("mixed", B) for B in b.mixed_graphs()] if self.can_mix else []
        for key in todo:
            try:
                self._build(key)
            except Exception as e:  # noqa: BLE001 - that bucket keeps running eagerly; the log says why
                log(f"background compile of {key} failed; it keeps running eagerly: {type(e).__name__}: {e}")
        log(f"background compile done: {self.graphs_ready} of {self.graphs_total} graphs ready")

    def _prefill_key(self, B: int, S: int | None, T: int | None) -> tuple:
        """The graph of a prefill of batch bucket B, length bucket S over context T (None: the
        whole block table); one per B with dynamic lengths."""
        return ("prefill", B) if self.buckets.dynamic_lengths else ("prefill", B, S, T)

    def _decode_key(self, B: int, L: int | None) -> tuple:
        """The graph of a decode of batch bucket B over context L (None: the whole cache); one per B
        with dynamic lengths."""
        return ("decode", B) if L is None or self.buckets.dynamic_lengths else ("decode", B, L)

    def _build(self, key: tuple) -> None:
        """Build one bucket's graph with scratch inputs (writing only to the scratch block); a
        dynamic-length graph at the smallest length."""
        if key in self.first_call_seconds:
            return
        smallest = self.buckets.length_multiple if self.buckets.dynamic_lengths else None
        with torch.no_grad():
            if key[0] == "prefill":
                S, T = (key[2], key[3]) if len(key) > 2 else (smallest, smallest)
                kwargs = {} if T is None else {"context_len": T}
                self._timed_first_call(key, self._prefill, *self.cache.scratch_prefill_inputs(key[1], S), **kwargs)
            elif key[0] == "mixed":
                prefill_inputs = self.cache.scratch_prefill_inputs(1, smallest)[:4]
                self._timed_first_call(key, self._mixed, *prefill_inputs, *self.cache.scratch_decode_inputs(key[1]),
                                       prefill_context=smallest, decode_context=smallest)
            else:
                length = key[2] if len(key) > 2 else smallest
                kwargs = {} if length is None else {"context_len": length}
                self._timed_first_call(key, self._decode, *self.cache.scratch_decode_inputs(key[1]), **kwargs)

    def wait_for_background_compile(self, timeout_s: float | None = None) -> bool:
        """Wait until the background compile is done; True when it is (or none ran)."""
        if self._background is not None:
            self._background.join(timeout_s)
        return not self.compiling_in_background

    def _timed_first_call(self, key: tuple, fn, *args, **kwargs):
        if key in self.first_call_seconds:
            return fn(*args, **kwargs)
        if self.compiling_in_background and threading.current_thread() is not self._background:
            self.eager_calls += 1  # its graph is not ready yet: run it eagerly meanwhile
            eager = {"prefill": self.module.prefill, "decode": self.module.decode,
                     "mixed": self.module.prefill_and_decode}[key[0]]
            return eager(*args, **kwargs)
        name = _graph_name(key, self.buckets.dynamic_lengths)
        cached = self.graph_cache is not None and self.graph_cache.has(name)
        if self.compiled and self.log_compiles:
            log(f"{'loading cached' if cached else 'compiling'} {name} ({self.description})")
        start = time.perf_counter()
        with self.graph_cache.compiling(name) if self.graph_cache else contextlib.nullcontext():
            out = fn(*args, **kwargs)
        self.first_call_seconds[key] = time.perf_counter() - start
        if self.compiled and self.log_compiles:
            ready = f" ({self.graphs_ready} of {self.graphs_total} graphs ready)" if self._background else ""
            log(f"  ... {self.first_call_seconds[key]:.1f} s{ready}")
        return out

    @torch.no_grad()
    def prefill(self, prompts: list[list[int]], slots: list[int], starts: list[int] | None = None) -> torch.Tensor:
        """Prompts (token ids) written into cache `slots` -> logits of each prompt's last token [n, V].
        starts: per prompt, the positions already in its slot's blocks (a cached prefix, earlier
        chunks; default 0); only prompt[start:] is computed, and it must fit one call
        (buckets.chunk_tokens). Blocks the slots lack for their prompts are reserved here. A prompt
        sent to the scratch slot runs in a temporary slot whose blocks are freed after the call
        (its logits only). A group larger than one call may run (buckets.prefill_tokens) runs as
        several."""
        starts = starts or [0] * len(prompts)
        scratch = self.cache.scratch_slot
        temporary = [self.cache.alloc() if slot == scratch else None for slot in slots]
        try:
            slots = [slot if tmp is None else tmp for slot, tmp in zip(slots, temporary)]
            for prompt, slot, start in zip(prompts, slots, starts):
                self._check_chunk(prompt, start)
                if not self.cache.reserve(slot, len(prompt)):
                    raise RuntimeError(f"not enough free KV blocks for a {len(prompt)}-token prompt "
                                       f"({self.cache.free_blocks} free)")
            calls, first = [], 0
            while first < len(prompts):
                end = first + 1
                while end < len(prompts) and self.buckets.prefill_fits(
                        end + 1 - first,
                        max(len(p) - s for p, s in zip(prompts[first:end + 1], starts[first:end + 1]))):
                    end += 1
                calls.append(self._prefill_call(prompts[first:end], slots[first:end], starts[first:end]))
                first = end
            return calls[0] if len(calls) == 1 else torch.cat(calls)
        finally:
            for tmp in temporary:
                if tmp is not None:
                    self.cache.free(tmp)

    def _check_chunk(self, prompt: list[int], start: int) -> None:
        """Positions [start, len(prompt)) must be one prefill call's worth (buckets.chunk_tokens)."""
        if not 0 <= start < len(prompt) or len(prompt) - start > self.buckets.chunk_tokens:
            raise ValueError(f"prefill of positions [{start}, {len(prompt)}) is not one chunk of at most "
                             f"{self.buckets.chunk_tokens} tokens")

    def _prefill_call(self, prompts: list[list[int]], slots: list[int], starts: list[int]) -> torch.Tensor:
        n = len(prompts)
        B = self.buckets.batch_for(n)
        S, T, inputs = self._prefill_inputs(prompts, slots, starts, B)
        kwargs = {} if T is None else {"context_len": T}
        logits = self._timed_first_call(self._prefill_key(B, S, T), self._prefill, *inputs, self.cache.k,
                                        self.cache.v, **kwargs)
        return logits[:n]

    def _prefill_inputs(self, prompts: list[list[int]], slots: list[int], starts: list[int], B: int) -> tuple:
        """-> (length bucket S, context bucket T, (input_ids [B, S], start_pos [B], lengths [B],
        block_tables [B, NB])) on the device; rows past the prompts are padding in the scratch slot."""
        S = self.buckets.prefill_len_for(max(len(p) - s for p, s in zip(prompts, starts)))
        T = self.buckets.context_len_for(max(S, *(len(p) for p in prompts)))  # (a graph's context holds its length)
        input_ids = torch.zeros(B, S, dtype=torch.long)
        start_pos = torch.zeros(B, dtype=torch.long)
        lengths = torch.ones(B, dtype=torch.long)  # padding rows: length 1 in the scratch slot
        rows = [self.cache.scratch_slot] * B
        for i, (prompt, slot, start) in enumerate(zip(prompts, slots, starts)):
            input_ids[i, : len(prompt) - start] = torch.tensor(prompt[start:], dtype=torch.long)
            start_pos[i], lengths[i], rows[i] = start, len(prompt) - start, slot
        dev = self.device
        tables = self.cache.block_tables[torch.tensor(rows, device=dev)]  # [B, blocks_per_seq + 1]
        return S, T, (input_ids.to(dev), start_pos.to(dev), lengths.to(dev), tables)

    @torch.no_grad()
    def prefill_and_decode(self, prompt: list[int], slot: int, start: int, input_ids: torch.Tensor,
                           positions: torch.Tensor, context: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward (can_mix): positions [start, len(prompt)) of a prompt into `slot`, whose
        blocks must already hold them, and a decode step as in `decode` (input_ids [B, 1],
        positions [B], context the longest decoding sequence) -> (logits of the prompt's last
        token [V], the decode rows' logits [B, V])."""
        self._check_chunk(prompt, start)
        if self.cache.capacity(slot) < len(prompt):
            raise ValueError(f"slot {slot} has blocks for {self.cache.capacity(slot)} positions, not the prompt's "
                             f"{len(prompt)}")
        B = input_ids.shape[0]
        _, T, prefill_inputs = self._prefill_inputs([prompt], [slot], [start], 1)
        L = self._decode_context(context)
        logits = self._timed_first_call(("mixed", B), self._mixed, *prefill_inputs, input_ids, positions,
                                        self.cache.block_tables[:B], self.cache.k, self.cache.v,
                                        prefill_context=T, decode_context=L)
        return logits[0], logits[1:]

    @torch.no_grad()
    def prompt_hidden(self, prompt: list[int], slot: int) -> torch.Tensor:
        """Hidden states of every prompt position [S, D], eagerly on the model (no bucket, no graph),
        for prompt logprobs, a rarely asked-for extra pass. It runs over the request's own slot,
        whose blocks already hold this prompt's KV: it writes the same keys and values again."""
        if self.module is None:
            raise RuntimeError("prompt logprobs need the eager model, and this runner was built without it")
        if self.cache.capacity(slot) < len(prompt):
            raise ValueError(f"slot {slot} has blocks for {self.cache.capacity(slot)} positions, not the "
                             f"prompt's {len(prompt)}")
        dev = self.device
        input_ids = torch.tensor([prompt], dtype=torch.long, device=dev)
        start = torch.zeros(1, dtype=torch.long, device=dev)
        lengths = torch.tensor([len(prompt)], dtype=torch.long, device=dev)
        tables = self.cache.block_tables[slot:slot + 1]
        return self.module.prefill_hidden(input_ids, start, lengths, tables, self.cache.k, self.cache.v,
                                          self.buckets.context_len_for(len(prompt)))[0]

    @torch.no_grad()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states [..., D] from prompt_hidden -> float32 logits [..., V] (eager)."""
        return self.module.compute_logits(hidden)

    @torch.no_grad()
    def decode(self, input_ids: torch.Tensor, positions: torch.Tensor, context: int | None = None) -> torch.Tensor:
        """input_ids [B, 1], positions [B] on the device, B a batch bucket -> logits [B, V]. Row i
        is slot i, whose blocks must cover its position (KVCache.reserve).
        context: the longest sequence among the rows, counting this step's token (host-side
        bookkeeping, never read from the device); None attends over the whole cache."""
        B = input_ids.shape[0]
        L = self._decode_context(context)
        kwargs = {} if L is None else {"context_len": L}
        return self._timed_first_call(self._decode_key(B, L), self._decode, input_ids, positions,
                                      self.cache.block_tables[:B], self.cache.k, self.cache.v, **kwargs)

    def _decode_context(self, context: int | None) -> int | None:
        """The context bucket a decode over sequences of up to `context` tokens attends over."""
        L = None if context is None else self.buckets.context_len_for(context)
        if L is None and self.buckets.dynamic_lengths:
            L = self.buckets.max_len  # the whole cache
        return L

    def warmup(self, batch_sizes=None, prefill_lens=None, decode: bool = True, context_lens=None) -> None:
        """Build (compile) the graphs for these buckets now, writing only to scratch cache space
        (with dynamic lengths, one per batch size whatever the lengths). context_lens: the decode
        context buckets to build (default: all). Prefill shapes past buckets.prefill_tokens have
        no graph (such groups are split) and are skipped."""
        self.wait_for_background_compile()  # (it builds every bucket)
        b = self.buckets
        batch_sizes = batch_sizes or b.batch_sizes
        prefill_lens = b.prefill_lens if prefill_lens is None else prefill_lens
        contexts = b.context_lens if context_lens is None else context_lens
        contexts = sorted({b.context_len_for(c) for c in contexts}) or [None]
        lens = {b.prefill_len_for(S) for S in prefill_lens}
        for B in batch_sizes:
            B = b.batch_for(B)
            for gB, S, T in b.prefill_graphs():
                if gB == B and (bool(lens) if b.dynamic_lengths else S in lens):
                    self._build(self._prefill_key(gB, S, T))
            for L in contexts if decode else []:
                self._build(self._decode_key(B, L))
            if decode and self.can_mix and B in b.mixed_graphs():
                self._build(("mixed", B))


def _graph_name(key: tuple, dynamic_lengths: bool) -> str:
    """How a bucket's graph is named in the log and the graph cache's manifest."""
    name = f"{key[0]} graph for batch {key[1]}"
    if key[0] == "mixed":
        return f"prefill-and-decode graph for decode batch {key[1]}, dynamic lengths"
    if key[0] == "prefill" and len(key) > 2:
        return name + f", length {key[2]}" + ("" if key[3] is None else f", context {key[3]}")
    if len(key) > 2:
        return name + f", context {key[2]}"
    return name + (", dynamic length" if dynamic_lengths and key[0] == "prefill" else
                   ", dynamic context" if dynamic_lengths else "")
