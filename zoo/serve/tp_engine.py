"""The server's tensor-parallel mode: an Engine stand-in that drives the ranks of a TPModel.

Every rank of `zoo.load(..., tp=N)` runs its own Engine on its shard; they stay in step as long as
they get the same calls in the same order. TPEngine presents the part of Engine's surface that
EngineLoop and app.py use (make_request, submit, abort, step, has_work, waiting, running,
failed_steps, cache.num_slots, max_seq_len) over *shadow* Request objects that live in the server
process. Each step() is ONE round trip to the ranks (zoo.engine.driver.EngineDriver, reached by
name through the TPModel): the requests submitted since the last step, the aborts, and "step".
Rank 0 answers with the StreamEvents each request produced and what changed in its Request; both
are mirrored onto the shadows, so EngineLoop and the HTTP handlers read them as they would read
a local engine's requests.

Requests are validated here (check_request) before anything reaches the ranks; tokenizing,
detokenizing, sampling generators and stop checks happen on the ranks. A rank that dies or hangs
(RankGroup fails the round trip at once, or after tp_timeout_s) fails every request in flight with
an error event; from then on `failure` says why (GET /health answers 503) and new requests get 503.
A rank process that exits while the server is idle shows in `failure` at once.
"""
from __future__ import annotations

import logging
import multiprocessing
import time
from collections import deque
from dataclasses import dataclass

from zoo.api import TPModel
from zoo.engine import Request, StreamEvent
from zoo.engine.driver import StepAnswer, Submission
from zoo.engine.request import check_request
from zoo.engine.sampling import SamplingParams
from zoo.errors import TPWorkerError
from zoo.serve.protocol import APIError

log = logging.getLogger("zoo.serve")


@dataclass
class CacheInfo:
    num_slots: int


class TPEngine:
    """Engine's serving surface over the ranks of a TPModel (see the module docstring). Only the
    engine thread calls submit / abort / step; make_request may run in any thread."""

    def __init__(self, model: TPModel):
        self.model = model
        self.driver = model.driver()  # stays on the ranks; each call runs on all of them
        info = self.driver.info()
        self.cache = CacheInfo(info.num_slots)
        self.max_seq_len, self.vocab_size, self.has_tokenizer = info.max_seq_len, info.vocab_size, info.has_tokenizer
        self.tokenizer = model.tokenizer
        self.waiting: deque[Request] = deque()  # submitted, not yet in a KV slot (read by /metrics)
        self.running: dict[int, Request] = {}  # slot -> request
        self.failed_steps = 0
        self._failure: str | None = None  # why the last round trip failed (the ranks are stopped then)
        self._rank_pids = list(getattr(model, "rank_pids", ()))
        self._rank_failed_steps = 0  # rank 0's Engine.failed_steps
        self._live: dict[int, Request] = {}  # key -> shadow, submitted and not finished
        self._keys: dict[int, int] = {}  # id(shadow) -> key
        self._next_key = 0
        self._submissions: list[list[Submission]] = []  # not sent yet; one list per submit() call
        self._aborts: list[tuple[int, str]] = []  # not sent yet

    @property
    def failure(self) -> str | None:
        """Why the ranks cannot serve any more, or None: a round trip that failed, or a rank process
        that has exited (seen here at once, even while no step runs; a hung rank shows at the next
        step)."""
        if self._failure is None and self._rank_pids:
            alive = {p.pid for p in multiprocessing.active_children()}
            gone = [rank for rank, pid in enumerate(self._rank_pids) if pid not in alive]
            if gone:
                return f"tensor-parallel rank {gone[0]} is gone (its process exited)"
        return self._failure

    # ---- the Engine surface ------------------------------------------------------------------
    def make_request(self, index: int, prompt_ids: list[int], params: SamplingParams,
                     prompt: str | None = None) -> Request:
        """Validate one request (RequestError, as Engine.make_request) and make its shadow."""
        if self.failure is not None:
            raise APIError(503, f"the server cannot generate any more: {self.failure}", type="server_error")
        check_request(index, prompt_ids, params, self.max_seq_len, self.vocab_size, self.has_tokenizer)
        return Request(index, prompt, list(prompt_ids), params, None, None)

    def submit(self, requests: list[Request]) -> None:
        if self.failure is not None:
            for req in requests:
                _finish(req, "error", self.failure)
            return
        group = []
        for req in requests:
            key, self._next_key = self._next_key, self._next_key + 1
            self._live[key], self._keys[id(req)] = req, key
            group.append(Submission(key, req.index, req.prompt_ids, req.params, req.prompt))
            self.waiting.append(req)
        self._submissions.append(group)

    def has_work(self) -> bool:
        return bool(self._live or self._aborts)

    def abort(self, requests: list[Request], reason: str = "aborted") -> None:
        """Finish the shadows now, as Engine.abort does; the ranks drop them at the next step."""
        for req in requests:
            if req.finished:
                continue
            _finish(req, "error", reason)
            key = self._forget(req)
            if key is None:
                continue
            unsent = [g for g in self._submissions if any(s.key == key for s in g)]
            if unsent:  # never reached the ranks
                unsent[0][:] = [s for s in unsent[0] if s.key != key]
            else:
                self._aborts.append((key, reason))
        self._submissions = [g for g in self._submissions if g]
        self._refresh_queues()

    def step(self) -> None:
        """One round trip: send the submissions and aborts, the ranks step, mirror the answer. A
        failure of the ranks fails every request in flight; step() itself does not raise."""
        if self._failure is not None:
            return
        submissions, aborts = self._submissions, self._aborts
        self._submissions, self._aborts = [], []
        try:
            answer = self.driver.step(submissions, aborts)
        except TPWorkerError as e:  # a rank died or hung: the group is stopped
            self._fail_all(str(e))
            return
        except Exception as e:  # noqa: BLE001 - the same error on every rank (they are in step): fail the requests
            log.exception("the tensor-parallel step failed")
            message = f"{type(e).__name__}: {e}"
            if self.model.closed:
                self._fail_all(message)
                return
            self.failed_steps += 1
            for req in list(self._live.values()):
                self.abort([req], message)
            return
        self._mirror(answer, time.perf_counter())

    # ---- plumbing ----------------------------------------------------------------------------
    def _mirror(self, answer: StepAnswer, received: float) -> None:
        self.failed_steps += answer.failed_steps - self._rank_failed_steps
        self._rank_failed_steps = answer.failed_steps
        for key, update in answer.updates.items():
            req = self._live.get(key)
            if req is None:  # aborted here already
                continue
            for name, value in update.state.items():
                setattr(req, name, value)
            for name, (start, tail) in update.tails.items():
                value = getattr(req, name)
                if isinstance(value, list):
                    del value[start:]
                    value.extend(tail)
                else:
                    setattr(req, name, value[:start] + tail)
            for name, age in update.ages.items():
                setattr(req, name, received - age)  # the rank's time, on this process's clock
            req.events.extend(update.events)
            if req.finished:
                self._forget(req)
        self._refresh_queues()

    def _forget(self, req: Request) -> int | None:
        key = self._keys.pop(id(req), None)
        if key is not None:
            self._live.pop(key, None)
        return key

    def _refresh_queues(self) -> None:
        # new containers, not edits: the event loop reads their len() while this thread works
        live = [r for r in self._live.values() if not r.finished]
        self.waiting = deque(r for r in live if r.slot is None)
        self.running = {r.slot: r for r in live if r.slot is not None}

    def _fail_all(self, message: str) -> None:
        log.error("tensor-parallel ranks failed; failing %d request(s): %s", len(self._live), message)
        self._failure = message
        self.failed_steps += 1
        for req in list(self._live.values()):
            _finish(req, "error", message)
        self._live.clear()
        self._keys.clear()
        self._submissions, self._aborts = [], []
        self._refresh_queues()


def _finish(req: Request, reason: str, error: str | None) -> None:
    """End a shadow here, with the last event a local engine would have produced."""
    req.finish_reason, req.error, req.t_done = reason, error, time.perf_counter()
    if req.events:
        req.events[-1].finish_reason = reason
    else:
        req.events.append(StreamEvent(req.index, "", [], reason))


class TPServedModel:
    """What create_app needs of a model (engine, tokenizer, path, max_seq_len), for a TPModel."""

    def __init__(self, model: TPModel):
        self.tp_model = model
        self.engine = TPEngine(model)
        self.tokenizer, self.path = model.tokenizer, model.path

    @property
    def max_seq_len(self) -> int:
        return self.engine.max_seq_len
