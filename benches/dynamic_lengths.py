"""Static length buckets vs dynamic lengths: what one graph per batch size costs per token.

The variants are loaded in one process on the same checkpoint and timed interleaved (A B C, then
C B A), so machine drift hits them alike; all compile the whole graph with cpp_wrapper:

- `static`: the former CPU default, one graph per (batch, length bucket) and (batch, context bucket):
  prompt lengths padded up to a power of two from 32, decode contexts to 256/512/1024/2048; freezing
  in bf16.
- `dynamic`: the shipped default (`dynamic_lengths = true`): one prefill and one decode graph per batch
  size, lengths padded to a multiple of 32; no freezing.
- `dynamic-frozen`: the same with inductor's `freezing` in bf16.

A prompt of n tokens is timed as what each variant really runs: static pads it to its bucket,
dynamic to the next multiple of 32. So the table shows the padding saved as well as the cost of the
dynamic graph itself (n = a bucket size isolates the latter). Decode is timed at batch 1 and 8 with
every row at context c (static attends over c's bucket, dynamic over c rounded up to 32).

    .venv/bin/python benches/dynamic_lengths.py [--model llama-3.2-1b] [--out benches/results/...md]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
# the shipped CPU config plus freezing in bf16 (the former CPU default's options)
FROZEN = ('backend = "inductor"\n[buckets]\ndynamic_lengths = true\nprefill_tokens = 2048\n'
          '[inductor]\ncpp_wrapper = true\n[inductor.bfloat16]\nfreezing = true\n')


def timed(fn, repeats: int) -> float:
    """Median seconds of `repeats` calls (after one untimed call)."""
    fn()
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama-3.2-1b", help="a public config of benches/_models.py")
    p.add_argument("--prompt-lens", type=int, nargs="+", default=[100, 128, 300, 1000])
    p.add_argument("--contexts", type=int, nargs="+", default=[300, 1000])
    p.add_argument("--decode-batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--variants", default="static,dynamic-frozen,dynamic",
                   help="of static, dynamic, dynamic-frozen (the first one is the base of the ratios)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--decode-steps", type=int, default=10, help="timed decode steps per sample")
    p.add_argument("--out", help="also write the Markdown report here")
    args = p.parse_args()

    import torch

    import _models
    import _report
    import zoo

    path = _models.ensure_public_config_model(args.model)
    max_seq_len, max_batch = 2048, max(args.decode_batches)
    static = zoo.Buckets.default(max_batch, max_seq_len)
    static = zoo.Buckets(static.batch_sizes, static.prefill_lens, (256, 512, 1024, 2048))
    frozen = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False)
    frozen.write(FROZEN)
    frozen.close()
    options = {"static": dict(buckets=static, compile_config=frozen.name), "dynamic": {},
               "dynamic-frozen": dict(compile_config=frozen.name)}
    variants = {name: zoo.load(path, dtype="bfloat16", compiled=True, max_batch_size=max_batch,
                               max_seq_len=max_seq_len, **options[name]) for name in args.variants.split(",")}
    os.unlink(frozen.name)
    assert variants["dynamic"].buckets.dynamic_lengths, "the shipped CPU config is expected to use dynamic lengths"
    base = args.variants.split(",")[0]

    def prefill(model, n: int):
        runner, cache = model.engine.runner, model.engine.cache
        prompt = [(7 * i) % 1000 + 1 for i in range(n)]
        return lambda: runner.prefill([prompt], [cache.scratch_slot])

    def decode(model, B: int, context: int):
        runner, cache = model.engine.runner, model.engine.cache
        input_ids, positions, _, _ = cache.scratch_decode_inputs(B)
        positions = torch.full_like(positions, context - 1)  # every row: a context of `context` tokens

        def steps():
            for _ in range(args.decode_steps):
                runner.decode(input_ids, positions, context)
        return steps

    cases = [("prefill", n, 1) for n in args.prompt_lens]
    cases += [("decode", c, B) for B in args.decode_batches for c in args.contexts]
    shapes = {}
    for kind, n, B in cases:  # compile every graph first (and record the padded shapes)
        for name, model in variants.items():
            b = model.buckets
            shapes[(kind, n, B, name)] = b.prefill_len_for(n) if kind == "prefill" else b.context_len_for(n)
            t = time.perf_counter()
            (prefill(model, n) if kind == "prefill" else decode(model, B, n))()
            print(f"[bench] {name} {kind} n={n} B={B}: first call {time.perf_counter() - t:.1f} s", file=sys.stderr,
                  flush=True)
    samples: dict[tuple, list[float]] = {}
    for r in range(args.rounds):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for kind, n, B in cases:
            for name in order:
                model = variants[name]
                fn = prefill(model, n) if kind == "prefill" else decode(model, B, n)
                seconds = timed(fn, 3 if kind == "prefill" else 1)
                per = seconds * 1e3 / (n if kind == "prefill" else args.decode_steps)
                samples.setdefault((kind, n, B, name), []).append(per)
        print(f"[bench] round {r + 1} of {args.rounds} done", file=sys.stderr, flush=True)

    lines = [f"{args.model} config, random weights, bf16, torch {torch.__version__}, {torch.get_num_threads()} "
             f"threads; {args.rounds} interleaved rounds, median. Prefill: ms per prompt token (batch 1); decode: "
             "ms per step (every row at the context).", "",
             "| case | " + " | ".join(f"{v}: padded to | {v} ms" for v in variants)
             + "".join(f" | {v} / {base}" for v in variants if v != base) + " |",
             "| --- " * (1 + 2 * len(variants) + len(variants) - 1) + "|"]
    for kind, n, B in cases:
        ms = {v: statistics.median(samples[(kind, n, B, v)]) for v in variants}
        what = f"prefill, {n}-token prompt" if kind == "prefill" else f"decode batch {B}, context {n}"
        lines.append(f"| {what} | " + " | ".join(f"{shapes[(kind, n, B, v)]} | {ms[v]:.2f}" for v in variants)
                     + "".join(f" | {ms[v] / ms[base]:.3f}" for v in variants if v != base) + " |")
    graphs = ", ".join(f"{name} {m.engine.runner.graphs_total}" for name, m in variants.items())
    lines += ["", f"Graphs for the whole bucket set (max_batch_size {max_batch}, max_seq_len {max_seq_len}): {graphs}."]
    _report.emit("\n".join(lines), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
