"""Tensor parallelism: who this process is (rank, world size, process group) and the traceable
collectives the parallel layers (zoo/layers/linear.py, embedding.py) use.

The collectives are `torch.distributed._functional_collectives`: they trace into
`torch.compile(fullgraph=True)` graphs with no graph break, and in eager mode they return
`AsyncCollectiveTensor`s that are waited for only when their values are used (mc2 overlap relies
on that). With world size 1 nothing here is ever called: the layers take their single-device path.

Process start-up (zoo.load(tp=N), `python -m zoo.llama.infer --tp N`, torchrun) lives in
zoo/tp_launch.py; this module only describes a rank.
"""
from __future__ import annotations

import os
import pickle
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


def torchrun_env() -> tuple[int, int] | None:
    """(rank, world size) when started by torchrun (RANK / WORLD_SIZE set), else None."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return None


# ---- zoo.load(tp=N): ranks in worker processes, driven in lockstep from the caller ---------
class TPWorkerError(RuntimeError):
    """A tensor-parallel rank died, hung past the timeout, or failed to start."""


def _plain(obj) -> dict:
    import dataclasses

    return dataclasses.asdict(obj)


def _worker(rank: int, world_size: int, port: int, model_path: str, load_kwargs: dict, use_mc2: bool,
            seed: int, threads: int, timeout_s: float, conn) -> None:
    """One rank: join the group, load this rank's shard, then run the commands the caller sends to
    every rank (the same ones in the same order, so the engines stay in lockstep; the collectives
    inside each forward keep them in step). Only rank 0 sends payloads back; the others send
    their status. Results and stream events travel as plain data (dicts of ints / strs)."""
    import traceback

    def reply(status, payload=None):
        try:
            conn.send((status, payload if rank == 0 or status != "ok" else None))
        except (BrokenPipeError, EOFError, OSError):
            raise SystemExit(1)

    try:
        _set_threads(threads)
        from zoo.api import load
        from zoo.device import resolve_device

        ctx = init_rank(rank, world_size, resolve_device(load_kwargs.get("device", "cpu")),
                        f"tcp://127.0.0.1:{port}", timeout_s, use_mc2)
        kwargs = dict(load_kwargs, verbose=load_kwargs.get("verbose", False) and rank == 0)
        model = load(model_path, tp=ctx, **kwargs)
        model.engine.seed_default_generator(seed)  # identical sampling noise on every rank
        model.engine.runner.log_compiles = rank == 0
        reply("ok", {"num_parameters": model.num_parameters, "buckets": model.buckets,
                     "max_seq_len": model.max_seq_len, "dtype": str(model.dtype).replace("torch.", "")})
    except Exception as e:  # noqa: BLE001 - reported to the caller, as itself when it pickles
        try:
            conn.send(("exception", e))
        except Exception:  # noqa: BLE001
            reply("error", f"rank {rank} failed to start: {type(e).__name__}: {e}\n{traceback.format_exc()}")
        return
    streams = {}
    while True:
        try:
            cmd, args = conn.recv()
        except (EOFError, OSError):
            break  # the caller is gone
        try:
            if cmd == "close":
                reply("ok")
                break
            if cmd == "generate":
                out = model.generate(**args)
                reply("ok", [_plain(r) for r in out] if isinstance(out, list) else _plain(out))
            elif cmd == "warmup":
                model.warmup(**args)
                reply("ok")
            elif cmd == "info":
                reply("ok", {"compile_seconds": model.compile_seconds})
            elif cmd == "stream_open":
                sid, kwargs = args
                streams[sid] = model.stream(**kwargs)
                reply("ok")
            elif cmd == "stream_next":
                event = next(streams[args], None)
                if event is None:
                    reply("ok", ("end", [_plain(r) for r in streams.pop(args).results]))
                else:
                    reply("ok", ("event", _plain(event)))
            elif cmd == "stream_close":
                stream = streams.pop(args, None)
                if stream is not None:
                    stream.close()
                reply("ok")
            else:
                reply("error", f"unknown command {cmd!r}")
        except Exception as e:  # noqa: BLE001 - same error on every rank; the caller re-raises it
            try:
                conn.send(("exception", e))
            except Exception:  # noqa: BLE001 - not picklable
                reply("error", f"{type(e).__name__}: {e}")
    try:
        import torch.distributed as dist

        dist.destroy_process_group()
    except Exception:  # noqa: BLE001
        pass


class TPModel:
    """The caller's handle on a model whose ranks run in worker processes (zoo.load(..., tp=N)).
    Same generate / stream / warmup API as zoo.api.Model; every call is sent to all ranks and
    rank 0's answer is returned. If a rank dies, or reports an error its peers cannot recover from
    (e.g. a collective timed out because another rank hung), every rank is stopped and
    TPWorkerError is raised; the model is closed from then on."""

    POLL_S = 0.1

    def __init__(self, model_path: str, tp: int, load_kwargs: dict, use_mc2: bool = False,
                 timeout_s: float | None = None):
        import random

        import torch.multiprocessing as mp

        from zoo.config import ModelConfig
        from zoo.tokenizer import Tokenizer

        self.path, self.tp_size, self.use_mc2 = model_path, tp, use_mc2
        self.timeout_s = timeout_s or DEFAULT_TIMEOUT_S
        self.config = ModelConfig.from_dir(model_path)
        self.tokenizer = Tokenizer.from_dir(model_path)
        self._closed = False
        self._next_stream = 0
        ctx = mp.get_context("spawn")
        port = free_port()
        seed = random.randrange(2**62)
        threads = max(1, (os.cpu_count() or 1) // tp)
        self._conns, self._procs = [], []
        for rank in range(tp):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, name=f"zoo-tp-rank{rank}", daemon=True,
                               args=(rank, tp, port, model_path, load_kwargs, use_mc2, seed, threads,
                                     self.timeout_s, child))
            proc.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(proc)
        import atexit

        atexit.register(self.close)
        info = self._collect(starting=True)
        self.num_parameters = info["num_parameters"]  # of rank 0's shard
        self.buckets, self.max_seq_len = info["buckets"], info["max_seq_len"]
        self.dtype = getattr(torch, info["dtype"])

    # ---- plumbing ----------------------------------------------------------------------------
    def _fail(self, message: str):
        self._terminate()
        raise TPWorkerError(message)

    def _terminate(self) -> None:
        self._closed = True
        for proc in self._procs:
            if proc.is_alive():
                proc.terminate()
        for proc in self._procs:
            proc.join(timeout=5)
            if proc.is_alive():  # e.g. stopped (SIGSTOP): SIGTERM stays pending, SIGKILL does not
                proc.kill()
                proc.join(timeout=5)
        for conn in self._conns:
            conn.close()

    def _collect(self, starting: bool = False):
        """Every rank's reply; rank 0's payload. Watches the ranks while waiting."""
        replies: dict[int, tuple] = {}
        while len(replies) < len(self._conns):
            for rank, (conn, proc) in enumerate(zip(self._conns, self._procs)):
                if rank in replies:
                    continue
                try:
                    ready = conn.poll(self.POLL_S / len(self._conns))
                    if ready:
                        replies[rank] = conn.recv()
                except (EOFError, OSError):
                    ready, proc_alive = False, False
                else:
                    proc_alive = proc.is_alive()
                if rank in replies:
                    status, payload = replies[rank]
                    if status == "error":
                        self._fail(f"tensor-parallel rank {rank}: {payload}")
                    if status == "exception":
                        if starting and isinstance(payload, Exception):  # e.g. CheckpointError: as itself
                            self._terminate()
                            raise payload
                        if isinstance(payload, Exception) and not _is_collective_failure(payload):
                            # a request error: every rank raised it alike, and they are still in step
                            self._drain(replies)
                            raise payload
                        self._fail(f"tensor-parallel rank {rank} failed: {type(payload).__name__}: {payload}")
                elif not proc_alive:
                    what = "while starting" if starting else "while running"
                    self._fail(f"tensor-parallel rank {rank} died {what} (exit code {proc.exitcode}); "
                               "all ranks were stopped")
        return replies[0][1]

    def _drain(self, replies: dict) -> None:
        for rank, conn in enumerate(self._conns):
            if rank not in replies:
                while not conn.poll(self.POLL_S):
                    if not self._procs[rank].is_alive():
                        self._fail(f"tensor-parallel rank {rank} died (exit code {self._procs[rank].exitcode})")
                conn.recv()

    def _call(self, cmd: str, args=None):
        if self._closed:
            raise TPWorkerError("this tensor-parallel model is closed (a rank failed or close() was called)")
        for rank, conn in enumerate(self._conns):
            try:
                conn.send((cmd, args))
            except (BrokenPipeError, OSError):
                self._fail(f"tensor-parallel rank {rank} is gone (exit code {self._procs[rank].exitcode})")
        return self._collect()

    # ---- Model API ---------------------------------------------------------------------------
    def generate(self, prompts, max_new_tokens: int = 64, temperature: float = 0.0, top_k=None, top_p=None,
                 seed=None, stop=None, stop_token_ids=None, ignore_eos: bool = False):
        from zoo.engine import GenerationResult

        out = self._call("generate", dict(prompts=prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                                          top_k=top_k, top_p=top_p, seed=seed, stop=stop,
                                          stop_token_ids=stop_token_ids, ignore_eos=ignore_eos))
        return [GenerationResult(**r) for r in out] if isinstance(out, list) else GenerationResult(**out)

    def stream(self, prompts, max_new_tokens: int = 64, temperature: float = 0.0, top_k=None, top_p=None,
               seed=None, stop=None, stop_token_ids=None, ignore_eos: bool = False) -> "TPStream":
        sid = self._next_stream
        self._next_stream += 1
        self._call("stream_open", (sid, dict(prompts=prompts, max_new_tokens=max_new_tokens,
                                             temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                                             stop=stop, stop_token_ids=stop_token_ids, ignore_eos=ignore_eos)))
        return TPStream(self, sid)

    def warmup(self, batch_sizes=None, prompt_lens=None) -> None:
        self._call("warmup", dict(batch_sizes=batch_sizes, prompt_lens=prompt_lens))

    @property
    def compile_seconds(self) -> float:
        return self._call("info")["compile_seconds"]

    def close(self) -> None:
        if self._closed:
            return
        try:
            for conn in self._conns:
                conn.send(("close", None))
            for proc in self._procs:
                proc.join(timeout=10)
        except (BrokenPipeError, OSError):
            pass
        self._terminate()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _is_collective_failure(e: Exception) -> bool:
    from zoo.engine import RequestError

    return not isinstance(e, (RequestError, ValueError, TypeError, KeyError))


class TPStream:
    """StreamEvents of one TPModel.stream() call, fetched from rank 0 one at a time (every rank
    advances its own stream by the same event, so they stay in step)."""

    def __init__(self, model: TPModel, sid: int):
        self._model, self._sid = model, sid
        self._results = None

    def __iter__(self) -> "TPStream":
        return self

    def __next__(self):
        from zoo.engine import GenerationResult, StreamEvent

        if self._results is not None:
            raise StopIteration
        kind, payload = self._model._call("stream_next", self._sid)
        if kind == "end":
            self._results = [GenerationResult(**r) for r in payload]
            raise StopIteration
        return StreamEvent(**payload)

    def close(self) -> None:
        if self._results is None and not self._model._closed:
            self._model._call("stream_close", self._sid)
            self._results = []

    @property
    def results(self):
        return self._results or []


# ---- run a function on every rank (tests, benchmarks) --------------------------------------
def _set_threads(threads: int) -> None:
    """Ranks share the machine's cores: `threads` each, and inductor compiles in-process when a
    rank has one core (a pool of compile workers per rank would each import torch first)."""
    torch.set_num_threads(threads)
    if threads == 1:
        os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")


def _run_rank(rank, world_size, port, device, use_mc2, fn, args, threads, conn):
    try:
        _set_threads(threads)
        ctx = init_rank(rank, world_size, torch.device(device), f"tcp://127.0.0.1:{port}", use_mc2=use_mc2)
        result = ("ok", fn(ctx, *args))
    except BaseException as e:  # noqa: BLE001
        import traceback

        result = ("error", f"rank {rank}: {type(e).__name__}: {e}\n{traceback.format_exc()}")
    # plain pickle: tensors travel by value (torch's shared-memory reduction would need this
    # process to outlive the read)
    conn.send_bytes(pickle.dumps(result))


def run_ranks(fn, world_size: int, *args, device: str = "cpu", use_mc2: bool = False,
              timeout_s: float = 300.0) -> list:
    """fn(TPContext, *args) on `world_size` spawned ranks of a fresh process group -> each rank's
    return value (fn must be importable by name, and its results picklable)."""
    import time

    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    port = free_port()
    threads = max(1, (os.cpu_count() or 1) // world_size)
    conns, procs = [], []
    for rank in range(world_size):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_run_rank, daemon=True,
                           args=(rank, world_size, port, device, use_mc2, fn, args, threads, child))
        proc.start()
        child.close()
        conns.append(parent)
        procs.append(proc)
    results: dict[int, object] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(results) < world_size:
            for rank, (conn, proc) in enumerate(zip(conns, procs)):
                if rank in results:
                    continue
                if conn.poll(0.05):
                    status, value = pickle.loads(conn.recv_bytes())
                    if status != "ok":
                        raise TPWorkerError(value)
                    results[rank] = value
                elif not proc.is_alive():
                    raise TPWorkerError(f"rank {rank} died (exit code {proc.exitcode})")
            if time.monotonic() > deadline:
                raise TPWorkerError(f"ranks did not finish within {timeout_s} s")
    finally:
        for proc in procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
    return [results[r] for r in range(world_size)]
