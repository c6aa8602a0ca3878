"""zoo's CPU decode kernels (zoo.layers.cpu_kernels) against the alternatives, at decode's row
counts: what the one-row and few-row matmuls of the compiled CPU graphs rest on.

Eight different 2048 -> 11264 weights (the 1 B bench model's gate/up shape) are multiplied in turn,
so the 370 MB of bf16 do not sit in the cache; x is bf16. Variants, interleaved (median of
--repeats calls, after warm-up):
  bf16 reduction   (x.float() * W).sum(-1), compiled (inductor's fused reduction; one row only)
  bf16 F.linear    ATen / oneDNN's matmul
  bf16 zoo         torch.ops.zoo.gemv_bf16
  int8 ATen        aten._weight_int8pack_mm (per-channel scales)
  int8 zoo         torch.ops.zoo.gemv_int8
  int4 ATen        aten._weight_int4pack_mm_for_cpu (groups of 64; bf16 scale and offset per group)
  int4 zoo         torch.ops.zoo.gemv_int4 (zoo's stored form with bf16 scale and offset per group,
                   x quantized to int8 per 64 columns), what zoo's int4 decode calls on AVX512_VNNI
The reduction here gets x as a graph input; inside a model, inductor inlines the input's producer
(the RMSNorm) into it and recomputes it per output row, which this microbenchmark does not show.

Usage: .venv/bin/python benches/cpu_gemv.py [--rows 1,2,4,8] [--repeats 10]
Writes benches/results/cpu_gemv-cpu-<date>.md.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "zoo", "inductor"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import _report  # noqa: E402
from _measure import interleaved_medians, ms_and_bandwidth  # noqa: E402
from zoo.device import default_cache_dir  # noqa: E402
from zoo.entrypoints.options import positive_int_list  # noqa: E402
from zoo.layers import cpu_kernels, quant  # noqa: E402

N, K, LAYERS, GROUP = 11264, 2048, 8, 64


def variants() -> dict:
    torch.manual_seed(0)
    floats = [torch.randn(N, K) * 0.02 for _ in range(LAYERS)]
    bf = [w.to(torch.bfloat16) for w in floats]
    int8 = [quant.quantize_int8(w) for w in floats]
    int4_stored = [quant.quantize_int4(w, GROUP) for w in floats]
    int4 = [quant.pack_int4_for_cpu(d, torch.bfloat16) for d in int4_stored]
    del floats
    s16 = [d["scales"].to(torch.bfloat16) for d in int8]

    def reduction(x):
        return sum((x.float() * w).sum(-1).to(x.dtype) for w in bf)

    table = {
        "bf16 reduction": (torch.compile(reduction, fullgraph=True), 2.0),
        "bf16 F.linear": (lambda x: sum(F.linear(x, w) for w in bf), 2.0),
        "bf16 zoo": (lambda x: sum(torch.ops.zoo.gemv_bf16(x, w) for w in bf), 2.0),
        "int8 ATen": (lambda x: sum(torch.ops.aten._weight_int8pack_mm(x, d["qweight"], s)
                                    for d, s in zip(int8, s16)), 1.0),
        "int8 zoo": (lambda x: sum(torch.ops.zoo.gemv_int8(x, d["qweight"], d["scales"]) for d in int8), 1.0),
        "int4 ATen": (lambda x: sum(torch.ops.aten._weight_int4pack_mm_for_cpu(x, p["qweight"], GROUP,
                                                                             p["scales_and_zeros"]) for p in int4), 0.5),
    }
    if cpu_kernels.has_int4():
        int4_bf16 = [{leaf: t.to(torch.bfloat16) if leaf != "qweight" else t for leaf, t in d.items()}
                     for d in int4_stored]
        table["int4 zoo"] = (lambda x: sum(torch.ops.zoo.gemv_int4(x, d["qweight"], d["scales"], d["zeros"])
                                           for d in int4_bf16), 0.5)
    return table


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=positive_int_list, default=[1, 2, 4, 8])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    args = p.parse_args()
    if not cpu_kernels.load(default_cache_dir()):
        print("zoo's CPU kernels did not build on this machine", file=sys.stderr)
        return 1
    fns = variants()
    names = list(fns)
    lines = [f"# Decode matmuls on CPU: zoo's kernels vs the alternatives ({dt.date.today()})", "",
             f"torch {torch.__version__}, {torch.get_num_threads()} threads; `benches/cpu_gemv.py`. {LAYERS} different "
             f"{K} -> {N} weights in turn (no cache reuse), bf16 x; median ms for all {LAYERS} (interleaved); "
             "GB/s = the weights' bytes / time (int4: the nibbles alone; both layouts add 1/16 for their bf16 "
             "scales and offsets).", "",
             "| rows | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
    for rows in args.rows:
        x = torch.randn(rows, K).to(torch.bfloat16)
        active = {n: f for n, (f, _) in fns.items() if rows == 1 or n != "bf16 reduction"}
        medians = interleaved_medians(active, x, args.repeats)
        cells = [ms_and_bandwidth(medians[n], LAYERS * N * K * fns[n][1]) if n in medians else "–" for n in names]
        lines.append(f"| {rows} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    _report.emit("\n".join(lines), os.path.join(args.out, f"cpu_gemv-cpu-{dt.date.today().isoformat()}.md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
