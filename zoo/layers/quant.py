"""Weight-only quantization of linear layers: int8 with one scale per output channel, int4 with a
scale and an offset per group of `group_size` input columns. Activations stay bf16 / fp32.

The stored form (what `python -m zoo.quantize` writes, and what a linear layer holds while
loading) replaces a checkpoint's `<name>.weight` W [N, K] with:
  int8  <name>.qweight  int8  [N, K]       W ~= qweight * scales[:, None]
        <name>.scales   float [N]          scales = max |W[n, :]| / 127 (symmetric)
  int4  <name>.qweight  uint8 [N, K / 2]   q in 0..15, column 2j in the low nibble, 2j + 1 in the high one
        <name>.scales   float [N, K / G]   W[n, g*G:(g+1)*G] ~= (q - 8) * scales[n, g] + zeros[n, g]
        <name>.zeros    float [N, K / G]   (min / max of each group map to q = 0 / 15)
The group size of a tensor is K / scales.shape[1], so the tensors describe themselves.

Kernels (measured in benches/results/quantized_linear-cpu-*.md and cpu_gemv-cpu-*.md): on CPU one
row of int8 (batch-1 decode) runs zoo's kernel (zoo.layers.cpu_kernels) when it is built, and so
do up to 16 decode rows of int4 in a bf16 run (`gemv_int4`, on the stored form with bf16 scales:
it quantizes the activations to int8, so fp32 runs keep ATen's exact kernel); other few-row
matmuls run ATen's weight-only kernels, `_weight_int8pack_mm` and `_weight_int4pack_mm_for_cpu`
(int4 in ATen's packing, made at load). All read the int8 / int4 weights and convert inside the
kernel: no full-precision copy of the weight is made. With many rows (prefill) the weight is dequantized once per call and multiplied by the
float matmul, because those kernels are built for few rows (at 256 rows they ran 4.5x slower than
dequantize + matmul). On other devices the dequantize + matmul form is used for every call.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from zoo.config import INT4_GROUP_SIZES
from zoo.layers import cpu_kernels
# Up to this many rows per call the weight-only kernels run; above it, dequantize + matmul.
WEIGHT_ONLY_KERNEL_MAX_ROWS = 16


def stored_leaves(mode: str) -> tuple[str, ...]:
    """The tensors that replace `weight` in the stored form of `mode`."""
    return ("qweight", "scales") if mode == "int8" else ("qweight", "scales", "zeros")


def int4_group_size(in_features: int, group_size: int) -> int:
    """The group size used for a weight with `in_features` columns: `group_size`, or the largest of
    the CPU kernel's sizes below it that divides in_features (small models have odd widths)."""
    for g in sorted((g for g in INT4_GROUP_SIZES if g <= group_size), reverse=True):
        if in_features % g == 0:
            return g
    raise ValueError(f"int4 needs the input features ({in_features}) to be a multiple of one of "
                     f"{[g for g in INT4_GROUP_SIZES if g <= group_size]} (group size {group_size})")


# ---- quantize / dequantize (load time and offline; plain tensor math) ---------------------------------

QUANTIZE_ROWS = 1024  # rows quantized at a time: bounds the float temporaries while loading


def quantize_int8(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """W [N, K] float -> qweight int8 [N, K], scales float32 [N]."""
    w = w.float()
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # [N]
    qweight = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return {"qweight": qweight, "scales": scales}


def quantize_int4(w: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
    """W [N, K] float -> qweight uint8 [N, K/2], scales / zeros float32 [N, K/G] (see the module doc)."""
    n, k = w.shape
    g = int4_group_size(k, group_size)
    groups = w.float().reshape(n, k // g, g)  # [N, K/G, G]
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)  # [N, K/G]
    scales = ((hi - lo) / 15).clamp(min=1e-12)
    q = torch.round((groups - lo[..., None]) / scales[..., None]).clamp_(0, 15).to(torch.uint8).reshape(n, k)
    zeros = lo + 8 * scales  # the value of q = 8, as ATen's int4 kernels expect
    return {"qweight": q[:, 0::2] | (q[:, 1::2] << 4), "scales": scales, "zeros": zeros}


def quantize(w: torch.Tensor, mode: str, group_size: int) -> dict[str, torch.Tensor]:
    """W [N, K] -> its stored form, QUANTIZE_ROWS rows at a time (each row is quantized on its own)."""
    parts = [quantize_int8(rows) if mode == "int8" else quantize_int4(rows, group_size)
             for rows in w.split(QUANTIZE_ROWS)]
    return {leaf: torch.cat([p[leaf] for p in parts]) for leaf in parts[0]}


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] -> uint8 [N, K] of values 0..15."""
    return torch.stack([qweight & 0xF, qweight >> 4], dim=-1).reshape(qweight.shape[0], -1)


def dequantize(stored: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The stored form (plain layout) -> W [N, K] in dtype."""
    if "zeros" not in stored:
        return (stored["qweight"].to(dtype) * stored["scales"].to(dtype)[:, None])
    q = unpack_int4(stored["qweight"])  # [N, K]
    n, k = q.shape
    groups = stored["scales"].shape[1]
    scales, zeros = stored["scales"].to(dtype)[..., None], stored["zeros"].to(dtype)[..., None]  # [N, K/G, 1]
    return ((q.reshape(n, groups, k // groups).to(dtype) - 8) * scales + zeros).reshape(n, k)


# ---- the run-time form ----------------------------------------------------------------------------------

def cpu_int4_kernel_fits(out_features: int) -> bool:
    return out_features % 16 == 0  # ATen's CPU int4 packing works on blocks of 16 output rows


def zoo_int4_kernel_fits(in_features: int, group_size: int) -> bool:
    """Whether zoo's `gemv_int4` takes a layer: it works on chunks of 64 input columns, a power of
    two of them per group."""
    chunks = group_size // 64
    return in_features % group_size == 0 and group_size % 64 == 0 and chunks & (chunks - 1) == 0


def int4_for_zoo_kernel(stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Plain int4 -> what zoo's `gemv_int4` reads in a bf16 run: the same nibbles, the scales and
    zeros in bf16 (a sixteenth of a byte per weight read instead of an eighth; ATen's CPU packing
    holds them in the activation dtype too)."""
    return {"qweight": stored["qweight"], "scales": stored["scales"].to(torch.bfloat16).contiguous(),
            "zeros": stored["zeros"].to(torch.bfloat16).contiguous()}


def pack_int4_for_cpu(stored: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Plain int4 -> the layout of ATen's CPU kernel: qweight in its block packing [N, K/2],
    scales_and_zeros [K/G, N, 2] in the activation dtype, and the group size as a 0-d int64 tensor
    (the kernel's tensor form takes it so: inductor would otherwise turn the int into a tensor
    constant of its own per layer, which an AOT export, fed its tensors from the module, lacks)."""
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_int4(stored["qweight"]).to(torch.int32), 1)
    scales_and_zeros = torch.stack([stored["scales"], stored["zeros"]], dim=-1).transpose(0, 1)  # [K/G, N, 2]
    group = 2 * stored["qweight"].shape[1] // stored["scales"].shape[1]
    return {"qweight": packed, "scales_and_zeros": scales_and_zeros.to(dtype).contiguous(),
            "qgroup_size": torch.tensor(group, dtype=torch.int64)}


def one_token_each(x: torch.Tensor) -> bool:
    """Whether a matmul input [..., K] holds one token per sequence (decode, or the LM head on the
    last tokens), the case the few-row kernels are for. A prefill's [B, S, K] never counts, whatever
    S: with dynamic lengths S is a dynamic dimension, and branching on B * S would specialize the
    graph to one length."""
    return x.dim() < 3 or x.shape[-2] == 1


# The run-time layouts of a quantized layer's tensors (QuantizableLinear.layout): pack_for_device
# picks one per layer (int4_layout), and weight_only_matmul dispatches on it, so the two agree.
STORED = "stored"  # the stored form (module doc): zoo's / ATen's int8 kernels, or dequantize + matmul
ZOO_INT4 = "zoo-int4"  # stored int4 with bf16 scales and zeros: zoo's gemv_int4 for decode rows
ATEN_INT4 = "aten-int4"  # ATen's CPU int4 packing (pack_int4_for_cpu): its kernel for decode rows


def int4_layout(device_type: str, dtype: torch.dtype, shape: tuple[int, int], group_size: int) -> str:
    """The layout an int4 layer of weight shape [N, K] runs in. zoo's gemv_int4 quantizes the
    activations to int8 for the call, so it serves bf16 runs only; fp32 runs, which compute exactly
    what the dequantized weights say, get ATen's kernel where its packing takes the rows."""
    out_features, in_features = shape
    if device_type != "cpu":
        return STORED
    if dtype == torch.bfloat16 and cpu_kernels.has_int4() and zoo_int4_kernel_fits(in_features, group_size):
        return ZOO_INT4
    return ATEN_INT4 if cpu_int4_kernel_fits(out_features) else STORED


def layout_leaves(mode: str, layout: str) -> tuple[str, ...]:
    """The tensors a layer holds in `layout`."""
    return ("qweight", "scales_and_zeros", "qgroup_size") if layout == ATEN_INT4 else stored_leaves(mode)


def weight_only_matmul(x: torch.Tensor, mode: str, params: dict[str, torch.Tensor], layout: str) -> torch.Tensor:
    """x [..., K] @ W^T -> [..., N] with W held quantized in `params` (a layer's tensors in `layout`)."""
    x2 = x.reshape(-1, x.shape[-1])  # [M, K]
    qweight = params["qweight"]
    decode_rows = one_token_each(x)
    few_rows = decode_rows and x2.shape[0] <= WEIGHT_ONLY_KERNEL_MAX_ROWS
    if layout == ZOO_INT4 and few_rows:
        y = torch.ops.zoo.gemv_int4(x2, qweight, params["scales"], params["zeros"])  # zoo.layers.cpu_kernels
    elif layout == ATEN_INT4 and few_rows:
        # aten._weight_int4pack_mm_for_cpu with the group size as a tensor (see pack_int4_for_cpu)
        y = torch.ops.quantized.int4mm_packed_weight_cpu(x2, qweight, params["qgroup_size"], params["scales_and_zeros"])
    elif layout == ATEN_INT4:  # many rows: dequantize from the kernel's layout, then the float matmul
        y = _cpu_packed_int4_matmul(x2, qweight, params["scales_and_zeros"])
    elif mode == "int8" and x.device.type == "cpu" and x2.shape[0] == 1 and decode_rows and cpu_kernels.available():
        y = torch.ops.zoo.gemv_int8(x2, qweight, params["scales"])  # zoo.layers.cpu_kernels
    elif mode == "int8" and x.device.type == "cpu" and few_rows:
        y = torch.ops.aten._weight_int8pack_mm(x2, qweight, params["scales"])
    else:  # the stored form (or zoo's int4 form, whose bf16 scales dequantize the same way)
        y = _dequantized_matmul(x2, params)
    return y.reshape(*x.shape[:-1], y.shape[-1])


# Many-row matmuls dequantize this many output rows of the weight at a time (8 MB of bf16 for a
# 2048-wide layer), which stay in cache and in the allocator's heap. Dequantizing a whole 1 B-model
# layer at once (46 MB of bf16) cost more than its matmul: every call faulted in fresh pages.
DEQUANT_ROWS = 2048  # a multiple of 64 (the int4 packing's blocks)


def _dequantized_matmul(x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """x [M, K] @ W^T, W dequantized from the stored (plain) form DEQUANT_ROWS rows at a time."""
    n = params["qweight"].shape[0]
    outs = [F.linear(x, dequantize({leaf: t[r:r + DEQUANT_ROWS] for leaf, t in params.items()}, x.dtype))
            for r in range(0, n, DEQUANT_ROWS)]
    return torch.cat(outs, dim=-1) if len(outs) > 1 else outs[0]


def unpack_cpu_int4(packed: torch.Tensor) -> torch.Tensor:
    """ATen's CPU int4 packing [N, K/2] -> uint8 [N, K] of values 0..15. That packing (torch 2.13)
    takes blocks of 64 output rows and one block of the N % 64 rows left (a multiple of 16). A
    block of R rows is stored as [K, R / 2] bytes; byte (k, j) holds rows j and j + 32 of column k
    in a 64-row block, rows 2j and 2j + 1 in the last one (low nibble first). tests/test_quant.py checks this
    against the kernel, so a torch that packs otherwise fails there, not silently."""
    n, half_k = packed.shape
    k = 2 * half_k
    parts, start = [], 0
    for rows in (64, n % 64):  # whole 64-row blocks, then one block of what is left
        count = (n - start) // rows * rows if rows else 0
        if not count:
            continue
        block = packed[start:start + count].reshape(count // rows, k, rows // 2)  # [blocks, K, R/2]
        low, high = block & 0xF, block >> 4
        if rows == 64:
            by_row = torch.cat([low, high], dim=-1)  # [blocks, K, R]: rows j, then j + 32
        else:
            by_row = torch.stack([low, high], dim=-1).reshape(count // rows, k, rows)  # rows 2j, 2j + 1
        parts.append(by_row.transpose(1, 2).reshape(count, k))
        start += count
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def _cpu_packed_int4_matmul(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ W^T for W in ATen's CPU int4 packing (see unpack_cpu_int4), dequantized block by
    block in the packing's own order: a block's bytes are [K, R/2], which unpack to W_block^T
    [K, R] without a transpose, so the matmul runs on them as they are."""
    m, k = x.shape
    n = packed.shape[0]
    groups = scales_and_zeros.shape[0]
    sz = scales_and_zeros.to(x.dtype)  # [K/G, N, 2]
    outs = []
    spans = [(r, min(DEQUANT_ROWS, n // 64 * 64 - r), 64) for r in range(0, n // 64 * 64, DEQUANT_ROWS)]
    if n % 64:
        spans.append((n // 64 * 64, n % 64, n % 64))  # the block of what is left
    for start, count, rows in spans:  # DEQUANT_ROWS rows of 64-row blocks at a time, then the tail block
        nb, half = count // rows, rows // 2
        block = packed[start:start + count].reshape(nb, groups, k // groups, half)  # [nb, K/G, G, R/2]
        span = sz[:, start:start + count]  # [K/G, count, 2]
        if rows == 64:  # the low nibbles are rows [0, 32) of a block, the high ones rows [32, 64)
            s_low, s_high = span.reshape(groups, nb, 2, half, 2).transpose(0, 1).unbind(2)  # [nb, K/G, R/2, 2]
        else:  # rows 2j (low nibble) and 2j + 1 (high nibble)
            s_low, s_high = span.reshape(groups, nb, half, 2, 2).transpose(0, 1).unbind(3)
        parts = []
        for q, sc in ((block & 0xF, s_low), (block >> 4, s_high)):
            wt = (q.to(x.dtype) - 8) * sc[:, :, None, :, 0] + sc[:, :, None, :, 1]  # [nb, K/G, G, R/2]
            wt = wt.reshape(nb, k, half).permute(1, 0, 2).reshape(k, nb * half)  # one 2-D matmul for all blocks
            parts.append((x @ wt).reshape(m, nb, half))
        low, high = parts
        y = torch.cat([low, high], dim=-1) if rows == 64 else torch.stack([low, high], dim=-1)  # [M, nb, R]
        outs.append(y.reshape(m, count))
    return torch.cat(outs, dim=-1) if len(outs) > 1 else outs[0]
