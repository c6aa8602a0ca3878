"""Time to first token of a request whose 1,000-token prompt prefix is already in the KV cache
(automatic prefix caching), against the first request with that prefix, in one process.

The medium bench model (a random-weight Llama-3.2-1B shape, benches/_models.py), bfloat16.
Each round: a new random 1,000-token prefix; request A = prefix + 8 tokens (cold), then request
B = prefix + 8 other tokens (hits the prefix's 31 full blocks). Eager by default; --compiled uses
the CPU graphs. Run: .venv/bin/python benches/prefix_cache_ttft.py [--rounds 3] [--compiled]
"""
import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _models import ensure_medium_llama  # noqa: E402

import zoo  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--compiled", action="store_true")
    args = ap.parse_args()
    model = zoo.load(ensure_medium_llama(), dtype="bfloat16", max_batch_size=1, max_seq_len=2048,
                     compiled=args.compiled)
    g = torch.Generator().manual_seed(0)
    model.generate([1] * 40, max_new_tokens=1)  # warm-up (and compile, with --compiled)
    cold, hit = [], []
    for _ in range(args.rounds):
        prefix = torch.randint(10, 30000, (1000,), generator=g).tolist()
        a = model.generate(prefix + list(range(100, 108)), max_new_tokens=1)
        b = model.generate(prefix + list(range(200, 208)), max_new_tokens=1)
        cold.append(a.ttft_ms)
        hit.append(b.ttft_ms)
        print(f"cold {a.ttft_ms:.0f} ms, prefix hit {b.ttft_ms:.0f} ms, ratio {b.ttft_ms / a.ttft_ms:.3f}", flush=True)
    pool = model.engine.cache.pool
    print(f"median: cold {statistics.median(cold):.0f} ms, hit {statistics.median(hit):.0f} ms, ratio "
          f"{statistics.median(hit) / statistics.median(cold):.3f}; prefix tokens reused {pool.hit_tokens} of "
          f"{pool.lookup_tokens} looked up")


if __name__ == "__main__":
    main()
