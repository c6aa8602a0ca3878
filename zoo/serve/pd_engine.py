"""The server's separated prefill/decode mode: `python -m zoo.serve --pd-peer HOST:PORT ...`.

The server process is a zoo.pd DECODER. It loads the model as usual (its own weights and KV cache)
and links to one or more prompt processes (`python -m zoo.pd --role prompt`). PDEngine presents the
part of Engine's surface that EngineLoop and app.py use (make_request, submit, abort, step,
has_work, waiting, running, failed_steps, cache, max_seq_len) over a zoo.pd Decoder:
- submit() hands each request to a prompt process, round robin over the linked ones that are up,
  under a fresh random wire id (several decoders may share a prompt process). The decoder's fetcher
  thread for that process prefills it there, pulls its KV and queues it in the local engine;
- step() steps the local engine, where the pulled requests take slots and decode in one batch; with
  nothing to step it waits a few ms for a fetcher, so requests on their way count as work;
- a prompt process that dies or stops answering fails only the requests on their way through it
  (finish_reason "error": HTTP 500, or an error event in a stream). New requests go to the linked
  processes that are up, and the fetcher links again in the background once it is back.
Failures are applied by the engine thread (Decoder.poll), never by a fetcher thread, so EngineLoop
never sees a request finish half-way.
"""
from __future__ import annotations

import secrets

from zoo.device import collective_backend
from zoo.engine import Request
from zoo.engine.sampling import SamplingParams
from zoo.pd.decoder import Decoder, Timeouts
from zoo.pd.protocol import LLMException

POLL_S = 0.01  # with no local work, how long one step() waits for a fetcher (EngineLoop's inbox waits as long)
RELINK_EVERY_S = 1.0  # how often an idle fetcher with a broken link tries to link again
DECODER_CLUSTER_ID = 1  # this server's cluster id, as the prompt processes log it


class _Queued:
    """len() = requests not in a KV slot yet: on their way (prefill, pull) plus the engine's queue."""

    def __init__(self, engine: "PDEngine"):
        self._engine = engine

    def __len__(self) -> int:
        return self._engine.in_transit() + len(self._engine.local.waiting)


class PDEngine:
    """Engine's serving surface over a zoo.pd Decoder (see the module docstring). make_request may
    run in any thread; submit / abort / step / has_work only in the engine thread."""

    def __init__(self, decoder: Decoder):
        self.decoder = decoder
        self.local = decoder.engine
        self.cache, self.max_seq_len, self.vocab_size = self.local.cache, self.local.max_seq_len, self.local.vocab_size
        self.tokenizer = self.local.tokenizer
        self.waiting = _Queued(self)
        self._transit: list[Request] = []  # submitted, not yet queued in the local engine nor finished

    @property
    def running(self) -> dict[int, Request]:
        return self.local.running

    @property
    def failed_steps(self) -> int:
        return self.local.failed_steps

    def in_transit(self) -> int:
        return len(self._transit)

    def make_request(self, index: int, prompt_ids: list[int], params: SamplingParams,
                     prompt: str | None = None) -> Request:
        """Validate one request against the local model (RequestError, as Engine.make_request)."""
        return self.local.make_request(index, prompt_ids, params, prompt)

    def submit(self, requests: list[Request]) -> None:
        """Send the requests of one call to the prompt processes; they join the local engine's
        queue (as one submission, for fair admission) once their KV is here."""
        ids = [secrets.randbits(63) for _ in requests]
        try:
            self.decoder.submit_requests(requests, ids)
        except LLMException as e:  # no prompt process is linked
            self.local.abort(requests, str(e))
            return
        self._transit.extend(requests)

    def has_work(self) -> bool:
        with self.local.lock:  # a fetcher queues under it: a request is always in one of the two lists
            self._transit = [r for r in self._transit if not r.finished and r.prefilled is None]
            return bool(self._transit) or self.local.has_work()

    def step(self) -> None:
        """One engine step, or (nothing local to step) a short wait for a fetcher; applies the
        failures the fetchers reported. Does not raise, as Engine.step."""
        self.decoder.poll(POLL_S)

    def abort(self, requests: list[Request], reason: str = "aborted") -> None:
        """Finish unfinished requests now; a fetcher skips them (and releases KV held for them)."""
        self.decoder.cancel(requests, reason)


class PDServedModel:
    """What create_app needs of a model (engine, tokenizer, path), for a decoder linked to prompt
    processes. close() unlinks them."""

    def __init__(self, model, decoder: Decoder):
        self.model, self.decoder = model, decoder
        self.engine = PDEngine(decoder)
        self.tokenizer, self.path, self.max_seq_len = model.tokenizer, model.path, model.max_seq_len
        self.kv_cache = model.kv_cache

    @property
    def peers(self) -> dict[int, str]:
        """Prompt cluster id -> address."""
        return self.decoder.linked_clusters()

    def close(self) -> None:
        self.decoder.close()


def link_prompt_peers(model, peers: dict[int, str], timeouts: Timeouts | None = None,
                      relink_every_s: float | None = RELINK_EVERY_S) -> PDServedModel:
    """Make `model` (a loaded zoo.Model) a decoder linked to the prompt processes `peers` (their
    cluster id -> 'host:port'). LLMException (LLM_LINK_FAILED) naming the peer when one cannot be
    linked (not listening within the link timeout, another cluster id, another model or dtype);
    nothing stays linked then."""
    decoder = Decoder(model, DECODER_CLUSTER_ID, timeouts=timeouts or Timeouts(),
                      backend=collective_backend(model.device), relink_every_s=relink_every_s)
    try:
        for cluster_id, address in peers.items():
            decoder.link(cluster_id, address)
    except BaseException:
        decoder.close()
        raise
    return PDServedModel(model, decoder)
