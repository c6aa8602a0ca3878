"""The typed control channel between a DECODER and a PROMPT process, and the PD error type.

Every control message is one frame: a 4-byte big-endian length, then that many bytes of UTF-8
JSON holding one object with an "op" (request) or "ok" (reply) field. Nothing received from the
network is ever unpickled or eval'd: a frame is parsed as JSON and each field is checked against
the type it must have (see `get`), so a malformed or hostile peer can at worst get an error reply
or have its connection closed.

The KV tensors themselves do not travel here; they go over the link's torch.distributed process
group (zoo/pd/transport.py). A control reply only describes them: shape, dtype, byte count, tag.

Requests (decoder -> prompt)                  Replies (prompt -> decoder)
  hello    {proto, cluster_id, link_id}         {ok, cluster_id, store_host, store_port, model, max_prefill_batch}
  open_kv  {}                                   {ok}   (sent after both sides built the process group)
  prefill  {requests: [{req_id, prompt_ids, sampling}]}
                                                {ok, results: [{req_id, ok, first_token, prompt_len, nbytes}
                                                               | {req_id, ok: false, status, message}]}
  pull     {req_id, tag}                        {ok, req_id, prompt_ids, sampling, first_token, first_logprob,
                                                 prompt_logprobs, kv_shape, dtype, nbytes, tag}, then the KV
                                                 bytes on the process group
  release  {req_id}                             {ok, released}
  status   {}                                   {ok, cluster_id, held, held_bytes, kv_ttl}
  bye      {}                                   {ok}
Any failed request gets {ok: false, status: <LLMStatusCode name>, message}.

Wire forms: `sampling` is an object with exactly the SAMPLING_FIELDS; its logit_bias is a list of
[token_id, bias] pairs (JSON object keys are strings). A token's logprob is [token_id, logprob,
[[token_id, logprob], ...]] (the top alternatives, most likely first), a logprob of null meaning
-inf; first_logprob is one (null unless the request asked for logprobs) and prompt_logprobs a list
of one per prompt token, the first null (null unless it asked for prompt_logprobs).
"""
from __future__ import annotations

import enum
import json
import math
import socket
import struct

PROTOCOL_VERSION = 2  # 2: the penalty / logit_bias / min_tokens / logprobs fields
# A prompt of 128k token ids is ~1 MB of JSON; anything near this bound is not a real message.
MAX_FRAME_BYTES = 16 * 2**20
_HEADER = struct.Struct("!I")

# The sampling fields that cross the wire, with the JSON types each may have (None = JSON null).
SAMPLING_FIELDS = {
    "max_new_tokens": (int,),
    "temperature": (int, float),
    "top_k": (int, type(None)),
    "top_p": (int, float, type(None)),
    "seed": (int, type(None)),
    "stop": (list,),
    "stop_token_ids": (list,),
    "ignore_eos": (bool,),
    "min_p": (int, float),
    "min_tokens": (int,),
    "presence_penalty": (int, float),
    "frequency_penalty": (int, float),
    "repetition_penalty": (int, float),
    "logit_bias": (list,),  # [[token_id, bias], ...]
    "logprobs": (int, type(None)),
    "prompt_logprobs": (int, type(None)),
}


class LLMStatusCode(enum.Enum):
    """Status codes, named after llm_datadist's LLMStatusCode where one exists."""

    LLM_SUCCESS = "LLM_SUCCESS"
    LLM_FAILED = "LLM_FAILED"  # anything else, e.g. an exception inside the prefill step
    LLM_WAIT_PROCESS_TIMEOUT = "LLM_WAIT_PROCESS_TIMEOUT"  # the peer did not answer in time; the link is dropped
    LLM_PARAM_INVALID = "LLM_PARAM_INVALID"  # bad request: empty prompt, bad sampling, busy batch_index, ...
    LLM_KV_CACHE_NOT_EXIST = "LLM_KV_CACHE_NOT_EXIST"  # unknown, already pulled, released, or expired req id
    LLM_REPEAT_REQUEST = "LLM_REPEAT_REQUEST"  # a req id that is already held (or being pulled)
    LLM_NOT_YET_LINK = "LLM_NOT_YET_LINK"  # no link to that prompt cluster
    LLM_ALREADY_LINK = "LLM_ALREADY_LINK"  # link() for a cluster id that is linked
    LLM_LINK_FAILED = "LLM_LINK_FAILED"  # connect / handshake / process-group set-up failed, or the link broke
    LLM_OUT_OF_MEMORY = "LLM_OUT_OF_MEMORY"  # the prompt side's max_held_bytes would be exceeded


class LLMException(RuntimeError):
    """A PD call failed. `status_code` says how (an LLMStatusCode), the message says why."""

    def __init__(self, status_code: LLMStatusCode, message: str):
        super().__init__(f"{status_code.value}: {message}")
        self.status_code = status_code
        self.message = message


class ProtocolError(LLMException):
    """The peer sent something that is not a valid message of this protocol."""

    def __init__(self, message: str):
        super().__init__(LLMStatusCode.LLM_LINK_FAILED, f"protocol error: {message}")


# ---- framing ------------------------------------------------------------------------------------
def send_msg(sock: socket.socket, msg: dict) -> None:
    data = json.dumps(msg, separators=(",", ":"), allow_nan=False).encode("utf-8")
    if len(data) > MAX_FRAME_BYTES:
        raise LLMException(LLMStatusCode.LLM_PARAM_INVALID,
                           f"control message of {len(data)} bytes exceeds {MAX_FRAME_BYTES}")
    sock.sendall(_HEADER.pack(len(data)) + data)


def recv_msg(sock: socket.socket) -> dict:
    """One frame -> dict. ConnectionError on a closed socket, socket.timeout (TimeoutError) when the
    socket's timeout passes, ProtocolError on a malformed frame."""
    (n,) = _HEADER.unpack(_recv_exact(sock, _HEADER.size))
    if n > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame of {n} bytes announced (limit {MAX_FRAME_BYTES})")
    try:
        msg = json.loads(_recv_exact(sock, n).decode("utf-8"))
    except (ValueError, RecursionError) as e:  # not UTF-8, not JSON, an int of > 4300 digits, too deep
        raise ProtocolError(f"frame is not UTF-8 JSON zoo can read: {type(e).__name__}: {e}") from None
    if not isinstance(msg, dict):
        raise ProtocolError(f"frame holds a {type(msg).__name__}, not an object")
    return msg


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise ConnectionError("the peer closed the connection")
        buf += chunk
    return bytes(buf)


# ---- typed field access -------------------------------------------------------------------------
def get(msg: dict, name: str, types: tuple, optional: bool = False, default=None):
    """msg[name], checked to be one of `types` (bool is never accepted as an int)."""
    if name not in msg:
        if optional:
            return default
        raise ProtocolError(f"message {msg.get('op', '')!r} lacks field {name!r}")
    value = msg[name]
    if isinstance(value, bool) and bool not in types:
        raise ProtocolError(f"field {name!r} must be {_names(types)}, got a bool")
    if not isinstance(value, types):
        raise ProtocolError(f"field {name!r} must be {_names(types)}, got {type(value).__name__}")
    return value


def get_int_list(msg: dict, name: str, optional: bool = False) -> list[int] | None:
    values = get(msg, name, (list,), optional)
    if values is None:
        return None
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ProtocolError(f"field {name!r} must be a list of ints")
    return values


def get_req_id(msg: dict) -> int:
    req_id = get(msg, "req_id", (int,))
    if not 0 <= req_id < 2**64:
        raise ProtocolError(f"req_id must be in [0, 2**64), got {req_id}")
    return req_id


def check_sampling(sampling) -> dict:
    """A wire sampling dict -> the same dict, with every field's type checked; unknown keys refused."""
    if not isinstance(sampling, dict):
        raise ProtocolError("field 'sampling' must be an object")
    unknown = set(sampling) - set(SAMPLING_FIELDS)
    if unknown:
        raise ProtocolError(f"unknown sampling field(s) {sorted(unknown)}")
    for name, types in SAMPLING_FIELDS.items():
        value = get(sampling, name, types)
        if isinstance(value, float) and not math.isfinite(value):
            raise ProtocolError(f"sampling {name!r} must be a finite number, got {value}")
    if not all(isinstance(s, str) for s in sampling["stop"]):
        raise ProtocolError("sampling 'stop' must be a list of strings")
    get_int_list(sampling, "stop_token_ids")
    seen = set()
    for pair in sampling["logit_bias"]:
        if not (isinstance(pair, list) and len(pair) == 2 and _is_int(pair[0]) and _is_number(pair[1])):
            raise ProtocolError("sampling 'logit_bias' must be a list of [token_id, bias] pairs")
        if pair[0] in seen:
            raise ProtocolError(f"sampling 'logit_bias' names token {pair[0]} twice")
        seen.add(pair[0])
    return sampling


def check_logprob(value, what: str) -> list:
    """A wire token logprob, [token_id, logprob | null, [[token_id, logprob | null], ...]], with every
    part's type checked (ints for ids, finite numbers or null for logprobs)."""
    def pair_ok(p) -> bool:
        return isinstance(p, list) and len(p) == 2 and _is_int(p[0]) and _is_logprob(p[1])

    if not (isinstance(value, list) and len(value) == 3 and pair_ok(value[:2]) and isinstance(value[2], list)
            and all(pair_ok(p) for p in value[2])):
        raise ProtocolError(f"{what} must be [token_id, logprob, [[token_id, logprob], ...]]")
    return value


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:  # JSON has no NaN / Infinity, but Python's json module reads them
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_logprob(value) -> bool:
    return value is None or _is_number(value)


def error_reply(status: LLMStatusCode, message: str) -> dict:
    return {"ok": False, "status": status.value, "message": message}


def raise_if_error(reply: dict, what: str) -> dict:
    """A reply with ok false -> LLMException carrying the peer's status and message."""
    if get(reply, "ok", (bool,)):
        return reply
    raise exception_from(reply, what)


def exception_from(reply: dict, what: str) -> LLMException:
    name = get(reply, "status", (str,), optional=True, default="LLM_FAILED")
    message = get(reply, "message", (str,), optional=True, default="(no message)")
    try:
        status = LLMStatusCode(name)
    except ValueError:
        status = LLMStatusCode.LLM_FAILED
    return LLMException(status, f"{what}: {message}")


def _names(types: tuple) -> str:
    return " or ".join("null" if t is type(None) else t.__name__ for t in types)
