"""Bounded load test of `python -m zoo.serve`: N streamed completions at concurrency M.

    .venv/bin/python benches/load_test.py                       # embedded tiny Llama, eager
    .venv/bin/python benches/load_test.py --compiled --requests 128 --concurrency 1,8,16
    .venv/bin/python benches/load_test.py --model-path DIR --max-tokens 128

It starts its own server on a free loopback port (127.0.0.1 only), sends each concurrency level
its N requests (streamed, greedy, `ignore_eos` so every request makes exactly --max-tokens
tokens), measures on the client side the time to first token (first streamed chunk) and the
end-to-end latency, reads the server's /metrics for how many requests shared each engine step,
stops the server and writes benches/results/load_test.{json,md}. Every request has a timeout and
the whole run a deadline (--deadline-s), so it always ends by itself.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time

import httpx

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PROMPTS = ["Beautiful is", "Explicit is", "Simple is", "Complex is", "Flat is", "Sparse is", "Readability",
           "Special cases", "Although practicality", "Errors should", "Unless explicitly", "In the face of",
           "There should be one", "Although that way", "Now is better", "If the implementation"]


# ---- the server ------------------------------------------------------------------------------
class Server:
    """`python -m zoo.serve --port 0 ...` in a child process, its log in a temp file."""

    def __init__(self, args: list[str], start_timeout_s: float):
        self.log = tempfile.NamedTemporaryFile("w+", prefix="zoo-serve-", suffix=".log", delete=False)
        self.proc = subprocess.Popen([sys.executable, "-m", "zoo.serve", "--port", "0", "--host", "127.0.0.1",
                                      "--log-level", "warning", *args], cwd=ROOT, stdout=self.log,
                                     stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.url = self._wait(start_timeout_s)

    def _wait(self, timeout_s: float) -> str:
        deadline, url = time.monotonic() + timeout_s, None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")
            m = re.search(r"\[zoo\] listening on (http://\S+)", self.log_text())
            url = m.group(1) if m else None
            if url:
                try:
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        return url
                except httpx.TransportError:
                    pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the server did not start in {timeout_s} s:\n{self.log_text()[-3000:]}")

    def log_text(self) -> str:
        with open(self.log.name, encoding="utf-8", errors="replace") as f:
            return f.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.log.close()
        os.unlink(self.log.name)


def scrape(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


# ---- the clients -----------------------------------------------------------------------------
async def one_request(http: httpx.AsyncClient, url: str, prompt: str, max_tokens: int, timeout_s: float) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, tokens, chunk_times = None, 0, []
    try:
        async with asyncio.timeout(timeout_s):
            async with http.stream("POST", f"{url}/v1/completions", json=body) as r:
                if r.status_code != 200:
                    return {"ok": False, "error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[len("data: "):])
                    if "error" in chunk:
                        return {"ok": False, "error": chunk["error"]["message"]}
                    if chunk["choices"]:
                        now = time.perf_counter()
                        ttft = ttft if ttft is not None else now - t0
                        chunk_times.append(now)
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
    except (httpx.HTTPError, TimeoutError) as e:
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}
    e2e = time.perf_counter() - t0
    tpot = (chunk_times[-1] - chunk_times[0]) / (tokens - 1) if tokens > 1 and len(chunk_times) > 1 else None
    return {"ok": True, "ttft": ttft, "e2e": e2e, "tokens": tokens, "tpot": tpot}


async def run_level(url: str, n: int, concurrency: int, max_tokens: int, timeout_s: float) -> tuple[list, float]:
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=timeout_s) as http:
        async def task(i: int):
            async with sem:
                return await one_request(http, url, PROMPTS[i % len(PROMPTS)], max_tokens, timeout_s)

        t0 = time.perf_counter()
        results = await asyncio.gather(*(task(i) for i in range(n)))
        return results, time.perf_counter() - t0


# ---- statistics and report -------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(concurrency: int, results: list[dict], wall_s: float, before: dict, after: dict) -> dict:
    ok = [r for r in results if r["ok"]]
    tokens = sum(r["tokens"] for r in ok)

    def dist(key: str) -> dict:
        xs = [r[key] * 1e3 for r in ok if r.get(key) is not None]
        return {f"p{q}": percentile(xs, q) for q in (50, 90, 99)} | {"mean": sum(xs) / len(xs) if xs else None}

    steps = after["zoo_engine_step_batch_size_count"] - before["zoo_engine_step_batch_size_count"]
    served = after["zoo_engine_step_batch_size_sum"] - before["zoo_engine_step_batch_size_sum"]
    step_n = after["zoo_engine_step_seconds_count"] - before["zoo_engine_step_seconds_count"]
    step_s = after["zoo_engine_step_seconds_sum"] - before["zoo_engine_step_seconds_sum"]
    return {"concurrency": concurrency, "requests": len(results), "ok": len(ok),
            "errors": sorted({r["error"] for r in results if not r["ok"]})[:5],
            "wall_s": wall_s, "requests_per_s": len(ok) / wall_s, "output_tokens": tokens,
            "output_tokens_per_s": tokens / wall_s, "ttft_ms": dist("ttft"), "e2e_ms": dist("e2e"),
            "tpot_ms": dist("tpot"), "engine_steps": steps,
            "mean_requests_per_step": served / steps if steps else None,
            "mean_step_ms": step_s / step_n * 1e3 if step_n else None,
            "engine_busy_share": step_s / wall_s}


def markdown(report: dict) -> str:
    cfg, env = report["config"], report["environment"]
    lines = [
        "# zoo.serve load test",
        "",
        f"`{' '.join(['python benches/load_test.py', *report['argv']])}` — {cfg['model']}, "
        f"{'compiled' if cfg['compiled'] else 'eager'}, max batch {cfg['max_batch_size']}, server torch threads "
        f"{cfg['threads'] or 'default'}; {cfg['requests']} "
        f"streamed completions per level, {cfg['max_tokens']} new tokens each (greedy, ignore_eos); client and "
        f"server on the same machine ({env['cpu_count']} CPU cores, {env['platform']}, Python {env['python']}).",
        "Times in ms, measured by the client: TTFT = request sent -> first streamed chunk; e2e = request sent -> "
        "stream closed; TPOT = mean gap between chunks after the first. From the server's /metrics: 'req/step' = "
        "mean requests that got a token per engine step (above 1: requests shared the decode batch), 'step ms' = "
        "mean engine step (admit/prefill + one batched decode), 'busy' = share of the wall time spent in steps.",
        "",
        "| concurrency | ok | wall s | req/s | out tok/s | TTFT p50 | TTFT p90 | TTFT p99 | e2e p50 | e2e p90 | "
        "e2e p99 | TPOT p50 | req/step | step ms | busy |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]

    def f(x, digits=1):
        return "n/a" if x is None else f"{x:.{digits}f}"

    for lv in report["levels"]:
        lines.append(
            f"| {lv['concurrency']} | {lv['ok']}/{lv['requests']} | {f(lv['wall_s'], 2)} | {f(lv['requests_per_s'])} "
            f"| {f(lv['output_tokens_per_s'], 0)} | {f(lv['ttft_ms']['p50'])} | {f(lv['ttft_ms']['p90'])} | "
            f"{f(lv['ttft_ms']['p99'])} | {f(lv['e2e_ms']['p50'])} | {f(lv['e2e_ms']['p90'])} | "
            f"{f(lv['e2e_ms']['p99'])} | {f(lv['tpot_ms']['p50'], 2)} | {f(lv['mean_requests_per_step'], 2)} | "
            f"{f(lv['mean_step_ms'], 2)} | {lv['engine_busy_share']:.0%} |")
    errors = [e for lv in report["levels"] for e in lv["errors"]]
    if errors:
        lines += ["", "Errors (first few): " + "; ".join(errors[:5])]
    lines += ["", f"Server start-up (load{' + warm-up compile' if cfg['compiled'] else ''}): "
                  f"{report['server_start_s']:.1f} s. 1-minute load average {env['load_average_before']:.1f} "
                  f"before, {env['load_average_after']:.1f} after (above ~1 means other work shared the "
                  f"cores). Generated {report['generated_at']}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-path", help="checkpoint folder (default: the embedded tiny Llama)")
    p.add_argument("--compiled", action="store_true",
                   help="serve compiled graphs (decode and the 32-token prefill buckets built before measuring)")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, help="the server's torch threads (default: torch's)")
    p.add_argument("--requests", type=int, default=64, help="requests per concurrency level (N)")
    p.add_argument("--concurrency", default="1,4,8,16", help="comma-separated concurrency levels (M)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--request-timeout-s", type=float, default=120)
    p.add_argument("--deadline-s", type=float, default=1200, help="the whole run stops after this")
    p.add_argument("--start-timeout-s", type=float, default=900, help="server start, compile included")
    p.add_argument("--out", default=os.path.join(HERE, "results"), help="folder for load_test.{json,md}")
    p.add_argument("--name", default="load_test", help="file name stem of the results")
    args = p.parse_args(argv)
    levels = [int(x) for x in args.concurrency.split(",") if x]

    server_args = ["--max-batch-size", str(args.max_batch_size)]
    if args.model_path:
        server_args += ["--model-path", args.model_path]
    if args.threads:
        server_args += ["--threads", str(args.threads)]
    if args.compiled:
        server_args += ["--compiled", "--warmup", "32"]  # every batch size; the prompts fit the 32 bucket
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    server = Server(server_args, args.start_timeout_s)
    start_s = time.perf_counter() - t0
    deadline = time.monotonic() + args.deadline_s
    report_levels = []
    try:
        print(f"[load] server at {server.url} up in {start_s:.1f} s", file=sys.stderr)
        # warm-up, not measured: the first requests of each batch size pay one-time costs
        asyncio.run(run_level(server.url, 2 * max(levels), max(levels), 8, args.request_timeout_s))
        for m in levels:
            if time.monotonic() > deadline:
                print(f"[load] deadline reached, skipping concurrency {m}", file=sys.stderr)
                continue
            before = scrape(server.url)
            timeout = min(args.request_timeout_s, max(1.0, deadline - time.monotonic()))
            results, wall = asyncio.run(run_level(server.url, args.requests, m, args.max_tokens, timeout))
            level = summarize(m, results, wall, before, scrape(server.url))
            report_levels.append(level)
            print(f"[load] concurrency {m}: {level['ok']}/{level['requests']} ok in {wall:.2f} s, "
                  f"{level['output_tokens_per_s']:.0f} tok/s, TTFT p50 {level['ttft_ms']['p50']:.1f} ms, "
                  f"e2e p50 {level['e2e_ms']['p50']:.1f} ms, {level['mean_requests_per_step'] or 0:.2f} req/step",
                  file=sys.stderr)
    finally:
        server.stop()

    import torch  # only for the version in the report

    report = {
        "argv": argv if argv is not None else sys.argv[1:],
        "config": {"model": args.model_path or "embedded tiny-llama", "compiled": args.compiled,
                   "max_batch_size": args.max_batch_size, "threads": args.threads, "requests": args.requests,
                   "max_tokens": args.max_tokens,
                   "concurrency": levels},
        "environment": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                        "python": platform.python_version(), "torch": torch.__version__,
                        "httpx": httpx.__version__,
                        # other work on the machine skews every number: the 1-minute load average
                        "load_average_before": load_before, "load_average_after": os.getloadavg()[0]},
        "server_start_s": start_s,
        "generated_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        "levels": report_levels,
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{args.name}.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(args.out, f"{args.name}.md"), "w") as f:
        f.write(markdown(report))
    print(markdown(report))
    return 0 if all(lv["ok"] == lv["requests"] for lv in report_levels) else 1


if __name__ == "__main__":
    sys.exit(main())
