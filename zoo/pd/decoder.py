"""The DECODER side: link to prompt processes, pull each request's KV, merge it into a batch slot
of the static KV cache, and decode it with zoo's continuous-batching engine.

Two ways to use it:
- step by step, as in the seed / llm_datadist: remote_prefill (or a router prefills), pull_kv,
  merge_kv(req, batch_index), then drive() the engine;
- submit() / stream() / generate(): a fetcher thread per prompt cluster asks it to prefill, pulls
  the KV and queues the request in the engine (Engine.submit_prefilled), while the caller's thread
  keeps stepping the engine. A slow or dead prompt process therefore never stalls the requests
  that are already decoding: only the requests waiting on that process fail, after a timeout.

A Link is one connection to one prompt process: the control socket plus the KV process group.
Its calls are serialised by its lock. Any timeout or I/O error on it "breaks" it (the two ends
can no longer be sure what the other has read, and gloo closes its pairs on a timeout); a broken
link is replaced by linking again, which builds a fresh process group under a fresh store prefix.
"""
from __future__ import annotations

import collections
import itertools
import queue
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from zoo.engine import PrefilledKV, Request, StreamEvent, encode_prompt, stream_events
from zoo.device import parse_dtype
from zoo.pd import protocol as proto
from zoo.pd.prompt import model_fingerprint
from zoo.pd.protocol import LLMException, LLMStatusCode
from zoo.pd.request import LLMReq, PrefillResult, logprob_from_wire, sampling_from_wire, sampling_to_wire
from zoo.pd.transport import DECODER_RANK, KVTransport, parse_address, store_client
from zoo.engine.sampling import SamplingParams, TokenLogprob


@dataclass
class PulledKV:
    """A request's KV, received and waiting to be merged into a batch slot."""

    req_id: int
    cluster_id: int  # the prompt cluster it came from
    prompt_ids: list[int]
    sampling: SamplingParams  # as the prompt side used them for the first token
    prefilled: PrefilledKV  # first token + per layer [KV, prompt_len, hd] views of the received tensor
    nbytes: int  # bytes that crossed the transport for it
    seconds: float  # pull request -> last byte received


@dataclass
class _Geometry:
    """The local cache's shape facts a pulled KV must agree with."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype: str
    max_seq_len: int
    vocab_size: int


@dataclass
class Timeouts:
    sync_kv: float = 10.0  # one pull: control reply + the KV bytes (llm_datadist's sync_kv_timeout)
    link: float = 10.0  # connect + handshake + process-group rendezvous
    prefill: float = 120.0  # one prefill call on the prompt side (its queue + compute; a cold compile is slow)
    rpc: float = 10.0  # small control calls: release, status, bye


class Link:
    def __init__(self, cluster_id: int, address: str, local_id: int, model, geometry: _Geometry, backend: str,
                 timeouts: Timeouts):
        self.cluster_id, self.address, self.local_id = cluster_id, address, local_id
        self.geometry, self.backend, self.timeouts = geometry, backend, timeouts
        self.lock = threading.Lock()
        self.broken: str | None = None  # why the link is unusable, once it is
        self.bytes_received = 0
        self._tags = itertools.count(1)
        self.sock, self.transport, self.info, self._store = self._connect(model)

    def _connect(self, model):
        host, port = parse_address(self.address)
        where = f"prompt cluster {self.cluster_id} at {self.address}"
        t = self.timeouts.link
        sock = _connect_retrying(host, port, t, where)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            sock.settimeout(t)
            link_id = uuid.uuid4().hex  # a fresh store prefix: a new link never meets an old one's keys
            proto.send_msg(sock, {"op": "hello", "proto": proto.PROTOCOL_VERSION, "cluster_id": self.local_id,
                                  "link_id": link_id})
            info = proto.raise_if_error(proto.recv_msg(sock), f"handshake with {where}")
            self._check_peer(info, model, where)
            store = store_client(host, proto.get(info, "store_port", (int,)), t)  # the prompt process hosts it
            proto.send_msg(sock, {"op": "open_kv"})
            transport = KVTransport(store, link_id, DECODER_RANK, self.backend, model.device, self.timeouts.sync_kv,
                                    sock.getsockname()[0])
            proto.raise_if_error(proto.recv_msg(sock), f"opening the KV transport to {where}")
            return sock, transport, info, store
        except LLMException:
            sock.close()
            raise
        except (TimeoutError, socket.timeout):
            sock.close()
            raise LLMException(LLMStatusCode.LLM_LINK_FAILED,
                               f"{where} did not complete the handshake within {t:g} s") from None
        except (OSError, RuntimeError) as e:  # socket errors; torch DistStoreError / DistNetworkError
            sock.close()
            raise LLMException(LLMStatusCode.LLM_LINK_FAILED, f"linking to {where} failed: {e}") from None

    def _check_peer(self, info: dict, model, where: str) -> None:
        remote_id = proto.get(info, "cluster_id", (int,))
        if remote_id != self.cluster_id:
            raise LLMException(LLMStatusCode.LLM_LINK_FAILED,
                               f"{self.address} is prompt cluster {remote_id}, not {self.cluster_id}")
        theirs, ours = proto.get(info, "model", (dict,)), model_fingerprint(model)
        differ = [f"{k}: {theirs.get(k)!r} there, {v!r} here" for k, v in ours.items() if theirs.get(k) != v]
        if differ:
            raise LLMException(LLMStatusCode.LLM_LINK_FAILED,
                               f"{where} runs a different model or dtype; " + "; ".join(differ))
        backend = proto.get(info, "backend", (str,))
        if backend != self.backend:
            raise LLMException(LLMStatusCode.LLM_LINK_FAILED,
                               f"{where} moves KV with {backend!r}, this decoder with {self.backend!r}")

    # ---- calls (each one holds the link's lock) ------------------------------------------------
    def _rpc(self, msg: dict, timeout: float, what: str) -> dict:
        if self.broken:
            raise LLMException(LLMStatusCode.LLM_LINK_FAILED, f"the link to prompt cluster {self.cluster_id} "
                               f"is down: {self.broken}")
        try:
            self.sock.settimeout(timeout)
            proto.send_msg(self.sock, msg)
            return proto.recv_msg(self.sock)
        except (TimeoutError, socket.timeout):
            self._break(f"prompt cluster {self.cluster_id} at {self.address} did not answer {what} "
                        f"within {timeout:g} s")
            raise LLMException(LLMStatusCode.LLM_WAIT_PROCESS_TIMEOUT, self.broken) from None
        except proto.ProtocolError as e:
            self._break(f"prompt cluster {self.cluster_id} sent a bad reply to {what}: {e.message}")
            raise
        except OSError as e:  # ConnectionError included: the process died or closed the connection
            self._break(f"lost the connection to prompt cluster {self.cluster_id} at {self.address} during "
                        f"{what}: {e}")
            raise LLMException(LLMStatusCode.LLM_LINK_FAILED, self.broken) from None

    def prefill(self, items: list[tuple[int, list[int], SamplingParams]]) -> list[PrefillResult]:
        what = f"a prefill of {len(items)} request(s)"
        msg = {"op": "prefill", "requests": [{"req_id": r, "prompt_ids": ids, "sampling": sampling_to_wire(p)}
                                             for r, ids, p in items]}
        with self.lock:
            reply = proto.raise_if_error(self._rpc(msg, self.timeouts.prefill, what), what)
        results = proto.get(reply, "results", (list,))
        if len(results) != len(items):
            raise proto.ProtocolError(f"{len(results)} prefill results for {len(items)} requests")
        out = []
        for (req_id, ids, _), r in zip(items, results):
            if not isinstance(r, dict) or proto.get_req_id(r) != req_id:
                raise proto.ProtocolError("prefill results out of order")
            if proto.get(r, "ok", (bool,)):
                for name in ("first_token", "prompt_len", "nbytes"):
                    proto.get(r, name, (int,))
            out.append(PrefillResult.from_wire(r))
        return out

    def pull(self, req_id: int) -> PulledKV:
        """Fetch one request's KV. The prompt side frees it once the bytes are sent."""
        what = f"the pull of request {req_id}"
        g = self.geometry
        with self.lock:
            t0 = time.perf_counter()
            tag = next(self._tags) % 2**31
            reply = proto.raise_if_error(self._rpc({"op": "pull", "req_id": req_id, "tag": tag},
                                                   self.timeouts.sync_kv, what), what)
            try:  # the bytes are coming: anything we refuse now also ends the link
                prompt_ids = proto.get_int_list(reply, "prompt_ids")
                n = len(prompt_ids)
                shape = proto.get_int_list(reply, "kv_shape")
                dtype = proto.get(reply, "dtype", (str,))
                first_token = proto.get(reply, "first_token", (int,))
                sampling = sampling_from_wire(proto.check_sampling(proto.get(reply, "sampling", (dict,))))
                expected = [2 * g.layers, g.kv_heads, n, g.head_dim]
                if proto.get_req_id(reply) != req_id or proto.get(reply, "tag", (int,)) != tag:
                    raise proto.ProtocolError("pull reply for another request")
                if not 0 < n < g.max_seq_len or shape != expected or dtype != g.dtype:
                    raise proto.ProtocolError(f"KV of shape {shape} {dtype} announced; this decoder takes "
                                              f"{expected} {g.dtype} with 0 < prompt_len < {g.max_seq_len}")
                if not 0 <= first_token < g.vocab_size:
                    raise proto.ProtocolError(f"first token {first_token} outside the vocabulary")
                nbytes = proto.get(reply, "nbytes", (int,))
                if nbytes != torch.Size(shape).numel() * parse_dtype(dtype).itemsize:
                    raise proto.ProtocolError(f"nbytes {nbytes} does not match shape {shape} {dtype}")
                first_logprob, prompt_logprobs = _logprobs_of_pull(reply, prompt_ids, first_token, sampling,
                                                                   g.vocab_size)
            except proto.ProtocolError as e:
                self._break(f"bad pull reply from prompt cluster {self.cluster_id}: {e.message}")
                raise
            before = self.transport.bytes_received
            try:
                kv = self.transport.recv(shape, parse_dtype(dtype), tag)  # [2 * layers, KV, prompt_len, hd]
            except RuntimeError as e:  # gloo: timed out, or the peer's socket closed
                timed_out = "Timed out" in str(e) or "timeout" in str(e).lower()
                self._break(f"receiving the KV of request {req_id} from prompt cluster {self.cluster_id} "
                            + (f"timed out after {self.timeouts.sync_kv:g} s" if timed_out else f"failed: {e}"))
                raise LLMException(LLMStatusCode.LLM_WAIT_PROCESS_TIMEOUT if timed_out
                                   else LLMStatusCode.LLM_LINK_FAILED, self.broken) from None
            received = self.transport.bytes_received - before
            self.bytes_received += received
        # k and v stay views of the one received tensor: no copy until merge_kv writes the slot
        prefilled = PrefilledKV(first_token, list(kv[:g.layers]), list(kv[g.layers:]), first_logprob, prompt_logprobs)
        return PulledKV(req_id, self.cluster_id, prompt_ids, sampling, prefilled, received, time.perf_counter() - t0)

    def release(self, req_id: int) -> bool:
        with self.lock:
            reply = proto.raise_if_error(self._rpc({"op": "release", "req_id": req_id}, self.timeouts.rpc,
                                                   f"the release of request {req_id}"), "release")
        return proto.get(reply, "released", (bool,))

    def status(self) -> dict:
        with self.lock:
            return proto.raise_if_error(self._rpc({"op": "status"}, self.timeouts.rpc, "a status query"), "status")

    def _break(self, why: str) -> None:
        """Mark the link unusable and drop its socket and process group (caller holds the lock)."""
        if self.broken is None:
            self.broken = why
        _close_quietly(self.sock)
        if self.transport is not None:
            self.transport.close()

    def close(self) -> None:
        """Unlink: say bye if the link is idle and healthy; otherwise cut the socket, which also
        ends a call another thread is blocked in (it then reports the link as lost)."""
        if self.lock.acquire(timeout=0.5):
            try:
                if self.broken is None:
                    try:
                        self._rpc({"op": "bye"}, min(self.timeouts.rpc, 2.0), "bye")
                    except LLMException:
                        pass
                self._break("unlinked")
            finally:
                self.lock.release()
        else:
            self.broken = self.broken or "unlinked"
            _close_quietly(self.sock, shutdown=True)


def _logprobs_of_pull(reply: dict, prompt_ids: list[int], first_token: int, sampling: SamplingParams,
                      vocab_size: int) -> tuple[TokenLogprob | None, list[TokenLogprob | None] | None]:
    """The first token's logprob and the prompt logprobs of a pull reply, each checked to be there
    exactly when the sampling asked for it, and to describe these tokens (ProtocolError if not)."""
    def checked(value, what: str, token: int, k: int) -> TokenLogprob:
        value = proto.check_logprob(value, what)
        ids = [value[0]] + [t for t, _ in value[2]]
        if value[0] != token or len(value[2]) > k or not all(0 <= t < vocab_size for t in ids):
            raise proto.ProtocolError(f"{what} is not the logprob of token {token} with at most {k} alternatives")
        return logprob_from_wire(value)

    first = proto.get(reply, "first_logprob", (list, type(None)))
    prompt = proto.get(reply, "prompt_logprobs", (list, type(None)))
    if (first is None) != (sampling.logprobs is None) or (prompt is None) != (sampling.prompt_logprobs is None):
        raise proto.ProtocolError("the logprobs sent do not match the ones the request asked for")
    if first is not None:
        first = checked(first, "first_logprob", first_token, sampling.logprobs)
    if prompt is not None:
        if len(prompt) != len(prompt_ids) or prompt[0] is not None:
            raise proto.ProtocolError(f"prompt_logprobs must hold null then one logprob per prompt token "
                                      f"after the first ({len(prompt_ids)} in all)")
        prompt = [None] + [checked(v, "a prompt logprob", t, sampling.prompt_logprobs)
                           for v, t in zip(prompt[1:], prompt_ids[1:])]
    return first, prompt


def _close_quietly(sock: socket.socket, shutdown: bool = False) -> None:
    try:
        if shutdown:
            sock.shutdown(socket.SHUT_RDWR)
        else:
            sock.close()
    except OSError:
        pass


@dataclass
class _Pending:
    """A submitted request on its way: prefill on a prompt cluster, pull, queue in the engine."""

    request: Request
    cluster_id: int
    req_id: int  # the request's id on the prompt side (the engine Request's index need not be unique)
    submission: int | None = None  # the engine submission it joins (one per submit call, for fair admission)


class Decoder:
    def __init__(self, model, cluster_id: int, *, timeouts: Timeouts, backend: str, auto_relink: bool = True,
                 relink_every_s: float | None = None, log=None):
        """relink_every_s: with auto_relink, an idle fetcher whose link is broken tries to link again
        this often (None: only a request for that cluster does, and round robin sends requests to
        the healthy clusters while there are any)."""
        self.model, self.engine, self.cluster_id = model, model.engine, cluster_id
        self.timeouts, self.backend, self.auto_relink = timeouts, backend, auto_relink
        self.relink_every_s = relink_every_s
        self._log = log or (lambda msg: print(f"[zoo.pd] decoder {cluster_id}: {msg}", file=sys.stderr, flush=True))
        cache = self.engine.cache
        self.geometry = _Geometry(len(cache.k), cache.k[0].shape[1], cache.k[0].shape[3],
                                  str(cache.k[0].dtype).replace("torch.", ""), self.engine.max_seq_len,
                                  self.engine.vocab_size)
        self._lock = threading.Lock()  # guards the tables below
        self._links: dict[int, Link] = {}
        self._addresses: dict[int, str] = {}  # cluster id -> address, kept while linked (for re-linking)
        self._fetchers: dict[int, _Fetcher] = {}
        self._pulled: dict[int, PulledKV] = {}  # req id -> KV pulled but not merged yet
        self._prefilled_at: dict[int, int] = {}  # req id -> cluster that prefilled it via remote_prefill
        self._round_robin = itertools.count()
        self._submissions = itertools.count(1)  # submit_requests calls
        self._wakeup = threading.Event()  # set when a request was queued in the engine or failed
        # (request, message) a fetcher gave up on: failed by the thread that drives the engine (poll), so a
        # request never finishes under the feet of a reader of its events
        self._failures: collections.deque[tuple[Request, str]] = collections.deque()
        self._stats_lock = threading.Lock()
        self.kv_bytes_received = 0
        self.kv_transfers = 0
        self.kv_transfer_seconds = 0.0

    # ---- links -------------------------------------------------------------------------------
    def link(self, cluster_id: int, address: str) -> None:
        with self._lock:
            old = self._links.get(cluster_id)
            if old is not None and old.broken is None:
                raise LLMException(LLMStatusCode.LLM_ALREADY_LINK,
                                   f"already linked to prompt cluster {cluster_id} at {old.address}; unlink first")
        new = Link(cluster_id, address, self.cluster_id, self.model, self.geometry, self.backend, self.timeouts)
        with self._lock:
            old = self._links.get(cluster_id)
            self._links[cluster_id], self._addresses[cluster_id] = new, address
            if cluster_id not in self._fetchers:
                self._fetchers[cluster_id] = _Fetcher(self, cluster_id)
                self._fetchers[cluster_id].start()
        if old is not None and old is not new:
            old.close()
        self._log(f"linked to prompt cluster {cluster_id} at {address}")

    def unlink(self, cluster_id: int) -> None:
        with self._lock:
            if cluster_id not in self._addresses:
                raise LLMException(LLMStatusCode.LLM_NOT_YET_LINK, f"not linked to prompt cluster {cluster_id}")
            link = self._links.pop(cluster_id, None)
            del self._addresses[cluster_id]
            fetcher = self._fetchers.pop(cluster_id, None)
        if fetcher is not None:
            fetcher.stop(f"prompt cluster {cluster_id} was unlinked before the request was prefilled")
        if link is not None:
            link.close()  # also ends a call the fetcher may be blocked in
        if fetcher is not None:
            fetcher.join(timeout=self.timeouts.sync_kv + 1.0)
        self._log(f"unlinked prompt cluster {cluster_id}")

    def link_broken(self, cluster_id: int) -> bool:
        """Whether the link to a linked cluster is down (broken, or not made yet) right now."""
        with self._lock:
            link = self._links.get(cluster_id)
            return cluster_id in self._addresses and (link is None or link.broken is not None)

    def linked_clusters(self) -> dict[int, str]:
        with self._lock:
            return dict(self._addresses)

    def check_link_status(self, cluster_id: int) -> dict:
        """{'cluster_id', 'address', 'ok', 'error', and, when ok, the prompt side's 'held', ...}."""
        with self._lock:
            if cluster_id not in self._addresses:
                raise LLMException(LLMStatusCode.LLM_NOT_YET_LINK, f"not linked to prompt cluster {cluster_id}")
            link, address = self._links.get(cluster_id), self._addresses[cluster_id]
        out = {"cluster_id": cluster_id, "address": address}
        try:
            status = self._link(cluster_id, relink=False).status()
            return {**out, "ok": True, "error": None, "held": status.get("held"),
                    "held_bytes": status.get("held_bytes"), "kv_ttl": status.get("kv_ttl")}
        except LLMException as e:
            return {**out, "ok": False, "error": str(e) if link is None or not link.broken else link.broken}

    def _link(self, cluster_id: int, relink: bool = True) -> Link:
        """The live link to a cluster; with auto_relink, a broken one is replaced by linking again."""
        with self._lock:
            if cluster_id not in self._addresses:
                raise LLMException(LLMStatusCode.LLM_NOT_YET_LINK, f"not linked to prompt cluster {cluster_id}")
            link, address = self._links.get(cluster_id), self._addresses[cluster_id]
        if link is not None and link.broken is None:
            return link
        if not (relink and self.auto_relink):
            raise LLMException(LLMStatusCode.LLM_LINK_FAILED, f"the link to prompt cluster {cluster_id} is down: "
                               f"{link.broken if link else 'not connected'}; link it again")
        new = Link(cluster_id, address, self.cluster_id, self.model, self.geometry, self.backend, self.timeouts)
        with self._lock:
            current = self._links.get(cluster_id)
            unlinked = self._addresses.get(cluster_id) != address  # unlinked / linked elsewhere meanwhile
            raced = current is not None and current is not link and current.broken is None  # another thread won
            if not (unlinked or raced):
                self._links[cluster_id] = new
        if unlinked or raced:
            new.close()
            if unlinked:
                raise LLMException(LLMStatusCode.LLM_NOT_YET_LINK, f"prompt cluster {cluster_id} was unlinked")
            return current
        self._log(f"re-linked to prompt cluster {cluster_id} at {address}")
        return new

    def _cluster_for(self, req: LLMReq) -> int:
        return self._pick_cluster(req.req_id, req.prompt_cluster_id)

    def _pick_cluster(self, req_id: int, asked: int | None) -> int:
        """`asked` if it is linked; None: round robin over the healthy linked clusters (all of them
        when none is healthy)."""
        with self._lock:
            clusters = sorted(self._addresses)
            if asked is not None:
                if asked not in self._addresses:
                    raise LLMException(LLMStatusCode.LLM_NOT_YET_LINK,
                                       f"request {req_id} asks for prompt cluster {asked}, "
                                       f"which is not linked (linked: {clusters})")
                return asked
            if not clusters:
                raise LLMException(LLMStatusCode.LLM_NOT_YET_LINK, "no prompt cluster is linked; call link() first")
            healthy = [c for c in clusters if c in self._links and self._links[c].broken is None] or clusters
            return healthy[next(self._round_robin) % len(healthy)]

    # ---- step by step: remote_prefill, pull_kv, merge_kv -------------------------------------
    def remote_prefill(self, reqs: list[LLMReq], cluster_id: int | None = None) -> list[PrefillResult]:
        """Ask a prompt cluster to prefill these requests and hold their KV (as a router would)."""
        if cluster_id is None:
            cluster_id = self._cluster_for(reqs[0])
        items = [(r.req_id, self._prompt_ids(r), r.sampling_params()) for r in reqs]
        results = self._link(cluster_id).prefill(items)
        with self._lock:
            for r in results:
                if r.ok:
                    self._prefilled_at[r.req_id] = cluster_id
        return results

    def pull_kv(self, req: LLMReq) -> PulledKV:
        """Pull a request's KV from the prompt cluster that holds it (req.prompt_cluster_id, or the
        one remote_prefill used, or the only linked one). It waits here until merge_kv."""
        with self._lock:
            cluster_id = req.prompt_cluster_id
            if cluster_id is None:
                cluster_id = self._prefilled_at.get(req.req_id)
            if cluster_id is None and len(self._addresses) == 1:
                cluster_id = next(iter(self._addresses))
            if cluster_id is None:
                raise LLMException(LLMStatusCode.LLM_PARAM_INVALID,
                                   f"say which prompt cluster holds request {req.req_id} (req.prompt_cluster_id)")
            if req.req_id in self._pulled:
                raise LLMException(LLMStatusCode.LLM_REPEAT_REQUEST,
                                   f"request {req.req_id} was pulled already and waits for merge_kv")
        pulled = self._pull(self._link(cluster_id), req.req_id)
        with self._lock:
            self._prefilled_at.pop(req.req_id, None)
            self._pulled[req.req_id] = pulled
        return pulled

    def merge_kv(self, req: LLMReq, batch_index: int | None = None) -> Request:
        """Merge a pulled KV into the decode batch. batch_index None: zoo picks the slot (the lowest
        free one, now or as soon as one frees up); an int: that slot, which must be free now.
        Returns the engine Request (its .events stream the output; drive() steps the engine)."""
        with self._lock:
            pulled = self._pulled.get(req.req_id)
        if pulled is None:
            raise LLMException(LLMStatusCode.LLM_KV_CACHE_NOT_EXIST,
                               f"request {req.req_id} has no pulled KV here; call pull_kv first")
        if req.prompt is not None and self._prompt_ids(req) != pulled.prompt_ids:
            raise LLMException(LLMStatusCode.LLM_PARAM_INVALID,
                               f"request {req.req_id}: its prompt differs from the one the prompt side prefilled")
        text = req.prompt if isinstance(req.prompt, str) else None
        request = self._make_request(req.req_id, pulled.prompt_ids, pulled.sampling, text)
        if batch_index is None:
            self.engine.submit_prefilled(request, pulled.prefilled)
        else:
            merge_into_slot(self.engine, request, pulled.prefilled, batch_index)
        with self._lock:
            self._pulled.pop(req.req_id, None)
        self._wakeup.set()
        return request

    def _pull(self, link: Link, req_id: int) -> PulledKV:
        pulled = link.pull(req_id)
        with self._stats_lock:
            self.kv_bytes_received += pulled.nbytes
            self.kv_transfers += 1
            self.kv_transfer_seconds += pulled.seconds
        return pulled

    # ---- all in one: submit / stream / generate ----------------------------------------------
    def submit(self, reqs: list[LLMReq]) -> list[Request]:
        """Validate every request (RequestError / LLMException, nothing queued, if one is bad), then
        hand each to its prompt cluster's fetcher. Returns the engine Requests, in order."""
        ids = [r.req_id for r in reqs]
        if len(set(ids)) != len(ids):
            raise LLMException(LLMStatusCode.LLM_REPEAT_REQUEST, f"duplicate req_id in one call: {ids}")
        pending = []
        for r in reqs:
            if r.prompt is None:
                raise LLMException(LLMStatusCode.LLM_PARAM_INVALID,
                                   f"request {r.req_id} has no prompt; to decode KV that a router had "
                                   "prefilled, use pull_kv + merge_kv")
            request = self._make_request(r.req_id, self._prompt_ids(r), r.sampling_params(),
                                         r.prompt if isinstance(r.prompt, str) else None)
            pending.append(_Pending(request, self._cluster_for(r), r.req_id))
        self._hand_over(pending)
        return [p.request for p in pending]

    def submit_requests(self, requests: list[Request], req_ids: list[int]) -> None:
        """Like submit(), for engine Requests already made (engine.make_request: validated, with
        whatever index their caller numbers them by): each is prefilled on a prompt cluster picked
        round robin under req_ids[i], which must be unique on that cluster while it is held there.
        LLMException(LLM_NOT_YET_LINK), nothing queued, when no cluster is linked."""
        submission = -next(self._submissions)  # negative: never one of the engine's own numbers
        pending = [_Pending(r, self._pick_cluster(i, None), i, submission)
                   for r, i in zip(requests, req_ids, strict=True)]
        self._hand_over(pending)

    def _hand_over(self, pending: list[_Pending]) -> None:
        for p in pending:
            with self._lock:
                fetcher = self._fetchers.get(p.cluster_id)
            if fetcher is None:
                self._fail(p.request, f"prompt cluster {p.cluster_id} was unlinked")
            else:
                fetcher.put(p)

    def drive(self, requests: list[Request]) -> Iterator[StreamEvent]:
        """Yield the requests' StreamEvents while stepping the engine (which also advances every
        other running request). Closing it early aborts the unfinished ones."""
        yield from stream_events(requests, self.poll, self.cancel)

    def poll(self, timeout: float = 0.05) -> None:
        """Advance: one engine step if anything is queued or running, else wait up to `timeout` for
        a fetcher to queue (or fail) a request."""
        self._wakeup.clear()
        self._apply_failures()
        if self.engine.has_work():
            self.engine.step()
        else:
            self._wakeup.wait(timeout)
        self._apply_failures()

    def cancel(self, requests: list[Request], reason: str = "cancelled") -> None:
        """Abort unfinished requests: frees their slots; a fetcher skips them (and releases KV a
        prompt cluster already holds for them)."""
        self.engine.abort([r for r in requests if not r.finished], reason)

    def _fail(self, request: Request, message: str) -> None:
        """Fail a request at the next poll (or close): only the thread that drives the engine
        finishes requests, so a reader of their events never sees one finish half-way."""
        self._failures.append((request, message))
        self._wakeup.set()

    def _apply_failures(self) -> None:
        while self._failures:
            request, message = self._failures.popleft()
            with self.engine.lock:
                if not request.finished:
                    self.engine.abort([request], message)

    def _queue_in_engine(self, request: Request, pulled: PulledKV, submission: int | None = None) -> bool:
        with self.engine.lock:  # abort() takes it too: a request cancelled meanwhile is not queued
            if request.finished:
                return False
            self.engine.submit_prefilled(request, pulled.prefilled)
            if submission is not None:  # the requests of one submit_requests call take turns with other calls'
                request.submission = submission
        self._wakeup.set()
        return True

    # ---- helpers -----------------------------------------------------------------------------
    def _prompt_ids(self, req: LLMReq) -> list[int]:
        return prompt_ids(self.model, req)

    def _make_request(self, req_id: int, prompt_ids: list[int], params: SamplingParams,
                      text: str | None) -> Request:
        # index = req_id: the StreamEvents of a request carry its req id
        return self.engine.make_request(req_id, prompt_ids, params, text)

    def close(self) -> None:
        with self._lock:
            clusters = list(self._addresses)
        for c in clusters:
            try:
                self.unlink(c)
            except LLMException:
                pass
        self._apply_failures()


class _Fetcher(threading.Thread):
    """One per linked prompt cluster: prefill there (in batches of what is queued), pull each KV,
    queue the request in the engine. Failures fail only the requests involved."""

    def __init__(self, decoder: Decoder, cluster_id: int):
        super().__init__(name=f"zoo-pd-fetch-{cluster_id}", daemon=True)
        self.decoder, self.cluster_id = decoder, cluster_id
        self.queue: queue.Queue[_Pending] = queue.Queue()
        self._stopped = threading.Event()
        self._stop_reason = ""
        self._relink_error: str | None = None  # why the last background re-link failed

    def put(self, item: _Pending) -> None:
        if self._stopped.is_set():
            self.decoder._fail(item.request, self._stop_reason)
        else:
            self.queue.put(item)

    def stop(self, reason: str) -> None:
        self._stop_reason = reason
        self._stopped.set()
        self._fail_queued(reason)

    def _fail_queued(self, reason: str) -> None:
        while True:
            try:
                self.decoder._fail(self.queue.get_nowait().request, reason)
            except queue.Empty:
                return

    def run(self) -> None:
        last_try = 0.0
        while not self._stopped.is_set():
            try:
                first = self.queue.get(timeout=0.2)
            except queue.Empty:
                every = self.decoder.relink_every_s
                if every is not None and time.monotonic() - last_try >= every:
                    self._relink_if_broken()
                    last_try = time.monotonic()
                continue
            batch = [first]
            while len(batch) < 64:  # what queued up meanwhile goes in the same prefill call
                try:
                    batch.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            try:
                self._run_batch([p for p in batch if not p.request.finished])
            except Exception as e:  # never let the thread die: fail what it held
                for p in batch:
                    self.decoder._fail(p.request, f"{type(e).__name__}: {e}")

    def _relink_if_broken(self) -> None:
        """Idle, with a broken link: link again now, so that round robin sends requests here again
        once the prompt process is back (a failure is logged once per outage)."""
        d = self.decoder
        if not d.auto_relink or not d.link_broken(self.cluster_id):
            self._relink_error = None
            return
        try:
            with d._lock:
                address = d._addresses.get(self.cluster_id)
            if address is None:
                return
            # a quick probe first: a process that is down costs no link_timeout of connect retries here
            # (a stop() of this fetcher waits for it)
            _close_quietly(socket.create_connection(parse_address(address), timeout=min(1.0, d.timeouts.link)))
            d._link(self.cluster_id)
            self._relink_error = None
        except Exception as e:  # noqa: BLE001 - LLMException, OSError; the thread must live on
            if self._relink_error is None:
                d._log(f"re-linking to prompt cluster {self.cluster_id} failed (trying again every "
                       f"{d.relink_every_s:g} s): {e}")
            self._relink_error = str(e)

    def _run_batch(self, batch: list[_Pending]) -> None:
        if not batch:
            return
        d = self.decoder
        try:
            link = d._link(self.cluster_id)
            results = link.prefill([(p.req_id, p.request.prompt_ids, p.request.params) for p in batch])
        except LLMException as e:
            self._link_failed(batch, e)
            return
        for i, (p, result) in enumerate(zip(batch, results)):
            if not result.ok:
                d._fail(p.request, f"prompt cluster {self.cluster_id} could not prefill request "
                                   f"{p.req_id}: {result.status.value}: {result.message}")
                continue
            if p.request.finished:  # cancelled while it was being prefilled: free its KV over there
                _release_quietly(link, p.req_id)
                continue
            try:
                pulled = d._pull(link, p.req_id)
            except LLMException as e:
                if link.broken:
                    self._link_failed(batch[i:], e)
                    return
                d._fail(p.request, str(e))
                continue
            d._queue_in_engine(p.request, pulled, p.submission)

    def _link_failed(self, batch: list[_Pending], error: LLMException) -> None:
        """The link broke (or could not be made): fail these requests and everything queued behind
        them, so none waits for another timeout; requests submitted later try to re-link."""
        reason = str(error)
        for p in batch:
            self.decoder._fail(p.request, reason)
        self._fail_queued(reason)
        self.decoder._log(f"prompt cluster {self.cluster_id}: {reason}")


def prompt_ids(model, req: LLMReq) -> list[int]:
    """A request's prompt as token ids (text is tokenized with the model's tokenizer)."""
    return encode_prompt(model.tokenizer, req.prompt, f"request {req.req_id}'s prompt", model.path)


def _connect_retrying(host: str, port: int, timeout_s: float, where: str) -> socket.socket:
    """Connect, retrying a refused or unreachable address until timeout_s: a prompt process
    started at the same time as the decoder may not listen yet."""
    deadline = time.monotonic() + timeout_s
    delay = 0.05
    while True:
        try:
            return socket.create_connection((host, port), timeout=max(0.1, deadline - time.monotonic()))
        except (ConnectionRefusedError, ConnectionResetError, OSError) as e:
            if isinstance(e, socket.gaierror) or time.monotonic() + delay >= deadline:
                raise LLMException(LLMStatusCode.LLM_LINK_FAILED,
                                   f"cannot connect to {where} within {timeout_s:g} s (link_timeout): {e}") from None
        time.sleep(delay)
        delay = min(delay * 2, 1.0)


def _release_quietly(link: Link, req_id: int) -> None:
    try:
        link.release(req_id)
    except LLMException:
        pass


def merge_into_slot(engine, request: Request, prefilled: PrefilledKV, slot: int) -> None:
    """Merge a prefilled request into a chosen free batch slot, now (Engine.submit_prefilled(slot=))."""
    cache = engine.cache
    if not (isinstance(slot, int) and not isinstance(slot, bool) and 0 <= slot < cache.num_slots):
        raise LLMException(LLMStatusCode.LLM_PARAM_INVALID, f"batch_index {slot!r} is outside [0, {cache.num_slots})")
    with engine.lock:
        if not cache.is_free(slot):
            raise LLMException(LLMStatusCode.LLM_PARAM_INVALID,
                               f"batch_index {slot} is in use; free slots: {cache.free_slots()}")
        engine.submit_prefilled(request, prefilled, slot=slot)
