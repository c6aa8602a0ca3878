"""Time per output token of running streams while a 2,000-token prompt is admitted: the whole
prompt in one prefill call against chunked prefill (each chunk in one forward with the streams'
decode step), in one process.

The medium bench model (random-weight Llama-3.2-1B shape, benches/_models.py), bfloat16,
compiled (CPU dynamic-length graphs) unless --eager. Per variant: 4 streams (32-token prompts)
start together; after each has 16 tokens, a 2,000-token prompt arrives; the streams go on to 128
tokens. Reported per variant, over every gap between two consecutive tokens of a stream: the
median before the long prompt arrives (the streams undisturbed), the median and p99 of all gaps,
the worst gap, and the long prompt's time to first token. Variants: --chunks 0 (no chunking:
prefill_tokens 2048) and chunk sizes (below 32, the dynamic lengths' multiple is the chunk size).
Run: .venv/bin/python benches/chunked_prefill_tpot.py [--chunks 0 16 32 64]
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _models import ensure_medium_llama  # noqa: E402

import zoo  # noqa: E402
from zoo.engine import SamplingParams  # noqa: E402
from zoo.graphs import Buckets  # noqa: E402

STREAMS, STREAM_TOKENS, ARRIVE_AFTER, LONG_PROMPT = 4, 128, 16, 2000


def run(model, g: torch.Generator) -> dict:
    eng = model.engine
    streams = [eng.make_request(i, torch.randint(10, 30000, (32,), generator=g).tolist(),
                                SamplingParams(max_new_tokens=STREAM_TOKENS, ignore_eos=True)) for i in range(STREAMS)]
    long = eng.make_request(STREAMS, torch.randint(10, 30000, (LONG_PROMPT,), generator=g).tolist(),
                            SamplingParams(max_new_tokens=8, ignore_eos=True))
    arrivals: list[list[float]] = [[] for _ in streams]  # each stream's token times
    eng.submit(streams)
    t_long, steady = None, []
    while not all(r.finished for r in streams + [long]):
        eng.step()
        now = time.perf_counter()
        for times, r in zip(arrivals, streams):
            times.extend([now] * (len(r.output_ids) - len(times)))
        if t_long is None and min(len(r.output_ids) for r in streams) >= ARRIVE_AFTER:
            steady = [1000 * (b - a) for times in arrivals for a, b in zip(times, times[1:])]
            eng.submit([long])
            t_long = time.perf_counter()
    gaps = sorted(1000 * (b - a) for times in arrivals for a, b in zip(times, times[1:]))
    return {"steady": statistics.median(steady), "median": statistics.median(gaps),
            "p99": gaps[int(0.99 * (len(gaps) - 1))], "max": gaps[-1], "ttft": 1000 * (long.t_first - t_long),
            "preemptions": eng.preemptions}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunks", type=int, nargs="+", default=[0, 64, 128, 256],
                    help="prefill chunk sizes (prefill_tokens); 0 = no chunking")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of all variants, interleaved")
    ap.add_argument("--eager", action="store_true")
    args = ap.parse_args()
    models = {}
    for chunk in args.chunks:
        small = {"buckets": Buckets.dynamic((1, 2, 4, 8), 2048, length_multiple=chunk, prefill_tokens=chunk)} \
            if 0 < chunk < 32 else {"prefill_tokens": chunk or 2048}
        models[chunk] = zoo.load(ensure_medium_llama(), dtype="bfloat16", max_batch_size=8, max_seq_len=2048,
                                 compiled=not args.eager, **small)
        models[chunk].warmup()  # every graph built before timing (with --eager: nothing to build)
    g = torch.Generator().manual_seed(0)
    results = {chunk: [] for chunk in args.chunks}
    for rnd in range(args.rounds):
        for chunk, model in models.items():
            r = run(model, g)
            results[chunk].append(r)
            name = f"chunk {chunk}" if chunk else "no chunking"
            print(f"round {rnd}, {name}: TPOT before the arrival {r['steady']:.0f} ms, median {r['median']:.0f} ms, "
                  f"p99 {r['p99']:.0f} ms ({r['p99'] / r['median']:.2f}x the median, {r['p99'] / r['steady']:.2f}x "
                  f"before), worst {r['max']:.0f} ms; long prompt TTFT {r['ttft']:.0f} ms; "
                  f"{r['preemptions']} preemptions", flush=True)
    print("\n| variant | TPOT before the arrival | TPOT median | TPOT p99 | p99 / median | p99 / before | worst gap "
          "| 2,000-token prompt TTFT |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for chunk, rs in results.items():
        steady = statistics.median(r["steady"] for r in rs)
        med = statistics.median(r["median"] for r in rs)
        p99 = statistics.median(r["p99"] for r in rs)
        worst = statistics.median(r["max"] for r in rs)
        ttft = statistics.median(r["ttft"] for r in rs)
        name = f"chunks of {chunk}, with decode" if chunk else "no chunking (one 2,000-token prefill)"
        print(f"| {name} | {steady:.0f} ms | {med:.0f} ms | {p99:.0f} ms | {p99 / med:.2f}x | {p99 / steady:.2f}x "
              f"| {worst:.0f} ms | {ttft:.0f} ms |")


if __name__ == "__main__":
    main()
