"""One background thread that drives the engine for the HTTP server.

The asyncio side never touches the engine's lock: it hands new requests and aborts to this thread
through a small inbox (`submit`, `abort` return at once), and gets each request's StreamEvents back
through its sink. After every engine step this thread collects the new events of all requests and
hands them over in ONE `dispatch` call (for the server: loop.call_soon_threadsafe, so the sinks run
on the event loop and it is woken once per step, not once per request). Everything that runs a
graph, admits a request or frees a KV slot happens here, between steps, so all concurrent HTTP
requests share the same decode batch (continuous batching) and the event loop is never blocked by
a step.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from zoo.engine import Engine, Request, StreamEvent

log = logging.getLogger("zoo.serve")

# Called with a request and the events it produced since the last call (on the dispatch thread).
EventSink = Callable[[Request, list[StreamEvent]], None]
Dispatch = Callable[[Callable[[], None]], object]

ABORT_REASON = "the client went away before the request finished"


class EngineStopped(RuntimeError):
    """The engine thread is not running (the server is shutting down, or it never started)."""


@dataclass
class _Tracked:
    request: Request
    sink: EventSink
    first_token_seen: bool = False
    aborted: bool = False


class EngineLoop:
    """Owns `engine` for the life of the server: nobody else may call step() on it meanwhile."""

    def __init__(self, engine: Engine, metrics=None, idle_wait_s: float = 1.0):
        self.engine, self.metrics = engine, metrics
        self._idle_wait_s = idle_wait_s
        self._cv = threading.Condition()
        self._inbox: list[tuple[Request, EventSink]] = []  # guarded by _cv
        self._aborts: list[Request] = []  # guarded by _cv
        self._tracked: dict[int, _Tracked] = {}  # id(request) -> entry; engine thread only
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._dispatch: Dispatch | None = None
        self.steps = 0
        self.step_errors = 0
        self.peak_running = 0

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self, dispatch: Dispatch | None = None) -> None:
        """dispatch(fn) must run fn soon on the consumers' side, e.g. loop.call_soon_threadsafe;
        without it the sinks are called on the engine thread."""
        if self._thread is not None:
            return
        self._dispatch = dispatch
        self._thread = threading.Thread(target=self._run, name="zoo-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Abort whatever is in flight, then end the thread."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    # ---- called from any thread (the event loop) ---------------------------------------------
    def submit(self, requests: list[Request], sink: EventSink) -> None:
        """Queue validated requests (from engine.make_request); their events go to `sink`."""
        with self._cv:
            if not self.alive:
                raise EngineStopped("the engine is not running")
            self._inbox.extend((r, sink) for r in requests)
            self._cv.notify()

    def abort(self, requests: list[Request]) -> None:
        """Drop requests whose client went away; their KV slots free up before the next step."""
        pending = [r for r in requests if not r.finished]
        if not pending:
            return
        with self._cv:
            self._aborts.extend(pending)
            self._cv.notify()

    def queued(self) -> int:
        """Requests handed over but not yet in a KV slot (inbox + the engine's waiting queue)."""
        return len(self._inbox) + len(self.engine.waiting)

    def running(self) -> int:
        return len(self.engine.running)

    # ---- the engine thread -------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            try:
                if self._iteration():
                    return
            except Exception:  # a bug here must not leave every later request hanging
                log.exception("engine loop iteration failed; aborting its requests")
                try:
                    self.engine.abort([t.request for t in self._tracked.values()], "internal server error")
                    self._deliver()
                except Exception:
                    log.exception("could not abort the requests")
                    self._tracked.clear()
                time.sleep(0.01)

    def _iteration(self) -> bool:
        """Take the inbox, apply aborts, run one step if there is work, deliver; True once stopped."""
        engine = self.engine
        with self._cv:
            while not (self._inbox or self._aborts or self._stopping or engine.has_work()):
                self._cv.wait(self._idle_wait_s)
            new, self._inbox = self._inbox, []
            aborts, self._aborts = self._aborts, []
            stopping = self._stopping
        for req, sink in new:
            self._tracked[id(req)] = _Tracked(req, sink)
        if stopping:
            aborts = [t.request for t in self._tracked.values()]
        if aborts:
            for req in aborts:
                if id(req) in self._tracked:
                    self._tracked[id(req)].aborted = True
            engine.abort(aborts, ABORT_REASON)  # waiting ones never enter the engine below
        if new and not stopping:
            # one engine submission per HTTP request (they share a sink): admission takes turns
            # between submissions, so one request with many prompts cannot hold every slot
            by_sink: dict[int, list[Request]] = {}
            for req, sink in new:
                if not req.finished:
                    by_sink.setdefault(id(sink), []).append(req)
            for group in by_sink.values():
                engine.submit(group)
        if engine.has_work() and not stopping:
            self._step()
        self._deliver()
        return stopping

    def _step(self) -> None:
        t0 = time.perf_counter()
        failed_before = self.engine.failed_steps
        self.engine.step()  # a prefill or decode that raises fails only its own requests, inside the engine
        failed = self.engine.failed_steps - failed_before
        if failed:
            self.step_errors += failed
            log.error("engine step failed; its requests get an error, the server goes on")
            if self.metrics is not None:
                self.metrics.step_errors.inc(failed)
        self.steps += 1
        self.peak_running = max(self.peak_running, len(self.engine.running))
        if self.metrics is not None:
            self.metrics.steps.inc()
            self.metrics.step_seconds.observe(time.perf_counter() - t0)

    def _deliver(self) -> None:
        """Hand every tracked request's new events to its sink; forget the finished ones."""
        served = 0  # requests that got a token in this step
        ready, done = [], []
        for key, t in self._tracked.items():
            req = t.request
            if req.events:
                events = []
                while req.events:
                    events.append(req.events.popleft())
                if any(e.token_ids for e in events):
                    served += 1
                self._record(t, events)
                ready.append((t.sink, req, events))
            if req.finished and not req.events:
                done.append(key)
        for key in done:
            del self._tracked[key]
        if served and self.metrics is not None:
            self.metrics.step_batch_size.observe(served)
        if not ready:
            return
        if self._dispatch is None:
            _call_sinks(ready)
            return
        try:
            self._dispatch(partial(_call_sinks, ready))
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            log.debug("dropped events: the event loop is closed")

    def _record(self, t: _Tracked, events: list[StreamEvent]) -> None:
        m, req = self.metrics, t.request
        if m is None:
            return
        new_tokens = sum(len(e.token_ids) for e in events)
        if new_tokens:
            m.generation_tokens.inc(new_tokens)
        if not t.first_token_seen and req.t_first is not None:
            t.first_token_seen = True
            m.prompt_tokens.inc(len(req.prompt_ids))
            m.ttft.observe(req.t_first - req.t_submit)
        if req.finished:
            reason = "aborted" if t.aborted and req.finish_reason == "error" else req.finish_reason
            m.requests.labels(finish_reason=reason).inc()
            if req.t_done is not None:
                m.e2e.observe(req.t_done - req.t_submit)
            n = len(req.output_ids)
            if reason in ("stop", "length") and n > 1 and req.t_first is not None:
                m.tpot.observe((req.t_done - req.t_first) / (n - 1))


def _call_sinks(ready: list[tuple[EventSink, Request, list[StreamEvent]]]) -> None:
    for sink, req, events in ready:
        try:
            sink(req, events)
        except Exception:  # one broken consumer must not starve the others
            log.exception("delivering events failed")
