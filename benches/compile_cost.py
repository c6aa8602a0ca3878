"""Compile cost at real model sizes: cold and warm compile time per graph, split into phases, for
whole-graph and regional compilation, and what each costs per decoded token.

Each measurement runs in a fresh process. "Cold" gives it empty zoo graph-cache and inductor cache
folders (what a new deployment meets); "warm" starts another process on the folders the cold one
filled. A process compiles one prefill graph (batch 1, length --prefill-len) and the decode graphs
of --decode-batches (context --context); inductor's one-time start-up (its ISA probe compiles ~10
small C++ programs into a new cache folder) is measured first, apart, on a trivial function.
The phases come from torch._dynamo.utils.compile_times(): dynamo (tracing, guards), inductor
(lowering, code generation), the C++ compiler (async_compile.wait + loading the built modules).

Models (random weights, the public configs; benches/_models.py builds them once): qwen2.5-0.5b
(24 layers, and --layers cut versions for the depth curve) and llama-3.2-1b (16 layers), bf16.
Variants (compile configs): `whole` = the shipped CPU config (one graph of the whole stack,
cpp_wrapper, freezing), `regional` = one decoder layer compiled and reused (`regional = true`, no
cpp_wrapper). With --decode-speed, each warm process also times --steps decode steps per batch
size, the variants interleaved in rounds.

    .venv/bin/python benches/compile_cost.py [--out benches/results/compile_cost-cpu-DATE.md]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

VARIANTS = {
    "whole": None,  # the shipped config
    "regional": 'backend = "inductor"\nregional = true\n[inductor.bfloat16]\nfreezing = true\n',
}
CXX_KEYS = ("async_compile.wait", "PyCodeCache.load_by_key_path")  # the C++ compiler, loading its modules


def phases(totals: dict[str, float]) -> dict[str, float]:
    """compile_times() totals -> dynamo tracing / inductor lowering + codegen / C++ compile + load
    (inductor's time is the backend's, call_user_compiler, less the C++ part)."""
    backend = totals.get("OutputGraph.call_user_compiler", 0.0)
    cxx = sum(totals.get(k, 0.0) for k in CXX_KEYS)
    return {"dynamo tracing": totals.get("_compile.compile_inner", 0.0) - backend,
            "inductor lowering + codegen": backend - cxx, "C++ compile + load": cxx}


# ---- one process ---------------------------------------------------------------------------------
def worker(args) -> dict:
    import torch
    from torch._dynamo.utils import compile_times

    import zoo

    out = {}
    t0 = time.perf_counter()
    torch.compile(lambda x: x * 2)(torch.ones(4))  # inductor start-up, apart from the model's graphs
    out["inductor_startup_s"] = time.perf_counter() - t0
    config = None
    if VARIANTS[args.variant] is not None:
        config = os.path.join(args.work, f"{args.variant}.toml")
        with open(config, "w", encoding="utf-8") as f:
            f.write(VARIANTS[args.variant])
    S, L, batches = args.prefill_len, args.context, args.decode_batches
    buckets = zoo.Buckets(tuple(sorted({1, *batches})), (S, 2 * L), (L, 2 * L))
    model = zoo.load(args.model_path, dtype="bfloat16", compiled=True, compile_config=config,
                     max_batch_size=max(batches), max_seq_len=2 * L, buckets=buckets, cache_dir=args.cache_dir)
    runner = model.engine.runner
    with torch.no_grad():
        runner.warmup(batch_sizes=[1], prefill_lens=[S], decode=False)
        for B in batches:
            runner.warmup(batch_sizes=[B], prefill_lens=[], context_lens=[L])
    out["graphs_s"] = {" ".join(map(str, k)): v for k, v in runner.first_call_seconds.items()}
    out["graph_cache"] = model.graph_cache_status
    names, values = compile_times(repr="csv")
    totals = {name: sum(float(x) for x in str(v).split(",") if x.strip()) for name, v in zip(names, values)}
    out["phases_s"] = phases(totals)
    if args.steps:
        out["decode_ms"] = {}
        cache = model.engine.cache
        for B in batches:
            input_ids, positions, _, _ = cache.scratch_decode_inputs(B)
            positions = torch.full_like(positions, L - 2)  # a full context of L - 1 tokens
            for _ in range(3):
                runner.decode(input_ids, positions, L)
            times = []
            for _ in range(args.steps):
                t = time.perf_counter()
                runner.decode(input_ids, positions, L)
                times.append((time.perf_counter() - t) * 1e3)
            out["decode_ms"][B] = times
    return out


def run_json_process(script: str, worker_args: list[str], inductor_dir: str, timeout_s: float) -> dict:
    """Run `script --worker ...` in a fresh process on its own inductor cache folder -> the JSON
    object its last stdout line holds, plus process_s (or {"error": its stderr's tail})."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": inductor_dir}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, script, "--worker", *worker_args], env=env, capture_output=True,
                          text=True, timeout=timeout_s)
    if proc.returncode != 0:
        return {"error": proc.stderr[-3000:]}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - t0
    return result


def add_worker_arguments(p: argparse.ArgumentParser, variants) -> None:
    """The hidden options a worker process gets (run_json_process passes --worker itself)."""
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model-path", help=argparse.SUPPRESS)
    p.add_argument("--variant", choices=sorted(variants), help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--cache-dir", help=argparse.SUPPRESS)


def run_worker(model_path: str, variant: str, work: str, cache_dir: str, inductor_dir: str, args,
               steps: int = 0) -> dict:
    return run_json_process(__file__, ["--model-path", model_path, "--variant", variant, "--work", work,
                                       "--cache-dir", cache_dir, "--prefill-len", str(args.prefill_len),
                                       "--context", str(args.context), "--steps", str(steps),
                                       "--decode-batches", *map(str, args.decode_batches)], inductor_dir, 3600)


# ---- the driver ----------------------------------------------------------------------------------
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_worker_arguments(p, VARIANTS)
    p.add_argument("--steps", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--models", default="qwen2.5-0.5b,llama-3.2-1b")
    p.add_argument("--layers", default="4,8", help="also these cut depths of qwen2.5-0.5b (the depth curve)")
    p.add_argument("--variants", default="whole,regional")
    p.add_argument("--prefill-len", type=int, default=128)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--decode-batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--decode-speed", type=int, default=20, metavar="STEPS",
                   help="decode steps timed per batch size in the warm runs of the full-depth models (0: none)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the decode timing")
    p.add_argument("--out", help="also write the Markdown report here")
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return 0

    import _models
    import _report

    runs = []  # (model, layers)
    for name in [m for m in args.models.split(",") if m]:
        runs.append((name, None))
        if name == "qwen2.5-0.5b":
            runs += [(name, int(n)) for n in args.layers.split(",") if n]
    variants = [v for v in args.variants.split(",") if v]
    rows, speed = [], {}
    for name, layers in runs:
        path = _models.ensure_public_config_model(name, layers)
        depth = layers or _models.PUBLIC_CONFIGS[name][1]["num_hidden_layers"]
        for variant in variants:
            work = tempfile.mkdtemp(prefix="zoo-compile-cost-")
            cache_dir, inductor_dir = os.path.join(work, "graphs"), os.path.join(work, "inductor")
            cold = run_worker(path, variant, work, cache_dir, inductor_dir, args)
            warm = run_worker(path, variant, work, cache_dir, inductor_dir, args)
            rows.append((name, depth, variant, cold, warm))
            print(f"[bench] {name} {depth} layers {variant}: cold {_total(cold)}, warm {_total(warm)}",
                  file=sys.stderr, flush=True)
            if layers is None and args.decode_speed:
                speed[(name, variant)] = (path, work, cache_dir, inductor_dir)
            else:
                shutil.rmtree(work, ignore_errors=True)
    decode = {}
    for _ in range(args.rounds):
        for (name, variant), (path, work, cache_dir, inductor_dir) in speed.items():
            r = run_worker(path, variant, work, cache_dir, inductor_dir, args, steps=args.decode_speed)
            for B, times in r.get("decode_ms", {}).items():
                decode.setdefault((name, variant, B), []).extend(times)
    for path, work, *_ in speed.values():
        shutil.rmtree(work, ignore_errors=True)
    _report.emit(report(rows, decode, args), args.out)
    return 0


def _total(r: dict) -> str:
    if "error" in r:
        return "error"
    return f"{sum(r['graphs_s'].values()):.1f} s in graphs"


def report(rows, decode, args) -> str:
    import torch

    lines = [f"torch {torch.__version__}, {torch.get_num_threads()} threads, bf16, random weights; one prefill "
             f"graph (batch 1, length {args.prefill_len}) + decode graphs (batch {args.decode_batches}, context "
             f"{args.context}) per process", "",
             "| model | layers | variant | cold: prefill graph | cold: decode graphs | cold: dynamo / inductor / "
             "C++ | inductor start-up | warm: all graphs | cold / warm process |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, depth, variant, cold, warm in rows:
        if "error" in cold or "error" in warm:
            err = (cold.get("error") or warm.get("error")).strip().splitlines()[-1]
            lines.append(f"| {name} | {depth} | {variant} | error: {err[:150]} | | | | | |")
            continue
        pre = sum(v for k, v in cold["graphs_s"].items() if k.startswith("prefill"))
        dec = [f"{v:.1f}" for k, v in cold["graphs_s"].items() if k.startswith("decode")]
        ph = " / ".join(f"{v:.1f}" for v in cold["phases_s"].values())
        lines.append(f"| {name} | {depth} | {variant} | {pre:.1f} s | {' + '.join(dec)} s | {ph} s | "
                     f"{cold['inductor_startup_s']:.1f} s | {sum(warm['graphs_s'].values()):.1f} s "
                     f"({warm['graph_cache']}) | {cold['process_s']:.0f} / {warm['process_s']:.0f} s |")
    if decode:
        lines += ["", f"Decode step at context {args.context} (warm processes, {args.rounds} interleaved rounds): "
                      "median ms", "", "| model | batch | variant | median ms | vs whole |", "| --- | --- | --- | --- | --- |"]
        for (name, variant, B), times in sorted(decode.items()):
            base = decode.get((name, "whole", B))
            ratio = f"{statistics.median(times) / statistics.median(base):.3f}" if base else ""
            lines.append(f"| {name} | {B} | {variant} | {statistics.median(times):.1f} | {ratio} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
