"""Where one compiled decode step's time goes, kernel by kernel (CPU).

Loads the ~1 B bench Llama (benches/_models.py) compiled with inductor's per-kernel profiling
(`cpp.enable_kernel_profile`, which puts a profiler range around every generated C++ kernel; the
python wrapper by default, so extern kernels such as aten::mm show too), runs decode steps at the
asked batch sizes under torch.profiler, and sums the kernels' self CPU time by what they do. At
batch 1 every linear layer is a fused reduction and no extern kernel splits the generated code, so
the whole step is one C++ function (one range, "whole step"). Kernels are named after the ops they
fuse, so each is put in one class by the first rule its name matches:
  weights      matmuls / weight-only kernels (mm, addmm, bmm, _weight_int*pack_mm) and the fused
               one-row reductions that read a weight (a `sum` fused with a weight read: cpp_fused_*sum*
               kernels of a decode graph without attention's softmax)
  attention    the fused softmax / score kernels (amax, exp, div) and the KV-cache writes (index_put)
  norms+rotary the RMSNorm (mean, rsqrt) and rotary (cos, sin, neg, cat) kernels
  other        everything else (embedding gather, sampling-free glue, copies)
plus the step's wall time not covered by kernels (launch and wrapper overhead).

Usage: .venv/bin/python benches/decode_profile.py [--batch-sizes 1,2,4] [--quantize int8] [--dtype bfloat16]
                                                  [--cpp-wrapper]
Writes benches/results/decode_profile-cpu-<date>[-<quantize>][-cpp-wrapper].md.
"""
from __future__ import annotations

import argparse
import collections
import datetime as dt
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import _models  # noqa: E402
import _report  # noqa: E402
import zoo  # noqa: E402
from zoo.entrypoints.options import positive_int_list  # noqa: E402

RULES = [
    ("weights", ("zoo::gemv", "weight_int8pack", "weight_int4pack", "int4mm_packed", "aten::mm", "aten::addmm", "aten::bmm", "aten::linear",
                 "aten::matmul", "mkldnn", "onednn")),
    ("attention", ("amax", "exp", "softmax", "index_put", "masked_fill", "where")),
    ("norms+rotary", ("rsqrt", "mean", "cos", "sin", "neg", "cat")),
    ("weights", ("sum",)),  # a fused one-row reduction over a weight (after attention's and the norms' rules)
]


def classify(name: str) -> str:
    if "cpp_fused" in name and "embedding" in name and "softmax" in name:
        return "whole step (one function)"  # batch 1: no extern kernel splits the generated code
    for label, keys in RULES:
        if any(k in name for k in keys):
            return label
    return "other"


def profile_batch(model, batch: int, steps: int) -> dict:
    runner, cache = model.engine.runner, model.engine.cache
    slots = [cache.alloc() for _ in range(batch)]
    try:
        prompts = [[(7 * i + j) % 1000 + 3 for j in range(64)] for i in range(batch)]
        runner.prefill(prompts, slots)
        B = runner.buckets.batch_for(max(slots) + 1)
        ids = torch.zeros(B, 1, dtype=torch.long)
        positions = torch.full((B,), cache.scratch_position)
        positions[slots] = 64

        def step():  # attends over the 65 positions in use (rounded up to the length multiple), as serving does
            return runner.decode(ids, positions, context=65)

        for _ in range(3):
            step()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        wall = (time.perf_counter() - t0) / steps
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                step()
    finally:
        for s in slots:
            cache.free(s)
    by_class, by_kernel = collections.Counter(), collections.Counter()
    for ev in prof.key_averages():
        # inductor names its kernels' ranges graph_<id>_cpp_fused_<ops>
        kernel = "cpp_fused" in ev.key or ev.key.startswith(("aten::", "torch.ops", "quantized::", "mkldnn", "zoo::"))
        if kernel and not ev.key.startswith(("aten::empty", "aten::as_strided", "aten::view", "aten::reshape",
                                             "aten::alias", "aten::resolve_conj")):
            ms = ev.self_cpu_time_total / 1e3 / steps
            by_class[classify(ev.key)] += ms
            by_kernel[ev.key] += ms
    return {"wall_ms": wall * 1e3, "by_class": by_class, "by_kernel": by_kernel}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-sizes", type=positive_int_list, default=[1, 2, 4])
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--quantize", default=None)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--cpp-wrapper", action="store_true", help="build with cpp_wrapper (zoo's CPU default) instead "
                   "of the python wrapper: the wall times of the real graphs (inductor's ranges still show)")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    args = p.parse_args()
    path = _models.ensure_medium_llama()
    model = zoo.load(path, dtype=args.dtype, quantize=args.quantize, compiled=True, max_batch_size=max(args.batch_sizes),
                     max_seq_len=2048, buckets=zoo.Buckets.dynamic(tuple(args.batch_sizes), 2048),
                     inductor_options={"cpp.enable_kernel_profile": True, "cpp_wrapper": args.cpp_wrapper},
                     cache_dir=tempfile.mkdtemp(prefix="zoo-profile-"))
    model.warmup()
    variant = f"{args.dtype}" + (f", {args.quantize} weights" if args.quantize else "")
    lines = [f"# One compiled decode step, kernel by kernel: ~1 B Llama, {variant} (CPU, {dt.date.today()})", "",
             f"torch {torch.__version__}, {torch.get_num_threads()} threads; `benches/decode_profile.py"
             f"{' --cpp-wrapper' if args.cpp_wrapper else ''}` (inductor `cpp.enable_kernel_profile`, "
             f"{'cpp' if args.cpp_wrapper else 'python'} wrapper; 64 tokens in the cache, attended over as serving does). "
             "At batch 1 every linear layer is a fused reduction, so inductor emits the whole step as one C++ "
             "function (one range): batch 2 shows the same step with the weights in matmuls (aten::mm). Self CPU time per step, "
             "summed over the kernels of each class (names matched by the rules in the script's docstring); "
             "`not in kernels` = the step's wall time minus all kernels.", ""]
    for batch in args.batch_sizes:
        r = profile_batch(model, batch, args.steps)
        kernels = sum(r["by_class"].values())
        lines += [f"## batch {batch}: {r['wall_ms']:.1f} ms per step", "", "| class | ms per step | share |",
                  "| --- | --- | --- |"]
        for label, ms in r["by_class"].most_common():
            lines.append(f"| {label} | {ms:.2f} | {100 * ms / r['wall_ms']:.0f}% |")
        rest = r["wall_ms"] - kernels
        lines += [f"| not in kernels | {rest:.2f} | {100 * rest / r['wall_ms']:.0f}% |", "",
                  "The ten costliest kernels:", "", "| kernel | class | ms per step |", "| --- | --- | --- |"]
        for name, ms in r["by_kernel"].most_common(10):
            lines.append(f"| `{name[:90]}` | {classify(name)} | {ms:.2f} |")
        lines.append("")
        print("\n".join(lines[-18:]), flush=True)
    suffix = (f"-{args.quantize}" if args.quantize else "") + ("-cpp-wrapper" if args.cpp_wrapper else "")
    _report.emit("\n".join(lines), os.path.join(args.out, f"decode_profile-cpu-{dt.date.today()}{suffix}.md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
