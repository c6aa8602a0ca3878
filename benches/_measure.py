"""Measurement helpers for compare_eager_vs_graph.py: statistics, memory bandwidth, RSS, the
environment, a CPU-contention monitor, and the client side of the per-variant worker processes.

Only the standard library and torch; nothing here imports zoo or transformers.
"""
from __future__ import annotations

import json
import math
import os
import platform
import queue
import resource
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "_worker.py")


# ---- statistics ---------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]) of a non-empty list."""
    xs = sorted(values)
    if len(xs) == 1:
        return xs[0]
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(values: list[float]) -> dict | None:
    """{median, p90, min, max, n, values} of the repetitions, or None when there are none."""
    values = [float(v) for v in values if v is not None and not math.isnan(v)]
    if not values:
        return None
    return {"median": percentile(values, 50), "p90": percentile(values, 90), "min": min(values),
            "max": max(values), "n": len(values), "values": values}


# ---- memory -------------------------------------------------------------------------------------
def interleaved_medians(fns: dict, arg, repeats: int) -> dict[str, float]:
    """Seconds per call of each fn(arg), median of `repeats` rounds that call every fn once, in
    order then in reverse (ABC CBA), after two untimed calls each."""
    for fn in fns.values():
        fn(arg), fn(arg)
    times = {name: [] for name in fns}
    for rep in range(repeats):
        for name in (list(fns) if rep % 2 == 0 else list(reversed(fns))):
            t0 = time.perf_counter()
            fns[name](arg)
            times[name].append(time.perf_counter() - t0)
    return {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}


def ms_and_bandwidth(seconds: float, nbytes: float) -> str:
    """A table cell: "3.87 (12 GB/s)" for a call of `seconds` that read `nbytes`."""
    return f"{seconds * 1e3:.2f} ({nbytes / seconds / 1e9:.0f} GB/s)"


def proc_status_kib(field: str, pid: int | str = "self") -> int | None:
    """A kB field of /proc/<pid>/status (VmHWM = peak RSS, VmRSS = current RSS)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_rss_mib() -> float:
    kib = proc_status_kib("VmHWM")
    if kib is None:  # not Linux: ru_maxrss is KiB on Linux, bytes on macOS
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 1024.0


def mem_available_bytes() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def measure_bandwidth(nbytes: int, repeats: int, threads: int | None = None, copy: bool = True) -> dict:
    """This machine's memory bandwidth with all threads, best of `repeats`: reading a large fp32
    and bf16 tensor (sum) and copying one (read + write counted). GB/s = 1e9 bytes/s.

    `read_gbs` (the best read) is the roofline a weight-streaming decode step is compared with."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    n32 = nbytes // 4
    out: dict = {"bytes": n32 * 4, "repeats": repeats, "threads": torch.get_num_threads()}
    a = torch.empty(n32, dtype=torch.float32).uniform_()

    def best(fn) -> float:
        fn()  # first touch / page faults
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    out["sum_fp32_gbs"] = a.numel() * 4 / best(lambda: a.sum()) / 1e9
    b16 = a.view(torch.bfloat16)  # same bytes, read as 2x as many bf16 elements
    out["sum_bf16_gbs"] = b16.numel() * 2 / best(lambda: b16.sum()) / 1e9
    if copy:
        dst = torch.empty_like(a)
        out["copy_gbs"] = 2 * a.numel() * 4 / best(lambda: dst.copy_(a)) / 1e9  # read + write
        del dst
    del a, b16
    out["read_gbs"] = max(out["sum_fp32_gbs"], out["sum_bf16_gbs"])
    return out


# ---- environment --------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile", "amx_int8")
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [w for w in wanted if w in have]
    except OSError:
        pass
    return []


def environment(threads: int) -> dict:
    import torch

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_model": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "device": "cpu",
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mem_total_gib": None,
        "platform": platform.platform(),
        "hostname": platform.node(),
    }
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        env["transformers"] = None
    try:
        import matplotlib

        env["matplotlib"] = matplotlib.__version__
    except ImportError:
        env["matplotlib"] = None
    try:
        import zoo

        env["zoo"] = zoo.__version__
    except ImportError:
        env["zoo"] = None
    try:
        rev = subprocess.run(["git", "-C", HERE, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "-C", HERE, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        env["git"] = rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        env["git"] = None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            env["mem_total_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return env


# ---- was the machine busy? ----------------------------------------------------------------------
def _busy_jiffies() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs from /proc/stat."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields[:8]) - idle, sum(fields[:8])


class CpuMonitor:
    """How much CPU *other* processes used while the benchmark ran: all CPUs' busy time (from
    /proc/stat) minus this process and its reaped children (getrusage). 0 means the machine was ours."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.j0 = _busy_jiffies()
        self.r0 = self._ours()
        self.load0 = os.getloadavg()

    @staticmethod
    def _ours() -> float:
        s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime

    def report(self) -> dict:
        wall = time.perf_counter() - self.t0
        out = {"wall_s": wall, "loadavg_start": list(self.load0), "loadavg_end": list(os.getloadavg()),
               "cpu_count": os.cpu_count()}
        j1 = _busy_jiffies()
        if self.j0 and j1:
            hz = os.sysconf("SC_CLK_TCK")
            busy_s = (j1[0] - self.j0[0]) / hz
            ours = self._ours() - self.r0
            foreign = max(0.0, busy_s - ours)
            out.update(busy_cpu_s=busy_s, our_cpu_s=ours, foreign_cpu_s=foreign,
                       foreign_share=foreign / (wall * (os.cpu_count() or 1)) if wall > 0 else 0.0)
        return out


# ---- worker processes ---------------------------------------------------------------------------
class WorkerError(RuntimeError):
    pass


class Worker:
    """One variant (e.g. zoo compiled, or transformers eager) loaded in its own process, driven by
    JSON lines on stdin/stdout. Separate processes give each variant its own peak RSS and let the
    driver interleave variants without any of them sharing caches or allocator state."""

    def __init__(self, config: dict, log_path: str, env: dict | None = None):
        self.config = config
        self.name = config["variant"]
        self._log = open(log_path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._log.write(f"\n===== worker {self.name}: {json.dumps(config)}\n")
        self._log.flush()
        self.proc = subprocess.Popen([sys.executable, WORKER, "serve", json.dumps(config)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._log, text=True, bufsize=1,
                                     env={**os.environ, **(env or {})}, cwd=os.path.dirname(HERE))
        self._lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _reply(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise WorkerError(f"{self.name}: no reply within {timeout:.0f} s") from None
            if line is None:
                self.proc.wait(timeout=30)
                raise WorkerError(f"{self.name}: worker exited with code {self.proc.returncode} "
                                  f"(see {self._log.name})")
            line = line.strip()
            if not line.startswith("{"):
                continue  # stray prints
            reply = json.loads(line)
            if reply.get("error"):
                raise WorkerError(f"{self.name}: {reply['error']}")
            return reply

    def ready(self, timeout: float) -> dict:
        return self._reply(timeout)

    def call(self, op: str, timeout: float = 900.0, **args) -> dict:
        if self.proc.poll() is not None:
            raise WorkerError(f"{self.name}: worker is not running (exit code {self.proc.returncode})")
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        return self._reply(timeout)

    def request_quit(self) -> None:
        """Ask the worker to exit without waiting (close() waits); lets several exit at once."""
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.flush()
            except OSError:
                pass

    def close(self) -> None:
        if self.proc.poll() is None:
            self.request_quit()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not self._log.closed:
            self._log.close()


def run_start_probe(config: dict, log_path: str, env: dict | None = None, timeout: float = 1800.0) -> dict:
    """One fresh process that loads a variant and produces the first tokens (warm/cold start).
    The driver's wall time covers interpreter start and imports too."""
    t0 = time.perf_counter()
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"\n===== start probe: {json.dumps(config)} env {json.dumps(env or {})}\n")
        log.flush()
        proc = subprocess.run([sys.executable, WORKER, "start", json.dumps(config)], stdout=subprocess.PIPE,
                              stderr=log, text=True, timeout=timeout, env={**os.environ, **(env or {})},
                              cwd=os.path.dirname(HERE))
    wall = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise WorkerError(f"start probe {config['variant']} failed with code {proc.returncode} (see {log_path})")
    reply = json.loads(lines[-1])
    reply["process_wall_s"] = wall
    return reply
