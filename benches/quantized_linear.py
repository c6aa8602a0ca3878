"""One linear layer, float vs weight-only int8 / int4, compiled, at the row counts of decode and
prefill: what zoo.layers.quant's choice of kernel per row count rests on.

The layer is the 1 B bench model's gate/up projection (2048 -> 11264), bf16 activations. Variants,
each torch.compile'd (fullgraph) and timed interleaved (median of --repeats calls, after warm-up):
  bf16            zoo.layers.linear.linear with the bf16 weight, as in the model
  bf16 F.linear   F.linear (ATen's / oneDNN's matmul) at every row count
  int8 kernel     aten._weight_int8pack_mm (int8 weight, per-channel scales)
  int8 dequant    dequantize the int8 weight, then F.linear
  int4 kernel     aten._weight_int4pack_mm_for_cpu (CPU-packed int4, groups of 64)
  int4 dequant    unpack the int4 weight from the packed layout to W [N, K], then F.linear
  zoo int8 / int4 zoo.layers.quant.weight_only_matmul, which picks by row count: the kernel, or (many
                  rows) int8 dequant / int4 dequantized per 64-row block in the packing's order, then bmm

Usage: .venv/bin/python benches/quantized_linear.py [--rows 1,4,8,16,64,256] [--repeats 20]
Writes benches/results/quantized_linear-cpu-<date>.md. The 46 MB bf16 weight may sit partly in
cache on a large-L3 CPU: compare the variants' ratios, not the GB/s, to the bandwidth of a model.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "zoo", "inductor"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import _report  # noqa: E402
from _measure import interleaved_medians, ms_and_bandwidth  # noqa: E402
from zoo.entrypoints.options import positive_int_list  # noqa: E402
from zoo.layers import linear as zoo_linear  # noqa: E402
from zoo.layers import quant  # noqa: E402

N, K, GROUP = 11264, 2048, 64


def variants() -> dict:
    torch.manual_seed(0)
    w = torch.randn(N, K) * 0.02
    w_bf16 = w.to(torch.bfloat16)
    int8 = quant.quantize_int8(w)
    int8_params = {"qweight": int8["qweight"], "scales": int8["scales"].to(torch.bfloat16)}
    int4_params = quant.pack_int4_for_cpu(quant.quantize_int4(w, GROUP), torch.bfloat16)
    sz = int4_params["scales_and_zeros"]

    def int8_dequant(x):
        return F.linear(x, int8_params["qweight"].to(x.dtype) * int8_params["scales"][:, None])

    def int4_dequant(x):  # unpack to W [N, K], then F.linear
        q = quant.unpack_cpu_int4(int4_params["qweight"])
        groups = sz.shape[0]
        zs = sz.transpose(0, 1)
        return F.linear(x, ((q.reshape(N, groups, -1).to(x.dtype) - 8) * zs[..., :1] + zs[..., 1:]).reshape(N, K))

    table = {
        "bf16": (lambda x: zoo_linear.linear(x, w_bf16), 2.0),
        "bf16 F.linear": (lambda x: F.linear(x, w_bf16), 2.0),
        "int8 kernel": (lambda x: torch.ops.aten._weight_int8pack_mm(x, int8_params["qweight"], int8_params["scales"]), 1.0),
        "int8 dequant": (int8_dequant, 1.0),
        "int4 kernel": (lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, int4_params["qweight"], GROUP, sz), 0.5),
        "int4 dequant": (int4_dequant, 0.5),
        "zoo int8": (lambda x: quant.weight_only_matmul(x, "int8", int8_params, quant.STORED), 1.0),
        "zoo int4": (lambda x: quant.weight_only_matmul(x, "int4", int4_params, quant.ATEN_INT4), 0.5),
    }
    return {name: (torch.compile(fn, fullgraph=True, dynamic=False), bytes_per) for name, (fn, bytes_per) in table.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=positive_int_list, default=[1, 4, 8, 16, 64, 256])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    args = p.parse_args()
    fns = variants()
    lines = [f"# One linear layer ({K} -> {N}), bf16 activations: float vs weight-only (CPU, {dt.date.today()})", "",
             f"torch {torch.__version__}, {torch.get_num_threads()} threads; `benches/quantized_linear.py`. "
             "Median ms per call, compiled, variants interleaved; GB/s = the weight's bytes / time.", "",
             "| rows | " + " | ".join(fns) + " |", "| --- |" + " --- |" * len(fns)]
    for rows in args.rows:
        x = torch.randn(rows, K, dtype=torch.bfloat16)
        medians = interleaved_medians({name: fn for name, (fn, _) in fns.items()}, x, args.repeats)
        cells = [ms_and_bandwidth(medians[name], N * K * bytes_per) for name, (_, bytes_per) in fns.items()]
        lines.append(f"| {rows} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    _report.emit("\n".join(lines), os.path.join(args.out, f"quantized_linear-cpu-{dt.date.today().isoformat()}.md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
