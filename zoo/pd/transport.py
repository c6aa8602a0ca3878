"""KV transport: point-to-point torch.distributed sends over one process group per link.

Why a process group per link, built by hand, and not init_process_group(): the default group is
one per process, fixed for its lifetime, and any member's death poisons it. Here a decoder links
to prompt processes that come and go (a prompt process restarts, the decoder links again), so each
link gets its own 2-rank group, constructed directly from the backend class
(`ProcessGroupGloo(PrefixStore(prefix, store), rank, 2, options)` on cpu). The rendezvous happens
in the prompt process's TCPStore under a prefix unique to the link (a fresh uuid per link()), so a
new link never meets keys of an old one. A group whose peer died is simply dropped.

The prompt side is rank 0, the decoder rank 1. Backends come from zoo.device.collective_backend:
gloo on cpu (tested), nccl on cuda and hccl on npu (written against their documented
constructors, not run yet).

What moves: one tensor per request, [2 * layers, KV, prompt_len, hd] (every layer's k, then every
layer's v), sent as its raw bytes (a uint8 view, so any dtype goes through any backend). Only the
prompt's real tokens are in it, never the cache's padded max_seq_len. Both ends count the bytes.
"""
from __future__ import annotations

import datetime
import os
import threading

import torch
import torch.distributed as dist

PROMPT_RANK, DECODER_RANK = 0, 1
_STORE_PREFIX = "zoo-pd"


def parse_address(text: str) -> tuple[str, int]:
    """'host:port' (or '[v6]:port') -> (host, port)."""
    host, sep, port = str(text).rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"expected an address 'host:port', got {text!r}")
    return host, int(port)


def wire_device(backend: str, device: torch.device) -> torch.device:
    """Where the bytes are sent from / received into: gloo works on host memory; nccl and hccl
    move device memory directly."""
    return torch.device("cpu") if backend == "gloo" else device


def store_server(host: str, port: int, timeout_s: float) -> dist.TCPStore:
    """The prompt process's rendezvous store (port 0 = any free port; read .port)."""
    return dist.TCPStore(host, port, None, True, timeout=datetime.timedelta(seconds=timeout_s),
                         wait_for_workers=False)


def store_client(host: str, port: int, timeout_s: float) -> dist.TCPStore:
    return dist.TCPStore(host, port, None, False, timeout=datetime.timedelta(seconds=timeout_s))


def _new_process_group(backend: str, store, rank: int, timeout_s: float, local_host: str):
    timeout = datetime.timedelta(seconds=timeout_s)
    if backend == "gloo":
        options = dist.ProcessGroupGloo._Options()
        options._timeout = timeout
        # Bind gloo to the interface the control connection uses: it is known to reach the peer
        # (a hostname lookup may give an address the peer cannot reach). GLOO_SOCKET_IFNAME wins.
        ifname = os.environ.get("GLOO_SOCKET_IFNAME")
        device = (dist.ProcessGroupGloo.create_device(interface=ifname.split(",")[0]) if ifname
                  else dist.ProcessGroupGloo.create_device(hostname=local_host))
        options._devices = [device]
        return dist.ProcessGroupGloo(store, rank, 2, options)
    if backend == "nccl":  # not run yet: no GPU in the sessions so far
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, 2, options)
    if backend == "hccl":  # not run yet; torch_npu documents ProcessGroupHCCL(store, rank, size, timeout)
        import torch_npu  # noqa: F401  (registers torch.distributed.ProcessGroupHCCL)

        return dist.ProcessGroupHCCL(store, rank, 2, timeout)
    raise ValueError(f"unknown KV transport backend {backend!r}; use gloo, nccl or hccl")


class KVTransport:
    """One side of one link's process group. Not thread-safe: the owner serialises calls."""

    def __init__(self, store, link_id: str, rank: int, backend: str, device: torch.device, timeout_s: float,
                 local_host: str):
        self.rank, self.peer = rank, 1 - rank
        self.backend, self.device = backend, wire_device(backend, device)
        prefix_store = dist.PrefixStore(f"{_STORE_PREFIX}/{link_id}/", store)
        self.pg = _new_process_group(backend, prefix_store, rank, timeout_s, local_host)  # blocks until both joined
        self.bytes_sent = 0
        self.bytes_received = 0
        self._stats_lock = threading.Lock()

    def send(self, kv: torch.Tensor, tag: int) -> int:
        """Send one contiguous KV tensor's bytes to the peer; waits until gloo handed them over."""
        flat = kv.to(self.device).contiguous().reshape(-1).view(torch.uint8)
        self.pg.send([flat], self.peer, tag).wait()
        with self._stats_lock:
            self.bytes_sent += flat.numel()
        return flat.numel()

    def recv(self, shape: list[int], dtype: torch.dtype, tag: int) -> torch.Tensor:
        """Receive one KV tensor of `shape`/`dtype` (announced on the control channel) from the peer."""
        out = torch.empty(shape, dtype=dtype, device=self.device)  # [2 * layers, KV, prompt_len, hd]
        flat = out.reshape(-1).view(torch.uint8)
        self.pg.recv([flat], self.peer, tag).wait()
        with self._stats_lock:
            self.bytes_received += flat.numel()
        return out

    def close(self) -> None:
        """Drop the group. After a peer died or a timeout closed its pairs, there is nothing to
        flush; the destructor only releases sockets."""
        pg, self.pg = self.pg, None
        if pg is not None:
            try:
                pg.shutdown()
            except Exception:  # already broken, or a backend without shutdown(): dropping it is enough
                pass
