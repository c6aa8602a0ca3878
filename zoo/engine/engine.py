"""The generation engine: continuous batching over the paged KV cache.

Each request waits in a queue, is prefilled into a free batch slot's KV blocks (reusing the cached
blocks of its prompt's prefix, in chunks when the prompt is long), then decodes one token per
step together with every other running request (decode batch row i = slot i), taking a new
block whenever it crosses into one; when the pool is out of blocks the newest request is
preempted and later re-prefilled. It leaves at its own EOS / stop token / stop string /
max_new_tokens / context end, and its slot and blocks go to the next waiting request between
steps — the graphs never change shape outside their buckets.

Per step the only host<->device traffic is reading the B sampled token ids (for stop checks and
streaming). Token ids, positions and sampling parameters of running slots stay on the device.
"""
from __future__ import annotations

import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field

import torch

from zoo.engine.request import PrefilledKV, Request, StreamEvent, check_request
from zoo.engine.sampling import (LogitsState, SamplingParams, TokenLogprob, apply_penalties, host_logprobs, sample,
                                 token_logprobs)
from zoo.errors import RequestError
from zoo.graphs.kv_cache import KVCache
from zoo.graphs.runner import GraphRunner
from zoo.log import log
from zoo.tokenizers.base import IncrementalDetokenizer, Tokenizer


@dataclass
class _PrefillRow:
    """One row of a prefill call: positions [start, end) of the request's prefill_ids, into its slot."""

    req: Request
    slot: int
    start: int
    end: int
    fresh: bool = False  # admitted for this call (not a later chunk)
    followers: list[tuple[Request, int]] = field(default_factory=list)  # same prompt: (request, slot)


class Engine:
    """Continuous batching over one model's GraphRunner and KV cache (see the module docstring)."""

    def __init__(self, runner: GraphRunner, cache: KVCache, tokenizer: Tokenizer | None,
                 eos_token_ids: set[int], max_seq_len: int, vocab_size: int):
        self.runner, self.cache, self.tokenizer = runner, cache, tokenizer
        self.eos_token_ids = set(eos_token_ids)
        self.max_seq_len, self.vocab_size = max_seq_len, vocab_size
        self.waiting: deque[Request] = deque()
        self.running: dict[int, Request] = {}  # slot -> request decoding there
        self.prefilling: dict[int, Request] = {}  # slot -> request whose prompt is prefilled in chunks
        self.lock = threading.RLock()
        self._submissions = 0  # submit() calls so far
        self.failed_steps = 0  # prefills / decodes that raised (their requests failed)
        self.preemptions = 0  # requests whose blocks were taken back when the pool ran out
        self._prefilled_last_step = False  # the next step decodes first (see step)
        self._default_generator = torch.Generator(device=runner.device)
        self._default_generator.seed()
        n, dev = cache.num_slots, runner.device
        # Device-resident state of every slot; decode reads the first B rows.
        self.tokens = torch.zeros(n, 1, dtype=torch.long, device=dev)  # last token per slot
        self.positions = torch.full((n,), cache.scratch_position, dtype=torch.long, device=dev)
        self.active = torch.zeros(n, dtype=torch.long, device=dev)  # 1 while a request decodes there
        self.temperature = torch.zeros(n, device=dev)
        self.top_k = torch.full((n,), vocab_size, dtype=torch.long, device=dev)
        self.top_p = torch.ones(n, device=dev)
        self.logits_state = LogitsState.empty(n, vocab_size, dev)  # penalties, bias, min_p per slot

    def seed_default_generator(self, seed: int) -> None:
        """Seed the noise of sampled requests that bring no seed of their own (tensor-parallel ranks
        use one seed so they sample identical tokens)."""
        self._default_generator.manual_seed(seed)

    # ---- submitting ------------------------------------------------------------------------
    def make_request(self, index: int, prompt_ids: list[int], params: SamplingParams,
                     prompt: str | None = None) -> Request:
        """Validate one request; raises RequestError and queues nothing if it cannot run."""
        check_request(index, prompt_ids, params, self.max_seq_len, self.vocab_size, self.tokenizer is not None)
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.runner.device)
            generator.manual_seed(params.seed)
        detok = IncrementalDetokenizer(self.tokenizer, prompt_ids) if self.tokenizer else None
        return Request(index, prompt, list(prompt_ids), params, detok, generator)

    def submit(self, requests: list[Request]) -> None:
        """Queue requests; the ones of one call share a submission, and admission takes turns
        between submissions (see _next_waiting)."""
        with self.lock:
            self._submissions += 1
            for req in requests:
                req.submission = self._submissions
            self.waiting.extend(requests)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.prefilling)

    # ---- one scheduler step ----------------------------------------------------------------
    def step(self) -> None:
        """One engine step: admit waiting requests into free slots (prefill) or, when nothing was
        prefilled, decode one token for all running requests.

        A step that prefilled returns without decoding, so a new request's first token reaches its
        caller as soon as it exists (a prefill-then-decode step would hold it back for a whole
        decode); the running requests decode on the next step, at the same total cost. Steps
        take turns: after a prefill, the next step decodes (when anything runs), so requests
        arriving one after another, or a queue admitted a group at a time, never stall the
        running streams for more than one prefill call. While a long prompt is prefilled in
        chunks and others run, each step runs its next chunk and their decode in one forward
        where the runner can (runner.can_mix), so its prefill does not stall them at all; new
        requests are admitted after its last chunk.

        An exception inside a prefill fails that prefill's requests, one inside a decode the
        running requests (they share the step); every other request goes on and the engine stays
        usable. The step does not raise: the error is in the failed requests' results (and
        failed_steps counts such steps)."""
        with self.lock:
            if self.running and self.prefilling and self.runner.can_mix:
                self._prefilled_last_step = False
                self._chunk_and_decode_step()
                return
            decode_turn = self._prefilled_last_step and bool(self.running)
            self._prefilled_last_step = False
            if not decode_turn and self._admit():
                self._prefilled_last_step = True
                return
            if self.running:
                self._guarded(list(self.running.values()), "decode", self._decode_step)

    def _admit(self) -> bool:
        """Requests prefilled elsewhere are merged into free slots; then one prefill call runs: the
        next chunk of prompts being prefilled in chunks and new requests, as many as one call takes
        (the largest batch bucket, buckets.prefill_tokens padded tokens, free slots and KV blocks).
        The running requests decode between calls. True when a prefill ran (or failed)."""
        while self.waiting and self.cache.num_free():
            req = self._next_waiting([], prefilled=True)
            if req is None or not self._can_take(self.cache.blocks_for(len(req.prompt_ids) + 1)):
                break
            self.waiting.remove(req)
            self._guarded([req], "KV import", self._merge, req)
        rows = self._prefill_group()
        if not rows:
            return False
        self._guarded([r.req for r in rows] + [f for r in rows for f, _ in r.followers], "prefill", self._prefill, rows)
        return True

    def _can_take(self, blocks: int) -> bool:
        """Whether a new request may take `blocks` KV blocks now: when others hold blocks, enough
        stay free for each of them to grow by one block (else decode would preempt at once)."""
        busy = len(self.running) + len(self.prefilling)
        return blocks + busy <= self.cache.free_blocks

    def _prefill_group(self) -> list[_PrefillRow]:
        """The rows of the next prefill call, taken off the queue and given slots and blocks: first
        the next chunk of each request already being prefilled (oldest first), then new requests
        in _next_waiting's order, while one call takes them. A new request reuses the cached blocks
        of its prompt's prefix; one whose prompt equals a row that finishes in this call shares
        that row (n samples of a prompt)."""
        b = self.runner.buckets
        rows = [_PrefillRow(req, slot, req.computed, min(len(req.prefill_ids), req.computed + b.chunk_tokens))
                for slot, req in sorted(self.prefilling.items(), key=lambda item: item[1].t_submit)]
        while self.waiting and self.cache.num_free() and len(rows) < b.batch_sizes[-1]:
            req = self._next_waiting([r.req for r in rows], prefilled=False)
            if req is None:
                break
            ids = req.prefill_ids
            twin = next((r for r in rows if r.fresh and r.req.prefill_ids == ids and r.end == len(ids)), None)
            if twin is not None:
                if not self._can_take(1):
                    break
                self.waiting.remove(req)
                slot = self.cache.alloc()
                req.slot, self.prefilling[slot] = slot, req  # (so a failed prefill frees its slot too)
                twin.followers.append((req, slot))
                continue
            if any(r.req.prefill_ids == ids for r in rows):
                break  # the same prompt is still being prefilled: then its blocks are cached
            slot = self.cache.alloc()
            start = self.cache.share_prefix(slot, ids)
            end = min(len(ids), start + b.chunk_tokens)
            longest = max([end - start] + [r.end - r.start for r in rows])
            if (rows and not b.prefill_fits(len(rows) + 1, longest)) or \
                    (not self._can_take(self.cache.blocks_to_reserve(slot, len(ids))) and (rows or self.running)):
                self.cache.free(slot)
                break
            if not self.cache.reserve(slot, len(ids)):  # nothing else holds blocks: then it always fits
                self.cache.free(slot)
                break
            self.waiting.remove(req)
            req.slot, req.computed = slot, start
            self.prefilling[slot] = req
            self._set_sampling([req], [slot])
            rows.append(_PrefillRow(req, slot, start, end, fresh=True))
        return rows

    def _next_waiting(self, picked: list[Request], prefilled: bool | None = None) -> Request | None:
        """The waiting request to admit next: of the submission with the fewest requests running
        (or picked for this group), the oldest; ties go to the older submission. So one call with
        many prompts cannot hold every slot while another caller's request waits. `prefilled`
        True / False restricts the choice to requests prefilled elsewhere / not."""
        load: dict[int, int] = {}
        for req in list(self.running.values()) + list(self.prefilling.values()) + picked:
            load[req.submission] = load.get(req.submission, 0) + 1
        best = None
        for req in self.waiting:
            if prefilled is not None and (req.prefilled is not None) != prefilled:
                continue
            if best is None or load.get(req.submission, 0) < load.get(best.submission, 0):
                best = req
        return best

    def _merge(self, req: Request, slot: int | None = None) -> None:
        """Write a request prefilled elsewhere into `slot` (default: the lowest free one) and start
        it; on failure the slot is free again and the error propagates."""
        slot = self.cache.alloc(slot)
        try:
            self.cache.import_slot(slot, req.prefilled.k, req.prefilled.v)
        except Exception:
            self.cache.free(slot)
            raise
        req.prompt_logprobs = req.prefilled.prompt_logprobs
        self._set_sampling([req], [slot])
        self._start([req], [slot], [req.prefilled.first_token], [req.prefilled.first_logprob])

    def _prefill(self, rows: list[_PrefillRow]) -> None:
        """Run one prefill call over the rows' chunks (see _prefill_done)."""
        logits = self.runner.prefill([r.req.prefill_ids[:r.end] for r in rows], [r.slot for r in rows],
                                     [r.start for r in rows])  # [n, V]
        self._prefill_done(rows, logits)

    def _prefill_done(self, rows: list[_PrefillRow], logits: torch.Tensor) -> None:
        """After a prefill call (logits [n, V], one per row): the rows whose prefill is complete
        sample their next token (with their followers: each its own, from the same logits) and
        start decoding, the others wait for their next chunk."""
        done = []
        for i, r in enumerate(rows):
            r.req.computed = r.end
            self.cache.cache_prefix(r.slot, r.req.prefill_ids, r.end)
            if r.end < len(r.req.prefill_ids):
                continue
            done.append((i, r.req, r.slot))
            for follower, slot in r.followers:
                self.cache.copy_slot(r.slot, slot, r.end)  # blocks checked by _can_take
                follower.computed = r.end
                self._set_sampling([follower], [slot])
                done.append((i, follower, slot))
        if not done:
            return
        group, slots = [req for _, req, _ in done], [slot for _, _, slot in done]
        self._prompt_logprobs(group)
        logits = logits[torch.tensor([i for i, _, _ in done], device=logits.device)]  # [n, V]
        tokens, logprobs = self._sample(logits, torch.tensor(slots, device=logits.device), group)
        host_tokens = tokens.tolist()
        self._start(group, slots, host_tokens, self._logprobs_to_host(logprobs, host_tokens, group))

    def _chunk_and_decode_step(self) -> None:
        """The next chunk of the oldest prompt being prefilled in chunks and a decode step of the
        running requests, in one forward (runner.prefill_and_decode). A failure of the forward
        fails both."""
        self._grow_or_preempt()  # (may preempt the prompt being prefilled, or running requests)
        if not self.running:
            return  # the next step goes on with the prompt
        if not self.prefilling:  # preempted to make room
            self._guarded(list(self.running.values()), "decode", self._decode_running)
            return
        slot, req = min(self.prefilling.items(), key=lambda item: item[1].t_submit)
        row = _PrefillRow(req, slot, req.computed,
                          min(len(req.prefill_ids), req.computed + self.runner.buckets.chunk_tokens))
        B, context = self._decode_shape()
        running = list(self.running.values())
        out = self._guarded(running + [req], "prefill and decode", self.runner.prefill_and_decode,
                            req.prefill_ids[:row.end], slot, row.start, self.tokens[:B], self.positions[:B], context)
        if out is not None:
            prefill_logits, logits = out
            self._guarded(running, "decode", self._decode_done, logits, B)
            self._guarded([req], "prefill", self._prefill_done, [row], prefill_logits[None])

    def _guarded(self, requests: list[Request], where: str, fn, *args):
        """fn(*args), or None when it raised: then these requests fail with its error."""
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 - reported through the requests it concerns
            self._fail_requests(requests, e, where)
            return None

    def _prompt_logprobs(self, group: list[Request]) -> None:
        """Logprobs of the prompt tokens, for the requests that asked (SamplingParams.prompt_logprobs);
        requests with the same prompt share one scoring pass."""
        scored: dict[tuple[int, ...], list[TokenLogprob | None]] = {}
        for req in group:
            k = req.params.prompt_logprobs
            if k is None or req.prompt_logprobs is not None:  # (a preempted request scored them before)
                continue
            key = tuple(req.prompt_ids)
            if key not in scored:
                most = max(r.params.prompt_logprobs for r in group
                           if r.params.prompt_logprobs is not None and r.prompt_ids == req.prompt_ids)
                scored[key] = self._score_prompt(req.prompt_ids, req.slot, most)
            req.prompt_logprobs = [None] + [TokenLogprob(e.token_id, e.logprob, e.top[:k]) for e in scored[key][1:]]

    def _score_prompt(self, prompt: list[int], slot: int, k: int, chunk: int = 256) -> list[TokenLogprob | None]:
        """[None, then each prompt token's logprob given the tokens before it, with k alternatives].
        The logits are made `chunk` positions at a time, so [S, V] never exists at once."""
        hidden = self.runner.prompt_hidden(prompt, slot)[:-1]  # [S - 1, D]: position i predicts token i + 1
        targets = torch.tensor(prompt[1:], device=hidden.device)  # [S - 1]
        out: list[TokenLogprob | None] = [None]
        for lo in range(0, len(targets), chunk):
            logits = self.runner.compute_logits(hidden[lo:lo + chunk])  # [c, V]
            tokens = prompt[1 + lo:1 + lo + chunk]
            out += host_logprobs(token_logprobs(logits, targets[lo:lo + chunk], k), tokens, [k] * len(tokens))
        return out

    def _set_sampling(self, group: list[Request], slots: list[int]) -> None:
        """Write the group's sampling parameters into their slots' rows; output counts start from the
        tokens generated so far (none, unless the request was preempted)."""
        idx = torch.tensor(slots, device=self.runner.device)
        dev = idx.device

        def column(values) -> torch.Tensor:
            return torch.tensor([float(v) for v in values], device=dev)

        params = [r.params for r in group]
        self.temperature[idx] = column(p.temperature for p in params)
        self.top_k[idx] = torch.tensor([p.top_k_for(self.vocab_size) for p in params], device=dev)
        self.top_p[idx] = column(p.top_p or 1.0 for p in params)
        state = self.logits_state
        state.output_counts[idx] = 0
        state.presence[idx] = column(p.presence_penalty for p in params)
        state.frequency[idx] = column(p.frequency_penalty for p in params)
        state.repetition[idx] = column(p.repetition_penalty for p in params)
        state.min_p[idx] = column(p.min_p for p in params)
        state.prompt_seen[idx] = False
        for req, slot in zip(group, slots):
            if req.params.repetition_penalty != 1:
                state.prompt_seen[slot, torch.tensor(req.prompt_ids, device=dev)] = True
            if req.output_ids:
                state.output_counts[slot].index_put_((torch.tensor(req.output_ids, device=dev),),
                                                     torch.ones(len(req.output_ids), dtype=state.output_counts.dtype,
                                                                device=dev), accumulate=True)
            self._set_bias(req, slot, suppress_stops=req.params.min_tokens > len(req.output_ids))

    def _set_bias(self, req: Request, slot: int, suppress_stops: bool) -> None:
        """The slot's bias row: the request's logit_bias, and -inf on its stop tokens (EOS unless
        ignored, stop_token_ids) while it has fewer than min_tokens new tokens."""
        row = self.logits_state.bias[slot]
        row.zero_()
        bias = req.params.logit_bias
        if bias:
            row[torch.tensor(list(bias), device=row.device)] = torch.tensor([float(b) for b in bias.values()],
                                                                            device=row.device)
        if suppress_stops:
            stops = set(req.params.stop_token_ids) | (set() if req.params.ignore_eos else self.eos_token_ids)
            stops = [t for t in stops if t < self.vocab_size]
            if stops:
                row[torch.tensor(stops, device=row.device)] = float("-inf")

    def _start(self, group: list[Request], slots: list[int], next_tokens: list[int],
               next_logprobs: list[TokenLogprob | None]) -> None:
        """Make the requests decode from their slots, after the token just sampled from their
        prefill (their sampling rows are set: _prefill_group or _merge did it)."""
        idx = torch.tensor(slots, device=self.runner.device)
        first = torch.tensor(next_tokens, device=idx.device)
        self.tokens[idx, 0] = first
        self.logits_state.output_counts[idx, first] += 1
        self.positions[idx] = torch.tensor([len(r.prefill_ids) for r in group], device=idx.device)
        self.active[idx] = 1
        for req, slot, token, logprob in zip(group, slots, next_tokens, next_logprobs):
            req.slot = slot
            self.prefilling.pop(slot, None)  # (until here a failure frees the slot through prefilling)
            self.running[slot] = req
            self._append_token(req, token, logprob)

    # ---- separated prefill / decode (the hand-over primitives zoo.pd builds on) ------------
    def prefill_only(self, requests: list[Request]) -> list[PrefilledKV]:
        """PROMPT role: prefill each request (in chunks when long), sample its first token, and
        export the KV of its real tokens (per layer [KV, prompt_len, hd]); no slot or block stays
        taken."""
        with self.lock:
            if self.cache.num_free() < len(requests):
                raise RuntimeError(f"{len(requests)} requests but only {self.cache.num_free()} free KV slots")
            need = sum(self.cache.blocks_for(len(r.prompt_ids)) for r in requests)
            if need > self.cache.free_blocks:
                raise RuntimeError(f"{len(requests)} prompts need {need} KV blocks, {self.cache.free_blocks} are free")
            slots = [self.cache.alloc() for _ in requests]
            try:
                self._set_sampling(requests, slots)
                chunk = self.runner.buckets.chunk_tokens
                last: dict[int, torch.Tensor] = {}  # request -> logits of its last prompt token [V]
                for start in range(0, max(len(r.prompt_ids) for r in requests), chunk):
                    part = [i for i, r in enumerate(requests) if len(r.prompt_ids) > start]
                    logits = self.runner.prefill([requests[i].prompt_ids[:start + chunk] for i in part],
                                                 [slots[i] for i in part], [start] * len(part))
                    last.update((i, logits[row]) for row, i in enumerate(part))
                for req, slot in zip(requests, slots):
                    req.slot = slot
                self._prompt_logprobs(requests)
                logits = torch.stack([last[i] for i in range(len(requests))])  # [n, V]
                tokens, logprobs = self._sample(logits, torch.tensor(slots, device=logits.device), requests)
                first = tokens.tolist()
                first_logprobs = self._logprobs_to_host(logprobs, first, requests)
                out = []
                for req, slot, token, logprob in zip(requests, slots, first, first_logprobs):
                    k, v = self.cache.export_slot(slot, len(req.prompt_ids))
                    out.append(PrefilledKV(token, k, v, logprob, req.prompt_logprobs))
                return out
            finally:
                for req, slot in zip(requests, slots):
                    req.slot = None
                    self.cache.free(slot)

    def submit_prefilled(self, request: Request, prefilled: PrefilledKV, slot: int | None = None) -> None:
        """DECODER role: a request whose prompt was prefilled elsewhere. Without `slot` it is queued
        and merged into the lowest free slot at admission; with `slot` (a free one) it is merged
        into that slot now and decodes from the next step (the seed's merge_kv(batch_index=N))."""
        n = len(request.prompt_ids)
        if any(k.shape[1] != n for k in prefilled.k + prefilled.v) or len(prefilled.k) != len(self.cache.k):
            raise RequestError(f"prefilled KV does not match the request: expected {len(self.cache.k)} layers "
                               f"of {n} positions, got {[list(k.shape) for k in prefilled.k[:1]]}")
        with self.lock:
            if slot is not None and not self.cache.is_free(slot):
                raise RequestError(f"slot {slot!r} is not a free KV-cache slot; free slots: {self.cache.free_slots()}")
            request.prefilled = prefilled
            if request.generator is not None and not request.params.greedy:
                # the prompt side drew the first token's noise; draw it here too to stay in step
                torch.empty(self.vocab_size, device=self.runner.device).exponential_(generator=request.generator)
            if slot is None:
                self.submit([request])
            else:
                self._merge(request, slot)

    def _grow_or_preempt(self) -> None:
        """Give each running request a block for the token it feeds next. When the pool runs out,
        the request admitted last (running or being prefilled) is preempted: its blocks go back,
        it waits at the head of the queue with what it generated, and re-prefills it later."""
        for req in sorted(self.running.values(), key=lambda r: r.t_submit):
            if req.slot not in self.running:
                continue  # preempted below for an older one
            while not self.cache.reserve(req.slot, len(req.prefill_ids)):
                victim = max(list(self.running.values()) + list(self.prefilling.values()), key=lambda r: r.t_submit)
                self._preempt(victim)
                if victim is req:
                    break

    def _preempt(self, req: Request) -> None:
        self._leave_slot(req)
        req.slot, req.computed = None, 0
        req.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(req)

    def _leave_slot(self, req: Request) -> None:
        """The request stops running / being prefilled; its slot and blocks are free again."""
        if req.slot is None or (self.running.get(req.slot) is not req and self.prefilling.get(req.slot) is not req):
            return
        self.running.pop(req.slot, None)
        self.prefilling.pop(req.slot, None)
        self.active[req.slot] = 0
        self.positions[req.slot] = self.cache.scratch_position
        self.cache.free(req.slot)

    def _decode_step(self) -> None:
        self._grow_or_preempt()
        if self.running:
            self._decode_running()

    def _decode_running(self) -> None:
        """One decode step of the running requests, whose blocks already hold the token fed now."""
        B, context = self._decode_shape()
        self._decode_done(self.runner.decode(self.tokens[:B], self.positions[:B], context), B)

    def _decode_shape(self) -> tuple[int, int]:
        """The decode batch bucket (row i = slot i) and the longest running sequence, counting the
        token fed now (host bookkeeping: no sync)."""
        B = self.runner.buckets.batch_for(max(self.running) + 1)
        return B, max(len(r.prompt_ids) + len(r.output_ids) for r in self.running.values())

    def _decode_done(self, logits: torch.Tensor, B: int) -> None:
        """After a decode step (logits [B, V]): sample each running row's next token and advance it."""
        rows = torch.arange(B, device=logits.device)
        reqs = [self.running.get(i) for i in range(B)]
        next_tokens, logprobs = self._sample(logits, rows, reqs)
        self.tokens[:B, 0] = next_tokens
        self.positions[:B] += self.active[:B]
        # idle rows add 0: the counts of free slots stay as they are (reset when a request starts)
        self.logits_state.output_counts.index_put_((rows, next_tokens), self.active[:B].to(torch.int32),
                                                   accumulate=True)
        host_tokens = next_tokens.tolist()  # the one host sync per step (logprobs, when asked, follow it)
        host_logprobs = self._logprobs_to_host(logprobs, host_tokens, reqs)
        for slot, req in list(self.running.items()):
            self._append_token(req, host_tokens[slot], host_logprobs[slot])

    def _sample(self, logits: torch.Tensor, slot_idx: torch.Tensor, reqs: list) -> tuple[torch.Tensor, tuple | None]:
        """One token per row (rows whose request is None are idle slots: greedy garbage), and the
        device tensors of token_logprobs when a row asked for logprobs (else None)."""
        live = [r for r in reqs if r is not None]
        raw = logits
        if any(r.params.processes_logits for r in live):
            logits = apply_penalties(logits, self.logits_state, slot_idx)
        if all(r.params.greedy for r in live):
            tokens = logits.argmax(dim=-1)
        else:
            noise = torch.ones_like(logits)
            for row, r in enumerate(reqs):
                if r is not None and not r.params.greedy:
                    noise[row].exponential_(generator=r.generator or self._default_generator)
            min_p = self.logits_state.min_p[slot_idx] if any(r.params.min_p for r in live) else None
            tokens = sample(logits, self.temperature[slot_idx], self.top_k[slot_idx], self.top_p[slot_idx], noise,
                            min_p)
        k = max((r.params.logprobs for r in live if r.params.logprobs is not None), default=None)
        return tokens, None if k is None else token_logprobs(raw, tokens, k)

    @staticmethod
    def _logprobs_to_host(logprobs: tuple | None, tokens: list[int], reqs: list) -> list[TokenLogprob | None]:
        """token_logprobs' tensors -> one TokenLogprob per row whose request asked (None elsewhere)."""
        if logprobs is None:
            return [None] * len(reqs)
        return host_logprobs(logprobs, tokens, [None if r is None else r.params.logprobs for r in reqs])

    # ---- per-request bookkeeping -----------------------------------------------------------
    def _append_token(self, req: Request, token: int, logprob: TokenLogprob | None = None) -> None:
        now = time.perf_counter()
        if req.t_first is None:
            req.t_first = now
        req.output_ids.append(token)
        if logprob is not None:
            req.logprobs.append(logprob)
        p = req.params
        finish = None
        may_stop = len(req.output_ids) >= p.min_tokens
        if len(req.output_ids) == p.min_tokens and req.slot is not None and p.min_tokens:
            self._set_bias(req, req.slot, suppress_stops=False)  # stop tokens are allowed from the next one
        if may_stop and ((token in self.eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids):
            finish = "stop"
        elif len(req.output_ids) >= p.max_new_tokens or len(req.prompt_ids) + len(req.output_ids) >= self.max_seq_len:
            finish = "length"
        if req.detokenizer is not None:
            req.text = req.detokenizer.text(req.output_ids)
            hit = _find_stop(req.text, p.stop, search_from=req.emitted_chars) if may_stop else None
            if hit is not None:
                req.text, finish = req.text[:hit], "stop"
        self._emit(req, final=finish is not None)
        if finish:
            self._finish(req, finish)

    def _emit(self, req: Request, final: bool) -> None:
        end = len(req.text)
        if not final:
            # hold back what could still become a stop string or an incomplete UTF-8 character
            hold = max((len(s) - 1 for s in req.params.stop), default=0)
            end = max(req.emitted_chars, end - hold)
            while end > req.emitted_chars and req.text[end - 1] == "\ufffd":
                end -= 1
        new_text = req.text[req.emitted_chars:end]
        new_ids = req.output_ids[req.emitted_tokens:]
        if new_text or new_ids or final:
            logprobs = req.logprobs[req.emitted_tokens:] if req.params.logprobs is not None else None
            req.events.append(StreamEvent(req.index, new_text, new_ids, logprobs=logprobs))
        req.emitted_chars, req.emitted_tokens = end, len(req.output_ids)

    def _finish(self, req: Request, reason: str, error: str | None = None) -> None:
        req.finish_reason, req.error, req.t_done = reason, error, time.perf_counter()
        if req.events:
            req.events[-1].finish_reason = reason
        else:
            req.events.append(StreamEvent(req.index, "", [], reason))
        self._leave_slot(req)

    def abort(self, requests: list[Request], reason: str = "aborted") -> None:
        """Drop unfinished requests (a stream whose reader went away); frees their slots."""
        with self.lock:
            for req in requests:
                if not req.finished:
                    if req in self.waiting:
                        self.waiting.remove(req)
                    self._finish(req, "error", reason)

    def _fail_requests(self, requests: list[Request], error: Exception, where: str) -> None:
        """Fail exactly these requests with `error` (their slots freed); the others go on."""
        self.failed_steps += 1
        message = f"{type(error).__name__}: {error}"
        log(f"{where} failed for {len(requests)} request(s): {message}\n{traceback.format_exc()}")
        for req in requests:
            if not req.finished:
                self._finish(req, "error", message)


def _find_stop(text: str, stops, search_from: int) -> int | None:
    """Index where the earliest stop string starts, looking only at text not yet emitted."""
    hits = []
    for s in stops:
        i = text.find(s, max(0, search_from - len(s) + 1))
        if i >= 0:
            hits.append(i)
    return min(hits) if hits else None
