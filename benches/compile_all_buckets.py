"""Cold and warm time to build every graph of the default bucket set: what a new deployment waits for
before a compiled server is fully warm (`zoo.load(compiled=True)` + `Model.warmup()`).

Each measurement is a fresh process. "Cold" gives it empty zoo graph-cache and inductor cache
folders; "warm" starts a second process on the folders the cold one filled. The time is from the
process start (imports included) to the last graph built, for max_batch_size 8 and max_seq_len 2048.

Variants (compile configs):
  dynamic           the shipped CPU config: one prefill and one decode graph per batch size (dynamic
                    lengths), whole graph, cpp_wrapper
  dynamic-regional  the same with `regional = true` (one decoder layer compiled, no cpp_wrapper)
  dynamic-frozen    the shipped config plus inductor's `freezing` in bf16
  static            the former CPU default: a graph per (batch, power-of-two length) and per (batch,
                    context 256/512/1024/2048), with freezing in bf16; only on request (--variants), it
                    takes over an hour cold
                    at 1 B (benches/results/compile_cost-*.md has its per-graph cost)

Models: tiny-llama (embedded, fp32) and the public configs of benches/_models.py (bf16, random weights).

    .venv/bin/python benches/compile_all_buckets.py [--models tiny-llama,llama-3.2-1b] [--out FILE.md]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time

START = time.perf_counter()
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from compile_cost import add_worker_arguments, run_json_process  # noqa: E402

DYNAMIC = 'backend = "inductor"\n[buckets]\ndynamic_lengths = true\nprefill_tokens = 2048\n'
VARIANTS = {
    "dynamic": None,  # the shipped config
    "dynamic-regional": DYNAMIC.replace('"inductor"\n', '"inductor"\nregional = true\n', 1),
    "dynamic-frozen": DYNAMIC + '[inductor]\ncpp_wrapper = true\n[inductor.bfloat16]\nfreezing = true\n',
    "static": ('backend = "inductor"\n[buckets]\nprefill_lens = [32, 64, 128, 256, 512, 1024, 2048]\n'
               'context_lens = [256, 512, 1024, 2048]\n[inductor]\ncpp_wrapper = true\n'
               '[inductor.bfloat16]\nfreezing = true\n'),
}


def worker(args) -> dict:
    import zoo

    config = None
    if VARIANTS[args.variant] is not None:
        config = os.path.join(args.work, f"{args.variant}.toml")
        with open(config, "w", encoding="utf-8") as f:
            f.write(VARIANTS[args.variant])
    dtype = "float32" if args.model_path.startswith("tiny") else "bfloat16"
    path = None if args.model_path == "tiny-llama" else args.model_path
    model = zoo.load(path, dtype=dtype, compiled=True, compile_config=config, max_batch_size=8, max_seq_len=2048,
                     cache_dir=args.cache_dir)
    loaded = time.perf_counter() - START
    model.warmup()
    runner = model.engine.runner
    return {"loaded_s": loaded, "all_graphs_s": time.perf_counter() - START, "graphs": runner.graphs_ready,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "graphs_total": runner.graphs_total, "graph_s": sum(runner.first_call_seconds.values()),
            "graph_cache": model.graph_cache_status}


def run_worker(model: str, variant: str, work: str) -> dict:
    return run_json_process(__file__, ["--model-path", model, "--variant", variant, "--work", work,
                                       "--cache-dir", os.path.join(work, "graphs")],
                            os.path.join(work, "inductor"), 4 * 3600)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_worker_arguments(p, VARIANTS)
    p.add_argument("--models", default="tiny-llama,llama-3.2-1b")
    p.add_argument("--variants", default="dynamic,dynamic-regional")
    p.add_argument("--out", help="also write the Markdown report here")
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return 0

    import torch

    import _models
    import _report

    rows = []
    for name in [m for m in args.models.split(",") if m]:
        path = name if name == "tiny-llama" else _models.ensure_public_config_model(name)
        for variant in [v for v in args.variants.split(",") if v]:
            work = tempfile.mkdtemp(prefix="zoo-all-buckets-")
            try:
                cold = run_worker(path, variant, work)
                warm = run_worker(path, variant, work)
            finally:
                shutil.rmtree(work, ignore_errors=True)
            rows.append((name, variant, cold, warm))
            print(f"[bench] {name} {variant}: cold {cold.get('all_graphs_s', 'error')}, warm "
                  f"{warm.get('all_graphs_s', 'error')}", file=sys.stderr, flush=True)
    lines = [f"torch {torch.__version__}, {torch.get_num_threads()} threads; max_batch_size 8, max_seq_len 2048; "
             "seconds from the process start to every graph built (`zoo.load(compiled=True)` + `warmup()`)", "",
             "| model | variant | graphs | cold: total | cold: in graphs | warm: total | warm: in graphs | cold / warm "
             "| peak RSS (warm) |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, variant, cold, warm in rows:
        if "error" in cold or "error" in warm:
            err = (cold.get("error") or warm.get("error")).strip().splitlines()[-1]
            lines.append(f"| {name} | {variant} | error: {err[:150]} | | | | | |")
            continue
        lines.append(f"| {name} | {variant} | {cold['graphs']} of {cold['graphs_total']} | {cold['all_graphs_s']:.0f} s "
                     f"| {cold['graph_s']:.0f} s | {warm['all_graphs_s']:.1f} s | {warm['graph_s']:.1f} s "
                     f"({warm['graph_cache']}) | {cold['all_graphs_s'] / warm['all_graphs_s']:.1f}x | "
                     f"{warm['peak_rss_gb']:.2f} GB |")
    _report.emit("\n".join(lines), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
