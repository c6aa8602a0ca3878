"""Drive an Engine from another process: one call per step, plain data both ways.

`EngineDriver(engine).step(submissions, aborts)` takes the new requests (each under a key the
caller chose) and the aborts, runs one engine step, and answers, for every request that produced
StreamEvents, those events and what changed in its Request since the previous answer. The caller
(the HTTP server of `python -m zoo.serve --tp N`, through each tensor-parallel rank) keeps its own
*shadow* Request objects and mirrors the answers onto them, so code written against Engine and
Request reads them unchanged.

The state travels generically: every Request field that holds plain data (None, numbers,
strings, lists / tuples / dicts of them, dataclasses of them such as TokenLogprob) is sent when it
changes, and a list or string that only grew is sent as its new tail. A field added to Request
later travels without an edit here. Fields the caller owns (CALLER_FIELDS: the request as it was
submitted, and its arrival time) never travel. The other `t_*` fields are time.perf_counter()
times of this process; they travel as ages (seconds before the answer was made), which the caller
turns into times of its own clock.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

from zoo.engine.engine import Engine
from zoo.engine.request import Request, StreamEvent
from zoo.engine.sampling import SamplingParams
from zoo.errors import RequestError

# Request fields the caller set when it made the request (its copy is the original).
CALLER_FIELDS = frozenset({"index", "prompt", "prompt_ids", "params", "t_submit"})
TIME_FIELDS = tuple(f.name for f in dataclasses.fields(Request) if f.name.startswith("t_") and
                    f.name not in CALLER_FIELDS)
STATE_FIELDS = tuple(f.name for f in dataclasses.fields(Request) if f.name not in CALLER_FIELDS and
                     f.name not in TIME_FIELDS)


@dataclass
class Submission:
    """One new request: what Engine.make_request takes, under the caller's key."""

    key: int
    index: int
    prompt_ids: list[int]
    params: SamplingParams
    prompt: str | None = None


@dataclass
class RequestUpdate:
    """What happened to one request in one step."""

    events: list[StreamEvent]
    state: dict[str, object] = field(default_factory=dict)  # field -> its new value
    tails: dict[str, tuple[int, object]] = field(default_factory=dict)  # field -> (old length, what was appended)
    ages: dict[str, float] = field(default_factory=dict)  # t_* field -> seconds before the answer


@dataclass
class StepAnswer:
    updates: dict[int, RequestUpdate]  # key -> update, for the requests that produced events
    failed_steps: int  # Engine.failed_steps so far


@dataclass
class EngineInfo:
    num_slots: int
    max_seq_len: int
    vocab_size: int
    has_tokenizer: bool


class EngineDriver:
    """Owns the Requests that `step` submits to `engine`, by the caller's keys."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.requests: dict[int, Request] = {}  # key -> request, until its last update was answered
        self._sent: dict[int, dict[str, tuple]] = {}  # key -> field -> what the caller has of it

    def info(self) -> EngineInfo:
        e = self.engine
        return EngineInfo(e.cache.num_slots, e.max_seq_len, e.vocab_size, e.tokenizer is not None)

    def step(self, submissions: list[list[Submission]], aborts: list[tuple[int, str]]) -> StepAnswer:
        """Abort (key, reason) pairs, submit each inner list as one Engine.submit call (admission
        takes turns between them), run one engine step if there is work, and answer."""
        engine = self.engine
        with engine.lock:
            for key, reason in aborts:
                req = self.requests.get(key)
                if req is not None:
                    engine.abort([req], reason)
            for group in submissions:
                queued = []
                for s in group:
                    try:
                        req = engine.make_request(s.index, s.prompt_ids, s.params, s.prompt)
                        queued.append(req)
                    except RequestError as e:  # the caller checks first (check_request): fail it, do not raise
                        req = Request(s.index, s.prompt, list(s.prompt_ids), s.params, None, None)
                        engine.abort([req], str(e))
                    self.requests[s.key] = req
                if queued:
                    engine.submit(queued)
            if engine.has_work():
                engine.step()
            now = time.perf_counter()
            updates = {}
            for key, req in list(self.requests.items()):
                if req.events:
                    updates[key] = self._update(key, req, now)
                if req.finished and not req.events:
                    del self.requests[key]
                    self._sent.pop(key, None)
            return StepAnswer(updates, engine.failed_steps)

    def _update(self, key: int, req: Request, now: float) -> RequestUpdate:
        events = list(req.events)
        req.events.clear()
        update = RequestUpdate(events)
        sent = self._sent.setdefault(key, {})
        for name in STATE_FIELDS:
            value = getattr(req, name)
            before = sent.get(name)
            if isinstance(value, (list, str)) and before is not None and before[0] == "seq":
                _, ref, n, last = before
                if isinstance(value, str):
                    grew = isinstance(ref, str) and value.startswith(ref)
                else:  # a list grows in place (Request's lists are appended to)
                    grew = value is ref and len(value) >= n and (n == 0 or value[n - 1] is last)
                if grew:
                    if len(value) > n and _plain(value[n:]):
                        update.tails[name] = (n, value[n:])
                        sent[name] = ("seq", value, len(value), value[-1] if isinstance(value, list) else None)
                    continue
            elif before is not None and before[0] == "value" and (before[1] is value or before[1] == value):
                continue
            if not _plain(value):
                continue
            update.state[name] = value
            if isinstance(value, (list, str)):
                sent[name] = ("seq", value, len(value), value[-1] if isinstance(value, list) and value else None)
            else:
                sent[name] = ("value", value)
        for name in TIME_FIELDS:
            value = getattr(req, name)
            if value is not None and sent.get(name) != ("time", value):
                update.ages[name] = now - value
                sent[name] = ("time", value)
        return update


_SCALARS = (type(None), bool, int, float, str, bytes)


def _plain(value) -> bool:
    """Data that means the same in another process: scalars, containers and dataclasses of them."""
    if isinstance(value, _SCALARS):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(_plain(k) and _plain(v) for k, v in value.items())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return all(_plain(getattr(value, f.name)) for f in dataclasses.fields(value))
    return False
