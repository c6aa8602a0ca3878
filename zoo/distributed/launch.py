"""Rank processes: run one object per tensor-parallel rank in spawned workers, driven in lockstep.

`RankGroup(world_size, build, args)` spawns the ranks; each joins the process group and builds
its object with `build(TPContext, *args)` (zoo.api passes the function that loads a Model shard).
The caller then works through `RemoteObject`s: an attribute or method of the rank objects is
looked up *by name* on every rank, with the caller's own arguments, and rank 0's answer comes
back. So a proxy never restates the object's API, and cannot drift from it. A method that
returns an iterator (Model.stream), or an object that cannot be pickled (Model.driver), returns
another RemoteObject, advanced / called on every rank alike.

Every rank runs the same calls in the same order, so their engines stay in step (the collectives
inside each forward keep them in step too). A rank that dies or hangs past the process-group
timeout stops the whole group and raises TPWorkerError.

This module imports nothing above zoo.distributed: what a rank builds is the caller's choice.
"""
from __future__ import annotations

import multiprocessing
import os
import pickle
import time
from collections.abc import Iterator

import torch

from zoo.distributed.comm import DEFAULT_TIMEOUT_S, free_port, init_rank
from zoo.errors import RequestError, TPWorkerError

# Set in the environment the ranks are spawned with. A rank whose start-up re-runs the caller's
# script (no `if __name__ == "__main__":` guard) finds it set and stops with UNGUARDED_EXIT_CODE.
SPAWNING_ENV = "ZOO_TP_RANK_STARTING"
UNGUARDED_EXIT_CODE = 86
UNGUARDED_MESSAGE = (
    "the script that asked for tensor-parallel ranks (zoo.load(..., tp=N)) has no `if __name__ == \"__main__\":` "
    "guard. The ranks start with multiprocessing's 'spawn' method, which runs the main script's top level again "
    "in every new process, so each rank tried to start ranks of its own. Put the code that loads and uses the "
    "model under `if __name__ == \"__main__\":` (see docs/tensor_parallel.md)")

# Errors a method raises alike on every rank because of its arguments: the ranks are still in step.
_REQUEST_ERRORS = (RequestError, ValueError, TypeError, KeyError, AttributeError)


def refuse_unguarded_start() -> None:
    """Called before starting ranks. A rank process inherits SPAWNING_ENV; a rank asked to start
    ranks is the caller's script re-running its top level in that rank (no __main__ guard), before
    multiprocessing has even handed the rank its work: stop quietly, the caller explains."""
    if os.environ.get(SPAWNING_ENV):
        os._exit(UNGUARDED_EXIT_CODE)


def set_threads(threads: int) -> None:
    """Ranks share the machine's cores: `threads` each, and inductor compiles in-process when a
    rank has one core (a pool of compile workers per rank would each import torch first)."""
    torch.set_num_threads(threads)
    if threads == 1:
        os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")


def spawn_ranks(world_size: int, target, args_for_rank) -> tuple[list, list]:
    """Start `world_size` processes running target(*args_for_rank(rank), conn) -> (pipes, processes)."""
    refuse_unguarded_start()
    ctx = multiprocessing.get_context("spawn")
    conns, procs = [], []
    previous = os.environ.get(SPAWNING_ENV)
    os.environ[SPAWNING_ENV] = "1"  # inherited by the children at start(), removed here right after
    try:
        for rank in range(world_size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=target, name=f"zoo-tp-rank{rank}", daemon=True,
                               args=(*args_for_rank(rank), child))
            proc.start()
            child.close()
            conns.append(parent)
            procs.append(proc)
    finally:
        if previous is None:
            os.environ.pop(SPAWNING_ENV, None)
        else:
            os.environ[SPAWNING_ENV] = previous
    return conns, procs


def default_threads(world_size: int) -> int:
    return max(1, (os.cpu_count() or 1) // world_size)


# ---- the rank side ------------------------------------------------------------------------------
def _serve_rank(rank: int, world_size: int, port: int, device: str, use_mc2: bool, timeout_s: float,
                threads: int, build, build_args: tuple, conn) -> None:
    """One rank: join the group, build the object, then answer the caller's requests until "close"."""
    import traceback

    def reply(status, payload=None):
        try:
            conn.send((status, payload if rank == 0 or status != "ok" else None))
        except (BrokenPipeError, EOFError, OSError):
            raise SystemExit(1)
        except (pickle.PicklingError, TypeError, AttributeError) as e:  # a value that cannot travel
            conn.send(("exception", TypeError(f"the answer cannot be sent from the rank processes: {e}")))

    _exit_when_orphaned()
    try:
        set_threads(threads)
        ctx = init_rank(rank, world_size, torch.device(device), f"tcp://127.0.0.1:{port}", timeout_s, use_mc2)
        objects = {0: build(ctx, *build_args)}  # handle -> object; 0 = the built object
    except Exception as e:  # noqa: BLE001 - reported to the caller, as itself when it pickles
        try:
            conn.send(("exception", e))
        except Exception:  # noqa: BLE001
            reply("error", f"rank {rank} failed to start: {type(e).__name__}: {e}\n{traceback.format_exc()}")
        return
    reply("ok")
    next_handle = 1

    def wrap(value):
        """An iterator, or an object that cannot be pickled (e.g. one holding a lock), stays here (a
        new handle); anything else travels by value. Every rank decides alike: same code, same types."""
        nonlocal next_handle
        if isinstance(value, Iterator) or not _travels(value):
            objects[next_handle] = value
            next_handle += 1
            return ("handle", next_handle - 1)
        return ("value", value)

    while True:
        try:
            op, handle, name, args, kwargs = conn.recv()
        except (EOFError, OSError):
            break  # the caller is gone
        try:
            if op == "close":
                reply("ok")
                break
            obj = objects[handle]
            if op == "getattr":
                value = getattr(obj, name)
                reply("ok", ("method", None) if callable(value) and not isinstance(value, Iterator) else wrap(value))
            elif op == "call":
                reply("ok", wrap(getattr(obj, name)(*args, **kwargs)))
            elif op == "next":
                try:
                    reply("ok", ("value", next(obj)))
                except StopIteration:
                    reply("ok", ("stop", None))
            elif op == "release":
                objects.pop(handle, None)
                reply("ok")
            else:
                reply("error", f"unknown operation {op!r}")
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


def _travels(value) -> bool:
    """Whether `value` can be sent to the caller (pickled)."""
    if isinstance(value, (type(None), bool, int, float, str, bytes)):
        return True
    try:
        pickle.dumps(value)
    except Exception:  # noqa: BLE001 - PicklingError, TypeError, AttributeError, ...
        return False
    return True


def _exit_when_orphaned(poll_s: float = 0.5) -> None:
    """A rank whose caller died stops within poll_s, even in the middle of a long call (otherwise
    it would finish that call, and its peers with it, for nobody)."""
    import threading

    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent:  # re-parented: the caller is gone
                os._exit(1)

    threading.Thread(target=watch, name="zoo-rank-orphan-watch", daemon=True).start()


# ---- the caller side ----------------------------------------------------------------------------
class RankGroup:
    """`world_size` rank processes, each holding `build(TPContext, *build_args)`. `root` is the
    RemoteObject for those objects. If a rank dies, or reports an error its peers cannot recover
    from (a collective timed out because another rank hung), every rank is stopped and
    TPWorkerError is raised; the group is closed from then on."""

    POLL_S = 0.1

    def __init__(self, world_size: int, build, build_args: tuple = (), *, device: str = "cpu",
                 use_mc2: bool = False, timeout_s: float | None = None, threads: int | None = None):
        self.world_size = world_size
        self.timeout_s = timeout_s or DEFAULT_TIMEOUT_S
        self.closed = False
        self.unused_handles: list[int] = []  # released before the next request (see RemoteObject.__del__)
        port = free_port()
        threads = threads or default_threads(world_size)
        self._conns, self._procs = spawn_ranks(
            world_size, _serve_rank,
            lambda rank: (rank, world_size, port, device, use_mc2, self.timeout_s, threads, build, build_args))
        import atexit

        atexit.register(self.close)
        self._collect(starting=True)
        self.root = RemoteObject(self, 0)

    @property
    def pids(self) -> list[int]:
        """Process ids of the ranks, rank order."""
        return [proc.pid for proc in self._procs]

    # ---- requests ----------------------------------------------------------------------------
    def request(self, op: str, handle: int = 0, name: str | None = None, args: tuple = (), kwargs: dict | None = None):
        """Send one operation to every rank; rank 0's payload."""
        if self.closed:
            raise TPWorkerError("this tensor-parallel model is closed (a rank failed or close() was called)")
        while self.unused_handles:  # remote objects (streams) the caller dropped: free them on the ranks
            self._send_and_collect("release", self.unused_handles.pop(), None, (), {})
        return self._send_and_collect(op, handle, name, args, kwargs or {})

    def _send_and_collect(self, op: str, handle: int, name: str | None, args: tuple, kwargs: dict):
        for rank, conn in enumerate(self._conns):
            try:
                conn.send((op, handle, name, args, kwargs))
            except (BrokenPipeError, OSError):
                self._fail(f"tensor-parallel rank {rank} is gone (exit code {self._procs[rank].exitcode})")
        return self._collect()

    def close(self) -> None:
        if self.closed:
            return
        try:
            for conn in self._conns:
                conn.send(("close", 0, None, (), {}))
            for proc in self._procs:
                proc.join(timeout=10)
        except (BrokenPipeError, OSError):
            pass
        self._terminate()

    # ---- plumbing ----------------------------------------------------------------------------
    def _fail(self, message: str):
        self._terminate()
        raise TPWorkerError(message)

    def _terminate(self) -> None:
        self.closed = True
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
        """Every rank's reply; rank 0's payload. Watches the ranks while waiting: a rank that dies
        fails the call at once, and one that has not answered timeout_s after another did is taken
        as hung (calls that run no collective would otherwise wait for it forever)."""
        replies: dict[int, tuple] = {}
        deadline = None
        while len(replies) < len(self._conns):
            if replies and deadline is None:
                deadline = time.monotonic() + self.timeout_s
            if deadline is not None and time.monotonic() > deadline:
                late = [r for r in range(len(self._conns)) if r not in replies]
                self._fail(f"tensor-parallel rank{'s' if len(late) > 1 else ''} {', '.join(map(str, late))} did not "
                           f"answer within {self.timeout_s:g} s of rank {min(replies)} (hung?); all ranks were stopped")
            for rank, (conn, proc) in enumerate(zip(self._conns, self._procs)):
                if rank in replies:
                    continue
                try:
                    if conn.poll(self.POLL_S / len(self._conns)):
                        replies[rank] = conn.recv()
                except (EOFError, OSError):
                    alive = False
                else:
                    alive = proc.is_alive()
                if rank in replies:
                    self._check(rank, replies, starting)
                elif not alive:
                    proc.join(timeout=1)
                    if proc.exitcode == UNGUARDED_EXIT_CODE:
                        self._fail(UNGUARDED_MESSAGE)
                    what = "while starting" if starting else "while running"
                    self._fail(f"tensor-parallel rank {rank} died {what} (exit code {proc.exitcode}); "
                               "all ranks were stopped")
        return replies[0][1]

    def _check(self, rank: int, replies: dict, starting: bool) -> None:
        status, payload = replies[rank]
        if status == "error":
            self._fail(f"tensor-parallel rank {rank}: {payload}")
        if status != "exception":
            return
        if starting and isinstance(payload, Exception):  # e.g. CheckpointError: as itself
            self._terminate()
            raise payload
        if isinstance(payload, _REQUEST_ERRORS):
            self._drain(replies)  # every rank raised it alike, and they are still in step
            raise payload
        # A collective that timed out fails on the ranks that waited; the rank they waited for is
        # the one that has not answered (hung, or stuck elsewhere): name it.
        silent = [r for r in range(len(self._conns)) if r not in replies and not self._conns[r].poll(0)]
        blame = (f"tensor-parallel rank{'s' if len(silent) > 1 else ''} {', '.join(map(str, silent))} stopped "
                 f"answering; " if silent else "")
        self._fail(f"{blame}tensor-parallel rank {rank} failed: {type(payload).__name__}: {payload}")

    def _drain(self, replies: dict) -> None:
        for rank, conn in enumerate(self._conns):
            if rank not in replies:
                while not conn.poll(self.POLL_S):
                    if not self._procs[rank].is_alive():
                        self._fail(f"tensor-parallel rank {rank} died (exit code {self._procs[rank].exitcode})")
                conn.recv()


class RemoteObject:
    """An object that lives on every rank of a RankGroup, used by name: `remote.attr` reads rank 0's
    value, `remote.method(...)` runs the method on every rank, and iterating advances the ranks'
    iterators together."""

    def __init__(self, group: RankGroup, handle: int):
        self._group, self._handle = group, handle
        self._methods: set[str] = set()  # names known to be methods: calling them is one round trip

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        if name in self._methods:
            return _RemoteMethod(self._group, self._handle, name)
        kind, value = self._group.request("getattr", self._handle, name)
        if kind == "method":
            self._methods.add(name)
            return _RemoteMethod(self._group, self._handle, name)
        return RemoteObject(self._group, value) if kind == "handle" else value

    def __del__(self) -> None:
        # no round trip here (this may run in the middle of another request): the group frees it
        # on the ranks before its next request
        if self._handle != 0 and not self._group.closed:
            self._group.unused_handles.append(self._handle)

    def __iter__(self) -> "RemoteObject":
        return self

    def __next__(self):
        kind, value = self._group.request("next", self._handle)
        if kind == "stop":
            raise StopIteration
        return value


class _RemoteMethod:
    def __init__(self, group: RankGroup, handle: int, name: str):
        self._group, self._handle, self.__name__ = group, handle, name

    def __call__(self, *args, **kwargs):
        kind, value = self._group.request("call", self._handle, self.__name__, args, kwargs)
        return RemoteObject(self._group, value) if kind == "handle" else value


# ---- run a function on every rank (tests, benchmarks) -------------------------------------------
def _run_rank(rank, world_size, port, device, use_mc2, fn, args, threads, conn):
    try:
        set_threads(threads)
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
    port = free_port()
    threads = default_threads(world_size)
    conns, procs = spawn_ranks(world_size, _run_rank,
                               lambda rank: (rank, world_size, port, device, use_mc2, fn, args, threads))
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
