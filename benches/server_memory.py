"""Peak RSS of `python -m zoo.serve` with a given KV budget, against the weights' bytes + the KV
pool's bytes (the #15 target: within + 15%).

The medium bench model (random-weight Llama-3.2-1B shape, benches/_models.py), bfloat16. The
server starts with --kv-cache-tokens N (and --max-batch-size 64), serves a load that fills the
pool (64 concurrent completions of a 100-token prompt + 150 tokens, twice), then its peak RSS
(VmHWM of the server process; inductor's compile workers are separate processes and not counted)
is read. Weight bytes are the parameters' bytes in bf16 and KV bytes the pool's, both computed
from config.json.

    .venv/bin/python benches/server_memory.py [--kv-cache-tokens 16384] [--compiled]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import httpx  # noqa: E402

from _models import ensure_medium_llama  # noqa: E402


def kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def model_bytes(path: str, kv_tokens: int, dtype_bytes: int = 2) -> tuple[int, int]:
    """(bytes of the parameters in bf16, bytes of a kv_tokens pool) from config.json."""
    with open(os.path.join(path, "config.json")) as f:
        c = json.load(f)
    H, L, I, V = c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"], c["vocab_size"]
    heads, kv = c["num_attention_heads"], c.get("num_key_value_heads", c["num_attention_heads"])
    hd = c.get("head_dim", H // heads)
    per_layer = H * (heads * hd + 2 * kv * hd) + heads * hd * H + 3 * H * I + 2 * H
    params = L * per_layer + V * H * (1 if c.get("tie_word_embeddings") else 2) + H
    kv_bytes = 2 * L * kv * hd * dtype_bytes * kv_tokens
    return params * dtype_bytes, kv_bytes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kv-cache-tokens", type=int, default=16384)
    ap.add_argument("--compiled", action="store_true")
    ap.add_argument("--port", type=int, default=8767)
    args = ap.parse_args()
    path = ensure_medium_llama()
    cmd = [sys.executable, "-m", "zoo.serve", "--model-path", path, "--dtype", "bfloat16", "--port", str(args.port),
           "--max-batch-size", "64", "--kv-cache-tokens", str(args.kv_cache_tokens), "--served-model-name", "bench"]
    if args.compiled:
        cmd += ["--compiled", "--warmup"]
    log = tempfile.NamedTemporaryFile("w+", prefix="zoo-server-memory-", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{args.port}"
    try:
        deadline = time.monotonic() + 1800
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                print(open(log.name).read()[-3000:])
                return 1
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        idle = kib(proc.pid, "VmRSS")
        prompt = list(range(1000, 1100))
        body = {"model": "bench", "prompt": prompt, "max_tokens": 150, "temperature": 0, "ignore_eos": True}
        peak_running = 0

        def one():
            httpx.post(f"{url}/v1/completions", json=body, timeout=1800).raise_for_status()

        for _ in range(2):
            threads = [threading.Thread(target=one) for _ in range(64)]
            for t in threads:
                t.start()
            while any(t.is_alive() for t in threads):
                m = httpx.get(f"{url}/metrics", timeout=10).text
                running = re.search(r"^zoo_num_requests_running (\S+)", m, re.M)
                peak_running = max(peak_running, int(float(running.group(1))) if running else 0)
                time.sleep(1)
            for t in threads:
                t.join()
        peak = kib(proc.pid, "VmHWM")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    weights, kv = model_bytes(path, args.kv_cache_tokens)
    budget = weights + kv
    gib = 2 ** 30
    print(f"{'compiled' if args.compiled else 'eager'} server, kv_cache_tokens {args.kv_cache_tokens}: weights "
          f"{weights / gib:.2f} GiB + KV {kv / gib:.2f} GiB = {budget / gib:.2f} GiB; RSS idle after start "
          f"{idle / 2**20:.2f} GiB, peak {peak / 2**20:.2f} GiB = {peak * 1024 / budget:.2f}x weights + KV; "
          f"{peak_running} requests running at the peak; log {log.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
