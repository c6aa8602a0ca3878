"""Tensor parallelism: who this process is (rank, world size, process group) and the traceable
collectives the parallel layers (zoo/layers/linear.py, embedding.py) use.

The collectives are `torch.distributed._functional_collectives`: they trace into
`torch.compile(fullgraph=True)` graphs with no graph break, and in eager mode they return
`AsyncCollectiveTensor`s that are waited for only when their values are used (mc2 overlap relies
on that). With world size 1 nothing here is ever called: the layers take their single-device path.

Process start-up (zoo.load(tp=N), `python -m zoo.llama.infer --tp N`) lives in
zoo/distributed/launch.py; this module only describes a rank and joins its process group.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from datetime import timedelta

import torch

DEFAULT_TIMEOUT_S = float(os.environ.get("ZOO_TP_TIMEOUT", "120"))


@dataclass
class TPContext:
    """This rank's place in the tensor-parallel group. group None with world_size 1 = no TP.
    (group may also be None with world_size > 1 for offline sharding: loading needs no collectives.)"""

    rank: int = 0
    world_size: int = 1
    group: object = field(default=None, repr=False)  # torch.distributed ProcessGroup
    use_mc2: bool = False
    mc2_chunks: int = 2

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def shard(self, size: int, what: str) -> tuple[int, int]:
        """[start, stop) of this rank's equal slice of `size` (which must divide evenly)."""
        if size % self.world_size:
            raise ValueError(f"{what} ({size}) is not divisible by the tensor-parallel size {self.world_size}")
        n = size // self.world_size
        return self.rank * n, (self.rank + 1) * n

    def fingerprint(self) -> dict:
        return {"size": self.world_size, "rank": self.rank, "mc2": self.use_mc2}


SINGLE = TPContext()


def as_context(tp) -> TPContext:
    if tp is None:
        return SINGLE
    if isinstance(tp, TPContext):
        return tp
    raise TypeError(f"expected a TPContext, got {type(tp).__name__}")


# ---- collectives (traceable) ---------------------------------------------------------------
def all_reduce(x: torch.Tensor, tp: TPContext) -> torch.Tensor:
    from torch.distributed import _functional_collectives as funcol

    return funcol.all_reduce(x, "sum", tp.group)


def all_gather_last_dim(x: torch.Tensor, tp: TPContext) -> torch.Tensor:
    """[..., n] on every rank -> [..., n * world_size], rank order.

    Done as zero-pad to the full width + all_reduce (exact: every element is one rank's value
    plus zeros) rather than all_gather: inductor's cpp_wrapper (zoo's CPU default) cannot call
    the functional all_gather (torch 2.13: "arg type Any is not yet supported by
    custom_op_wrapper") but can call all_reduce. The only gathered tensor is the LM head's
    last-token logits, [B, V], so the extra bytes are small."""
    n = x.shape[-1]
    full = torch.nn.functional.pad(x, (tp.rank * n, (tp.world_size - 1 - tp.rank) * n))
    return all_reduce(full, tp)


def wait(x: torch.Tensor) -> torch.Tensor:
    from torch.distributed import _functional_collectives as funcol

    return funcol.wait_tensor(x) if isinstance(x, funcol.AsyncCollectiveTensor) else x


# ---- process group set-up ------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_rank(rank: int, world_size: int, device: torch.device, init_method: str | None = None,
              timeout_s: float | None = None, use_mc2: bool = False) -> TPContext:
    """Join the process group (gloo on cpu, nccl on cuda, hccl on npu: zoo.device.collective_backend)."""
    import torch.distributed as dist

    from zoo.device import collective_backend

    if device.type == "cpu":
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    if not dist.is_initialized():
        dist.init_process_group(collective_backend(device), init_method=init_method or "env://", rank=rank,
                                world_size=world_size, timeout=timedelta(seconds=timeout_s or DEFAULT_TIMEOUT_S))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return TPContext(rank, world_size, dist.group.WORLD, use_mc2=use_mc2)
