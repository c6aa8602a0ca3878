"""How soon a cold `python -m zoo.serve --compiled` answers: seconds from starting the process to
/health, to the first streamed token of the first request, and how many graphs were ready then.

Empty zoo graph-cache and inductor cache folders (a new deployment); the model is a random-weight
bf16 checkpoint with a public config (benches/_models.py builds it once). Without --warmup the
server compiles every bucket in the background and answers eagerly meanwhile.

    .venv/bin/python benches/server_cold_start.py [--model llama-3.2-1b] [--extra-args "--warmup"]
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import httpx  # noqa: E402

import _models  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama-3.2-1b", choices=sorted(_models.PUBLIC_CONFIGS))
    p.add_argument("--port", type=int, default=8766)
    p.add_argument("--extra-args", default="", help="more zoo.serve arguments, e.g. '--warmup'")
    args = p.parse_args()
    path = _models.ensure_public_config_model(args.model)
    work = tempfile.mkdtemp(prefix="zoo-cold-start-")
    env = {**os.environ, "ZOO_CACHE_DIR": work, "TORCHINDUCTOR_CACHE_DIR": os.path.join(work, "inductor")}
    cmd = [sys.executable, "-m", "zoo.serve", "--model-path", path, "--compiled", "--dtype", "bfloat16",
           "--port", str(args.port), *shlex.split(args.extra_args)]
    url = f"http://127.0.0.1:{args.port}"
    t0 = time.perf_counter()
    with open(os.path.join(work, "server.log"), "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=os.path.dirname(HERE))
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"the server exited; see {work}/server.log")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        up = time.perf_counter() - t0
        first = None
        body = {"prompt": [1, 791, 1917, 374], "max_tokens": 8, "temperature": 0, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as r:
            for line in r.iter_lines():
                if line.startswith("data: {") and first is None:
                    first = time.perf_counter() - t0
        done = time.perf_counter() - t0
        ready = [line for line in httpx.get(f"{url}/metrics").text.splitlines() if line.startswith("zoo_graphs_")]
        print(f"{args.model}: listening {up:.1f} s after start; first token at {first:.1f} s; 8 tokens at "
              f"{done:.1f} s; {', '.join(ready)}")
    finally:
        proc.terminate()
        proc.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
