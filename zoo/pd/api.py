"""LLMEngine: the seed's separated-deployment API over zoo's engine.

    prompt = LLMEngine(LLMRole.PROMPT, cluster_id=0, model=zoo.load(path))
    prompt.init({"listen": "127.0.0.1:5555", "kv_ttl": 60})

    decoder = LLMEngine(LLMRole.DECODER, cluster_id=1, model=zoo.load(path, max_batch_size=4))
    decoder.init({"sync_kv_timeout": 10})
    decoder.link(0, "127.0.0.1:5555")
    for event in decoder.stream([LLMReq(1, "Beautiful is"), LLMReq(2, "Simple is")]):
        print(event.index, event.text, event.finish_reason)      # event.index is the req_id
    decoder.finalize(); prompt.finalize()

See docs/pd.md for the design and the mapping to the seed's and llm_datadist's names.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

from zoo.api import Stream
from zoo.device import collective_backend
from zoo.engine import GenerationResult, Request, StreamEvent
from zoo.pd.decoder import Decoder, PulledKV, Timeouts, prompt_ids
from zoo.pd.prompt import PromptServer
from zoo.pd.protocol import LLMException, LLMStatusCode
from zoo.pd.request import LLMReq, LLMRole, PrefillResult
from zoo.pd.transport import parse_address

_NUMBER = (int, float)
# option -> (types, roles it applies to, meaning)
OPTIONS = {
    "listen": ((str,), {LLMRole.PROMPT}, "host:port of the control channel (port 0 = any free port)"),
    "store_port": ((int,), {LLMRole.PROMPT}, "port of the rendezvous TCPStore (default 0 = any free port)"),
    "kv_ttl": (_NUMBER, {LLMRole.PROMPT}, "seconds a prefilled KV is held if nobody pulls it (default 60)"),
    "max_held_bytes": ((int,), {LLMRole.PROMPT}, "cap on held KV bytes; 0 = none (default)"),
    "sync_kv_timeout": (_NUMBER, {LLMRole.PROMPT, LLMRole.DECODER},
                        "seconds for one KV pull: control reply + bytes (default 10)"),
    "link_timeout": (_NUMBER, {LLMRole.PROMPT, LLMRole.DECODER},
                     "seconds for connect + handshake + process-group rendezvous (default 10)"),
    "prefill_timeout": (_NUMBER, {LLMRole.DECODER}, "seconds a prefill call may take on the prompt side "
                                                    "(default 120: a cold compile is slow)"),
    "rpc_timeout": (_NUMBER, {LLMRole.DECODER}, "seconds for release/status/bye (default 10)"),
    "auto_relink": ((bool,), {LLMRole.DECODER}, "re-link a broken link on the next request (default True)"),
    "backend": ((str,), {LLMRole.PROMPT, LLMRole.DECODER},
                "KV transport backend (default: zoo.device.collective_backend(model device))"),
}
# llm_datadist spellings accepted as well: name -> (zoo option, conversion)
ALIASES = {
    "llm.SyncKvCacheWaitTime": ("sync_kv_timeout", lambda ms: float(ms) / 1000.0),  # milliseconds there
    "llm.listenIpInfo": ("listen", str),
}


def parse_options(role: LLMRole, options: dict | None) -> dict:
    """Check an init() options dict: unknown keys, wrong types and options of the other role are
    refused, naming the key."""
    out = {}
    for key, value in (options or {}).items():
        if key in ALIASES:
            key, convert = ALIASES[key]
            value = convert(value)
        if key not in OPTIONS:
            raise LLMException(LLMStatusCode.LLM_PARAM_INVALID,
                               f"unknown option {key!r}; known: {', '.join(sorted(OPTIONS))}")
        types, roles, _ = OPTIONS[key]
        if role not in roles:
            raise LLMException(LLMStatusCode.LLM_PARAM_INVALID, f"option {key!r} is not for role {role.name}")
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            raise LLMException(LLMStatusCode.LLM_PARAM_INVALID, f"option {key!r} must be "
                               f"{' or '.join(t.__name__ for t in types)}, got {value!r}")
        if isinstance(value, _NUMBER) and not isinstance(value, bool):
            least = 0 if key in ("store_port", "max_held_bytes") else 1e-9  # ports / caps may be 0, timeouts not
            if value < least:
                raise LLMException(LLMStatusCode.LLM_PARAM_INVALID,
                                   f"option {key!r} must be {'>= 0' if least == 0 else '> 0'}, got {value!r}")
        out[key] = value
    return out


class LLMEngine:
    """One process's role in a separated prefill/decode deployment, around a loaded zoo.Model."""

    def __init__(self, role: LLMRole, cluster_id: int, model):
        if not isinstance(role, LLMRole):
            raise LLMException(LLMStatusCode.LLM_PARAM_INVALID, f"role must be an LLMRole, got {role!r}")
        if isinstance(cluster_id, bool) or not isinstance(cluster_id, int) or cluster_id < 0:
            raise LLMException(LLMStatusCode.LLM_PARAM_INVALID, f"cluster_id must be an int >= 0, got {cluster_id!r}")
        self.role, self.cluster_id, self.model = role, cluster_id, model
        self._server: PromptServer | None = None
        self._decoder: Decoder | None = None

    def init(self, options: dict | None = None) -> None:
        """PROMPT: start listening (options['listen'], required) and serving pulls.
        DECODER: get ready to link; nothing is connected until link()."""
        if self._server or self._decoder:
            raise LLMException(LLMStatusCode.LLM_FAILED, "init() was called already")
        opts = parse_options(self.role, options)
        backend = opts.get("backend") or collective_backend(self.model.device)
        if self.role is LLMRole.PROMPT:
            if "listen" not in opts:
                raise LLMException(LLMStatusCode.LLM_PARAM_INVALID, "a PROMPT engine needs options['listen'] "
                                   "('host:port', port 0 = any free port)")
            host, port = parse_address(opts["listen"])
            self._server = PromptServer(self.model, self.cluster_id, host, port,
                                        store_port=opts.get("store_port", 0), kv_ttl=float(opts.get("kv_ttl", 60.0)),
                                        sync_kv_timeout=float(opts.get("sync_kv_timeout", 10.0)),
                                        link_timeout=float(opts.get("link_timeout", 10.0)), backend=backend,
                                        max_held_bytes=opts.get("max_held_bytes", 0)).start()
        else:
            timeouts = Timeouts(sync_kv=float(opts.get("sync_kv_timeout", 10.0)),
                                link=float(opts.get("link_timeout", 10.0)),
                                prefill=float(opts.get("prefill_timeout", 120.0)),
                                rpc=float(opts.get("rpc_timeout", 10.0)))
            self._decoder = Decoder(self.model, self.cluster_id, timeouts=timeouts, backend=backend,
                                    auto_relink=opts.get("auto_relink", True))

    def finalize(self) -> None:
        """Unlink everything / stop serving; held or pulled KV is dropped. The model stays usable."""
        if self._server is not None:
            self._server.stop()
            self._server = None
        if self._decoder is not None:
            self._decoder.close()
            self._decoder = None

    def __enter__(self) -> "LLMEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.finalize()

    # ---- PROMPT ----------------------------------------------------------------------------------
    @property
    def address(self) -> str:
        """The address decoders link to (the listen address, with the port actually bound)."""
        return self._prompt("address").address

    @property
    def store_port(self) -> int:
        """PROMPT role: the port of the KV rendezvous TCPStore decoders connect to."""
        return self._prompt("store_port").store_port

    @property
    def kv_backend(self) -> str:
        """PROMPT role: the collective backend the KV travels over (gloo, nccl, hccl)."""
        return self._prompt("kv_backend").backend

    def prefill(self, reqs: Sequence[LLMReq]) -> list[PrefillResult]:
        """Prefill here and hold each request's KV (keyed by req_id) until a decoder pulls it, it is
        released, or its TTL ends. A request that cannot run gets ok=False, the others go ahead."""
        server = self._prompt("prefill")
        items = []
        for r in reqs:
            items.append((r.req_id, prompt_ids(self.model, r) if r.prompt is not None else [], r.sampling_params()))
        return [PrefillResult.from_wire(w) for w in server.prefill(items)]

    def release(self, req_id: int) -> bool:
        """Free a held KV now (llm_datadist: remove_cache_key). False if none is held."""
        return self._prompt("release").release(req_id)

    def held_req_ids(self) -> list[int]:
        return self._prompt("held_req_ids").held_req_ids()

    def status(self) -> dict:
        """PROMPT: {'cluster_id', 'held', 'held_bytes', 'kv_ttl'} plus 'kv_bytes_sent'."""
        server = self._prompt("status")
        return {**server.status(), "kv_bytes_sent": server.bytes_sent}

    # ---- DECODER ---------------------------------------------------------------------------------
    def link(self, cluster_id: int, address: str) -> None:
        """Connect to the prompt process `cluster_id` listening at `address` ('host:port'): control
        channel, model check, and a fresh KV process group. LLMException(LLM_LINK_FAILED) if not."""
        self._dec("link").link(cluster_id, address)

    def unlink(self, cluster_id: int) -> None:
        self._dec("unlink").unlink(cluster_id)

    def linked_clusters(self) -> dict[int, str]:
        return self._dec("linked_clusters").linked_clusters()

    def check_link_status(self, cluster_id: int) -> dict:
        return self._dec("check_link_status").check_link_status(cluster_id)

    def remote_prefill(self, reqs: Sequence[LLMReq], cluster_id: int | None = None) -> list[PrefillResult]:
        """Ask a linked prompt cluster to prefill requests and hold their KV (the router's job in a
        real deployment; here so that one decoder process can drive everything)."""
        return self._dec("remote_prefill").remote_prefill(list(reqs), cluster_id)

    def pull_kv(self, req: LLMReq) -> PulledKV:
        """Fetch req's KV (real tokens only) from the prompt cluster holding it; held here until merge_kv.
        LLMException(LLM_KV_CACHE_NOT_EXIST) for an unknown, released, expired or already pulled id."""
        return self._dec("pull_kv").pull_kv(req)

    def merge_kv(self, req: LLMReq, batch_index: int | None = None) -> Request:
        """Put a pulled KV into a batch slot of the static cache. batch_index=None lets zoo pick (the
        lowest free slot, as soon as there is one); an int asks for that slot, which must be free.
        Returns the engine Request; drive() / results() run it."""
        return self._dec("merge_kv").merge_kv(req, batch_index)

    def pull_and_merge(self, req: LLMReq, batch_index: int | None = None) -> Request:
        """pull_kv + merge_kv (llm_datadist: CacheManager.pull_cache(cache_key, cache, batch_index))."""
        self.pull_kv(req)
        return self.merge_kv(req, batch_index)

    def submit(self, reqs: Sequence[LLMReq]) -> list[Request]:
        """Queue requests end to end (prefill on a prompt cluster -> pull -> merge -> decode); returns
        their engine Requests. Decoding advances whenever drive()/stream() steps the engine."""
        return self._dec("submit").submit(list(reqs))

    def drive(self, requests: Sequence[Request]) -> Iterator[StreamEvent]:
        return self._dec("drive").drive(list(requests))

    def stream(self, reqs: Sequence[LLMReq]) -> "PDStream":
        """submit() + drive(): yields StreamEvent(index=req_id, text, token_ids, finish_reason). A
        request that fails (its prompt process died, timed out, refused it) ends with finish_reason
        'error'; its GenerationResult.error says why. The others go on."""
        requests = self.submit(reqs)
        return PDStream(self.drive(requests), requests)

    def generate(self, reqs: Sequence[LLMReq]) -> list[GenerationResult]:
        """stream() to the end; one GenerationResult per request, failed ones included (not raised)."""
        stream = self.stream(reqs)
        for _ in stream:
            pass
        return stream.results

    def step(self) -> None:
        """One engine step (admit pulled requests into free slots, decode one token for all)."""
        self._dec("step").engine.step()

    def poll(self, timeout: float = 0.05) -> None:
        """step() if there is work, else wait up to `timeout` s for a pulled request to arrive: the
        loop body of a server that keeps accepting requests (see `python -m zoo.pd --stdin`)."""
        self._dec("poll").poll(timeout)

    def cancel(self, requests: Sequence[Request], reason: str = "cancelled") -> None:
        """Abort unfinished requests (their slots free up; KV still held for them is released)."""
        self._dec("cancel").cancel(list(requests), reason)

    @property
    def kv_bytes_received(self) -> int:
        return self._dec("kv_bytes_received").kv_bytes_received

    @property
    def kv_transfers(self) -> int:
        return self._dec("kv_transfers").kv_transfers

    @property
    def kv_transfer_seconds(self) -> float:
        return self._dec("kv_transfer_seconds").kv_transfer_seconds

    # ---- role checks -----------------------------------------------------------------------------
    def _prompt(self, call: str) -> PromptServer:
        return self._role_part(call, LLMRole.PROMPT, self._server)

    def _dec(self, call: str) -> Decoder:
        return self._role_part(call, LLMRole.DECODER, self._decoder)

    def _role_part(self, call: str, role: LLMRole, part):
        """`part` (this role's server or decoder) for `call`, or the error naming what is wrong."""
        if self.role is not role:
            raise LLMException(LLMStatusCode.LLM_PARAM_INVALID, f"{call} is a {role.name} call; this engine is "
                               f"{self.role.name}")
        if part is None:
            raise LLMException(LLMStatusCode.LLM_FAILED, f"{call}: call init() first (or init after finalize)")
        return part


# stream() returns zoo's own Stream (events + .results), under the name this API exported first
PDStream = Stream
