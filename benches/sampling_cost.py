"""What the sampling options cost per output token, next to plain greedy decoding.

Loads the medium random-weight Llama (~1 B parameters, bf16, vocabulary 32000; built once by
benches/_models.py) and decodes the same prompts with each sampling variant, interleaved, several
rounds; prints the median time per output token of each and its ratio to greedy. The options run
in the engine after the decode graph (zoo/engine/sampling.py), so eager decoding shows their cost
as well as compiled decoding would. Run on a quiet machine:

    .venv/bin/python benches/sampling_cost.py [--batch 1 8] [--tokens 16] [--rounds 3] [--out FILE.md]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _models  # noqa: E402
import _report  # noqa: E402

VARIANTS = {
    "greedy": {},
    "greedy + penalties + logit_bias": dict(presence_penalty=0.5, frequency_penalty=0.5, repetition_penalty=1.2,
                                            logit_bias={5: 1.0}),
    "greedy + logprobs 5": dict(logprobs=5),
    "sampled (temperature, top_p)": dict(temperature=0.8, top_p=0.9, seed=0),
    "sampled + min_p + penalties + logprobs 5": dict(temperature=0.8, top_p=0.9, min_p=0.05, seed=0,
                                                     presence_penalty=0.5, frequency_penalty=0.5,
                                                     repetition_penalty=1.2, logprobs=5),
}


def per_token_ms(model, batch: int, tokens: int, options: dict) -> float:
    prompts = [[1] + [100 + 7 * i + j for j in range(15)] for i in range(batch)]
    t0 = time.perf_counter()
    results = model.generate(prompts, max_new_tokens=tokens, ignore_eos=True, **options)
    elapsed = time.perf_counter() - t0
    assert all(len(r.token_ids) == tokens for r in results)
    return elapsed * 1e3 / tokens  # one step per token for the whole batch (one prefill included)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", help="also write the result table (Markdown) here")
    args = p.parse_args()
    import torch

    import zoo

    path = _models.ensure_medium_llama()
    model = zoo.load(path, dtype="bfloat16", max_batch_size=max(args.batch), max_seq_len=256)
    lines = [f"torch {torch.__version__}, {torch.get_num_threads()} threads, eager bf16, {args.tokens} new tokens "
             f"per request (one prefill included), median of {args.rounds} interleaved rounds", "",
             "| batch | variant | ms per step | vs greedy | runs (ms) |", "| --- | --- | --- | --- | --- |"]
    for batch in args.batch:
        per_token_ms(model, batch, 4, {})  # warm-up
        times: dict[str, list[float]] = {name: [] for name in VARIANTS}
        for _ in range(args.rounds):
            for name, options in VARIANTS.items():
                times[name].append(per_token_ms(model, batch, args.tokens, options))
        base = statistics.median(times["greedy"])
        for name, runs in times.items():
            median = statistics.median(runs)
            lines.append(f"| {batch} | {name} | {median:.1f} | {median / base:.3f} | "
                         f"{', '.join(f'{t:.1f}' for t in runs)} |")
    _report.emit("\n".join(lines), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
