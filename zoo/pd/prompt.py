"""The PROMPT side: prefill requests, keep each one's KV keyed by req id, serve pulls.

A PromptServer owns
- a listening socket for the typed control channel (one thread per connected decoder),
- a TCPStore on which every link's process group meets (one PrefixStore per link),
- the held KV: req id -> HeldKV, released when a decoder pulls it, when someone asks
  (release), or when its TTL runs out (a reaper thread), whichever comes first.

Prefill runs on the model's own engine (Engine.prefill_only), which takes the engine lock, so
requests from several decoders and local callers are serialised there; the slots it borrows are
free again when it returns. The held KV is only the real tokens: [2 * layers, KV, prompt_len, hd].
"""
from __future__ import annotations

import collections
import hashlib
import json
import socket
import sys
import threading
import time
from dataclasses import dataclass

import torch

from zoo.pd import protocol as proto
from zoo.pd.protocol import LLMException, LLMStatusCode
from zoo.pd.request import logprob_to_wire, sampling_from_wire, sampling_to_wire
from zoo.pd.transport import PROMPT_RANK, KVTransport, store_server
from zoo.engine.sampling import SamplingParams

_FORGET_AFTER = 10_000  # how many released req ids we remember, for clearer "not found" errors


def model_fingerprint(model) -> dict:
    """What a decoder must share with this prompt process for the KV to mean the same thing."""
    c = model.config
    raw = json.dumps(c.raw, sort_keys=True, default=str).encode()
    return {"architecture": c.architecture, "num_layers": c.num_layers, "num_kv_heads": c.num_kv_heads,
            "head_dim": c.head_dim, "vocab_size": c.vocab_size, "dtype": str(model.dtype).replace("torch.", ""),
            "config_sha256": hashlib.sha256(raw).hexdigest()}


@dataclass
class HeldKV:
    req_id: int
    prompt_ids: list[int]
    sampling: dict  # wire form
    first_token: int
    kv: torch.Tensor  # [2 * layers, KV, prompt_len, hd]: every layer's k, then every layer's v
    expires_at: float
    first_logprob: list | None = None  # wire form, when the request asked for logprobs
    prompt_logprobs: list | None = None  # wire form, one per prompt token, when it asked for prompt_logprobs
    pulling: bool = False  # a transfer is under way: neither TTL nor release may free it now

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()


class PromptServer:
    def __init__(self, model, cluster_id: int, host: str, port: int, *, store_port: int = 0, kv_ttl: float = 60.0,
                 sync_kv_timeout: float = 10.0, link_timeout: float = 10.0, backend: str = "gloo",
                 max_held_bytes: int = 0, log=None):
        self.model, self.cluster_id = model, cluster_id
        self.kv_ttl, self.sync_kv_timeout, self.link_timeout = kv_ttl, sync_kv_timeout, link_timeout
        self.backend, self.max_held_bytes = backend, max_held_bytes
        self._log = log or (lambda msg: print(f"[zoo.pd] prompt {cluster_id}: {msg}", file=sys.stderr, flush=True))
        self._lock = threading.Lock()  # guards _held, _reserved, _gone
        self._held: dict[int, HeldKV] = {}
        self._reserved: dict[int, int] = {}  # req id being prefilled right now -> its KV bytes
        self._gone: collections.OrderedDict[int, str] = collections.OrderedDict()  # req id -> why it is gone
        self._stop = threading.Event()
        self._conns: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self.fingerprint = model_fingerprint(model)
        self.bytes_per_token = model.kv_cache.bytes_per_token  # k and v, every layer, [KV, hd] each
        self.bytes_sent = 0

        self._listener = socket.create_server((host, port), reuse_port=False, backlog=64)
        self._listener.settimeout(0.2)  # the accept loop re-checks _stop this often
        self.host, self.port = host, self._listener.getsockname()[1]
        self._store = store_server(host, store_port, link_timeout)
        self.store_port = self._store.port

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> "PromptServer":
        for target in (self._accept_loop, self._reap_loop):
            t = threading.Thread(target=target, name=f"zoo-pd-prompt-{target.__name__}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    # ---- the held KV -------------------------------------------------------------------------
    def prefill(self, items: list[tuple[int, list[int], SamplingParams]]) -> list[dict]:
        """Prefill (req_id, prompt_ids, sampling) items and hold their KV. Returns one wire result
        per item: {req_id, ok: True, first_token, prompt_len, nbytes} or {req_id, ok: False, status,
        message}. One bad item fails alone."""
        engine = self.model.engine
        results: list[dict | None] = [None] * len(items)
        todo = []  # (position, req_id, zoo Request)
        for i, (req_id, prompt_ids, params) in enumerate(items):
            try:
                self._reserve(req_id, len(prompt_ids))
            except LLMException as e:
                results[i] = {"req_id": req_id, **proto.error_reply(e.status_code, e.message)}
                continue
            try:
                todo.append((i, req_id, engine.make_request(req_id, prompt_ids, params)))
            except (ValueError, RuntimeError, OverflowError) as e:  # zoo.RequestError, or a seed torch refuses
                self._unreserve(req_id)
                results[i] = {"req_id": req_id, **proto.error_reply(LLMStatusCode.LLM_PARAM_INVALID, str(e))}
        # One prefill call per group of at most the largest batch bucket (and the slots there are).
        group_size = max(1, min(self.model.buckets.batch_sizes[-1], self.model.kv_cache.num_slots))
        for start in range(0, len(todo), group_size):
            group = todo[start:start + group_size]
            try:
                prefilled = engine.prefill_only([req for _, _, req in group])
            except Exception as e:  # an engine failure fails this group only
                for i, req_id, _ in group:
                    self._unreserve(req_id)
                    results[i] = {"req_id": req_id, **proto.error_reply(
                        LLMStatusCode.LLM_FAILED, f"prefill failed: {type(e).__name__}: {e}")}
                continue
            for (i, req_id, req), pk in zip(group, prefilled):
                first_logprob = logprob_to_wire(pk.first_logprob) if req.params.logprobs is not None else None
                prompt_logprobs = None
                if req.params.prompt_logprobs is not None and pk.prompt_logprobs is not None:
                    prompt_logprobs = [logprob_to_wire(t) for t in pk.prompt_logprobs]
                    size = len(json.dumps(prompt_logprobs)) + len(json.dumps(req.prompt_ids))
                    if size > proto.MAX_FRAME_BYTES - 65536:  # the pull reply carries both
                        self._unreserve(req_id)
                        results[i] = {"req_id": req_id, **proto.error_reply(
                            LLMStatusCode.LLM_PARAM_INVALID,
                            f"request {req_id}: the prompt logprobs of {len(req.prompt_ids)} tokens x "
                            f"{req.params.prompt_logprobs} alternatives take {size} bytes, more than a control "
                            f"message holds ({proto.MAX_FRAME_BYTES}); ask for fewer alternatives")}
                        continue
                kv = torch.stack(pk.k + pk.v)  # [2 * layers, KV, prompt_len, hd]
                held = HeldKV(req_id, req.prompt_ids, sampling_to_wire(req.params), pk.first_token, kv,
                              time.monotonic() + self.kv_ttl, first_logprob, prompt_logprobs)
                with self._lock:
                    self._reserved.pop(req_id, None)
                    self._held[req_id] = held
                    self._gone.pop(req_id, None)
                results[i] = {"req_id": req_id, "ok": True, "first_token": pk.first_token,
                              "prompt_len": len(req.prompt_ids), "nbytes": held.nbytes}
        return results

    def _reserve(self, req_id: int, prompt_len: int) -> None:
        with self._lock:
            if req_id in self._held or req_id in self._reserved:
                raise LLMException(LLMStatusCode.LLM_REPEAT_REQUEST,
                                   f"prompt cluster {self.cluster_id} already holds KV for request {req_id}")
            need = self.bytes_per_token * prompt_len
            if self.max_held_bytes:
                held = sum(h.nbytes for h in self._held.values()) + sum(self._reserved.values())
                if held + need > self.max_held_bytes:
                    raise LLMException(LLMStatusCode.LLM_OUT_OF_MEMORY,
                                       f"prompt cluster {self.cluster_id} holds {held} bytes of KV; request "
                                       f"{req_id} needs {need} more, over max_held_bytes={self.max_held_bytes}")
            self._reserved[req_id] = need

    def _unreserve(self, req_id: int) -> None:
        with self._lock:
            self._reserved.pop(req_id, None)

    def release(self, req_id: int, reason: str = "released on request") -> bool:
        """Free a request's KV now (unless a pull of it is under way). True if it was held."""
        with self._lock:
            held = self._held.get(req_id)
            if held is None or held.pulling:
                return False
            self._drop(req_id, reason)
            return True

    def held_req_ids(self) -> list[int]:
        with self._lock:
            return sorted(self._held)

    def status(self) -> dict:
        with self._lock:
            return {"cluster_id": self.cluster_id, "held": len(self._held),
                    "held_bytes": sum(h.nbytes for h in self._held.values()), "kv_ttl": self.kv_ttl}

    def _drop(self, req_id: int, reason: str) -> None:
        """Forget a held KV (caller holds _lock), remembering why for later lookups."""
        self._held.pop(req_id, None)
        self._gone[req_id] = reason
        while len(self._gone) > _FORGET_AFTER:
            self._gone.popitem(last=False)

    def _take_for_pull(self, req_id: int) -> HeldKV:
        with self._lock:
            held = self._held.get(req_id)
            if held is None:
                why = self._gone.get(req_id)
                raise LLMException(LLMStatusCode.LLM_KV_CACHE_NOT_EXIST,
                                   f"prompt cluster {self.cluster_id} holds no KV for request {req_id} "
                                   + (f"(it was {why})" if why else "(it was never prefilled here)"))
            if held.pulling:
                raise LLMException(LLMStatusCode.LLM_REPEAT_REQUEST,
                                   f"request {req_id} is being pulled by another decoder right now")
            held.pulling = True
            return held

    def _end_pull(self, held: HeldKV, ok: bool, decoder_id: int) -> None:
        with self._lock:
            held.pulling = False
            if ok:
                self._drop(held.req_id, f"pulled by decoder cluster {decoder_id} at {time.strftime('%H:%M:%S')}")

    def _reap_loop(self) -> None:
        """Release KV nobody pulled within its TTL."""
        tick = max(0.05, min(1.0, self.kv_ttl / 4))
        while not self._stop.wait(tick):
            now = time.monotonic()
            with self._lock:
                expired = [r for r, h in self._held.items() if h.expires_at <= now and not h.pulling]
                for req_id in expired:
                    self._drop(req_id, f"released after its TTL of {self.kv_ttl:g} s without being pulled")
            if expired:
                self._log(f"released {len(expired)} request(s) after their TTL of {self.kv_ttl:g} s: {expired[:8]}")

    # ---- connections -------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = self._listener.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return  # listener closed by stop()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            t = threading.Thread(target=self._serve, args=(conn, peer), name="zoo-pd-prompt-conn", daemon=True)
            with self._lock:
                self._conns.add(conn)
                self._threads = [x for x in self._threads if x.is_alive()] + [t]
            t.start()

    def _serve(self, conn: socket.socket, peer) -> None:
        """One decoder's connection: handshake, then request/reply until it leaves or breaks."""
        session = _Session(conn, peer)
        try:
            while not self._stop.is_set():
                conn.settimeout(None if session.transport else self.link_timeout)  # idle links may wait forever
                try:
                    msg = proto.recv_msg(conn)
                except ConnectionError:
                    return
                try:
                    reply = self._handle(session, msg)
                except LLMException as e:  # a refused or malformed request: say why, keep the link
                    reply = proto.error_reply(e.status_code, e.message)
                except (OSError, RuntimeError):
                    raise  # the socket or the process group failed: drop the link (below)
                except Exception as e:  # a bug or an input we did not foresee: report it, keep serving
                    self._log(f"error handling {msg.get('op')!r} from decoder {session.decoder_id}: "
                              f"{type(e).__name__}: {e}")
                    reply = proto.error_reply(LLMStatusCode.LLM_FAILED, f"{type(e).__name__}: {e}")
                if reply is None:  # bye
                    proto.send_msg(conn, {"ok": True})
                    return
                if session.pending_send is not None:  # a pull: reply first, then the bytes
                    held, tag = session.pending_send
                    session.pending_send = None
                    proto.send_msg(conn, reply)
                    ok = False
                    try:
                        sent = session.transport.send(held.kv, tag)
                        with self._lock:
                            self.bytes_sent += sent
                        ok = True
                    finally:  # on failure the KV stays held (until its TTL) for another pull
                        self._end_pull(held, ok, session.decoder_id)
                else:
                    proto.send_msg(conn, reply)
        except proto.ProtocolError as e:
            self._log(f"closing the connection from {peer}: {e.message}")
            _try_send(conn, proto.error_reply(LLMStatusCode.LLM_LINK_FAILED, e.message))
        except (OSError, RuntimeError) as e:  # socket errors, gloo errors (peer died / timed out)
            if not self._stop.is_set():
                self._log(f"link to decoder {session.decoder_id} ({peer}) dropped: {type(e).__name__}: {e}")
        finally:
            if session.transport is not None:
                session.transport.close()
                self._log(f"decoder cluster {session.decoder_id} unlinked ({peer[0]}:{peer[1]})")
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def _handle(self, s: "_Session", msg: dict) -> dict | None:
        op = proto.get(msg, "op", (str,))
        if op == "hello":
            if s.decoder_id is not None:
                raise proto.ProtocolError("second hello on one connection")
            version = proto.get(msg, "proto", (int,))
            if version != proto.PROTOCOL_VERSION:
                raise proto.ProtocolError(f"protocol version {version}; this prompt process speaks "
                                          f"{proto.PROTOCOL_VERSION}")
            s.decoder_id = proto.get(msg, "cluster_id", (int,))
            s.link_id = proto.get(msg, "link_id", (str,))
            if not (0 < len(s.link_id) <= 64 and all(c in "0123456789abcdef" for c in s.link_id)):
                raise proto.ProtocolError("link_id must be 1-64 lowercase hex digits")
            return {"ok": True, "cluster_id": self.cluster_id, "store_host": self.host,
                    "store_port": self.store_port, "model": self.fingerprint, "backend": self.backend,
                    "max_prefill_batch": self.model.buckets.batch_sizes[-1],
                    "max_seq_len": self.model.max_seq_len}
        if s.decoder_id is None:
            raise proto.ProtocolError(f"{op!r} before hello")
        if op == "open_kv":
            if s.transport is not None:
                raise proto.ProtocolError("open_kv twice")
            # Blocks until the decoder builds its side of the group (or link_timeout passes).
            s.transport = KVTransport(self._store, s.link_id, PROMPT_RANK, self.backend, self.model.device,
                                      self.sync_kv_timeout, s.conn.getsockname()[0])
            self._log(f"decoder cluster {s.decoder_id} linked from {s.peer[0]}:{s.peer[1]} ({self.backend})")
            return {"ok": True}
        if op == "prefill":
            requests = proto.get(msg, "requests", (list,))
            items = []
            for r in requests:
                if not isinstance(r, dict):
                    raise proto.ProtocolError("prefill 'requests' must be objects")
                items.append((proto.get_req_id(r), proto.get_int_list(r, "prompt_ids"),
                              sampling_from_wire(proto.check_sampling(proto.get(r, "sampling", (dict,))))))
            return {"ok": True, "results": self.prefill(items)}
        if op == "pull":
            if s.transport is None:
                raise proto.ProtocolError("pull before open_kv")
            req_id, tag = proto.get_req_id(msg), proto.get(msg, "tag", (int,))
            if not 0 <= tag < 2**31:
                raise proto.ProtocolError("tag must be in [0, 2**31)")
            held = self._take_for_pull(req_id)
            s.pending_send = (held, tag)
            return {"ok": True, "req_id": req_id, "prompt_ids": held.prompt_ids, "sampling": held.sampling,
                    "first_token": held.first_token, "first_logprob": held.first_logprob,
                    "prompt_logprobs": held.prompt_logprobs, "kv_shape": list(held.kv.shape),
                    "dtype": str(held.kv.dtype).replace("torch.", ""), "nbytes": held.nbytes, "tag": tag}
        if op == "release":
            return {"ok": True, "released": self.release(proto.get_req_id(msg),
                                                         f"released by decoder cluster {s.decoder_id}")}
        if op == "status":
            return {"ok": True, **self.status()}
        if op == "bye":
            return None
        raise proto.ProtocolError(f"unknown op {op!r}")

    def stop(self) -> None:
        """Stop serving: close the listener and every connection, drop all held KV."""
        self._stop.set()
        self._listener.close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        # Join the connection threads too: each closes its process group on the way out, and a
        # group still alive when the interpreter exits aborts the process (a joinable std::thread).
        with self._lock:
            threads = list(self._threads)
        deadline = time.monotonic() + max(2.0, self.sync_kv_timeout)
        for t in threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        with self._lock:
            self._held.clear()
        self._store = None  # the store's server thread ends with the object


class _Session:
    def __init__(self, conn: socket.socket, peer):
        self.conn, self.peer = conn, peer
        self.decoder_id: int | None = None
        self.link_id: str | None = None
        self.transport: KVTransport | None = None
        self.pending_send: tuple[HeldKV, int] | None = None


def _try_send(conn: socket.socket, msg: dict) -> None:
    try:
        proto.send_msg(conn, msg)
    except OSError:
        pass
