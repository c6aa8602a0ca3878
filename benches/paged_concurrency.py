"""Requests running at once, and decode throughput, in one KV memory budget: the paged cache
with 64 batch rows vs 8, the same 16,384-token pool (what 8 slots x 2048 positions took before).

The medium bench model (random-weight Llama-3.2-1B shape), bfloat16, eager by default. 64
requests of 100 prompt + 100 new tokens (200 in all) are submitted at once to each engine in
turn; reported: the most requests decoding at one step, the wall time, output tokens per second
and preemptions. Run: .venv/bin/python benches/paged_concurrency.py [--requests 64] [--compiled]
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _models import ensure_medium_llama  # noqa: E402

import zoo  # noqa: E402
from zoo.engine import SamplingParams  # noqa: E402


def run(model, prompts, new_tokens: int) -> dict:
    eng = model.engine
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    requests = [eng.make_request(i, p, params) for i, p in enumerate(prompts)]
    start, peak = time.perf_counter(), 0
    eng.submit(requests)
    while not all(r.finished for r in requests):
        eng.step()
        peak = max(peak, len(eng.running))
    seconds = time.perf_counter() - start
    out = sum(len(r.output_ids) for r in requests)
    return {"peak": peak, "seconds": seconds, "tok_s": out / seconds, "preemptions": eng.preemptions}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--compiled", action="store_true")
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, 30000, (100,), generator=g).tolist() for _ in range(args.requests)]
    for rows in (8, 64):
        model = zoo.load(ensure_medium_llama(), dtype="bfloat16", max_batch_size=rows, max_seq_len=2048,
                         kv_cache_tokens=8 * 2048, compiled=args.compiled)
        model.warmup()  # with --compiled: every graph built (or loaded) before the clock starts
        r = run(model, prompts, 100)
        print(f"batch rows {rows}: {r['peak']} requests at once, {r['seconds']:.1f} s, {r['tok_s']:.1f} output "
              f"tokens/s, {r['preemptions']} preemptions", flush=True)
        del model


if __name__ == "__main__":
    main()
