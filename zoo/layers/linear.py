"""Tensor-parallel linear layers. Each is an `nn.Linear` holding this rank's shard, so parameter
names (`weight`, `bias`) are those of a plain Linear; with world size 1 the shard is the whole
tensor and forward is `F.linear` (same graph as before TP existed), except for the few-row
matmuls of a compiled CPU graph (see `linear`).

Each layer also tells the loader where its shard lives in the checkpoint: `checkpoint_pieces(leaf)`
-> one `(global_shape, (dim, start, stop))` per checkpoint tensor it is built from (concatenated
along dim 0 in the parameter). zoo.loader reads only that range of each tensor.

  ColumnParallelLinear  y_r = x W_r^T         W split by output rows; output stays sharded
                        (gather_output=True all-gathers it, e.g. the LM head's logits)
  MergedColumnParallelLinear  several outputs fused in one matmul ([gate; up]), each split alike
  QKVParallelLinear     fused [q; k; v], q heads split evenly, k/v heads split or replicated (GQA)
  RowParallelLinear     y = all_reduce(x_r W_r^T) + b   W split by input columns; bias once, after
                        the reduce. use_mc2 overlaps the matmul with the all-reduce (see forward).

Weight-only quantization (zoo.layers.quant): `quantize_linear_layers` turns a model's layers, still
on the meta device, into holders of the stored form (`qweight`, `scales`[, `zeros`] instead of
`weight`); each shard is the same slice of the stored tensors as of the float weight. The loader
fills them from a quantized checkpoint, or reads the float weight and calls `quantized_state`.
`pack_quantized_layers` then puts them in the run-time layout of the device's kernels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.symbolic_shapes import statically_known_true

from zoo.config import tp_head_split_problem
from zoo.distributed.comm import SINGLE, TPContext, all_gather_last_dim, all_reduce, wait
from zoo.layers import cpu_kernels, quant


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, but a matmul of few rows on CPU under torch.compile runs a GEMV kernel instead.

    Decode multiplies one token per sequence by every weight matrix, bound by reading the weights,
    for which ATen's kernels are slow on CPU (22-28 GB/s where the memory gives 40-60). With bf16
    weights, matmuls known (while tracing) to have at most cpu_kernels.MAX_ROWS rows go to zoo's
    kernel (zoo.layers.cpu_kernels) when it is built: decode steps, and a short prefill chunk with
    the decode step it rides with. Otherwise a single row (fp32, or no kernel) becomes a reduction
    over (x * W).sum(-1) that inductor fuses (41-43 GB/s in a microbenchmark; x is upcast, W is
    not, so freezing has no weight-only op to constant-fold into an fp32 copy), and more rows keep
    the matmul. A dynamic row count counts as few only when its upper bound is (a prompt length
    bounded by the chunk size, zoo.graphs.build): asking about it then adds no guard, so the graph
    does not specialize. Eager mode keeps F.linear."""
    if x.device.type != "cpu" or not torch.compiler.is_compiling():
        return F.linear(x, weight, bias)
    rows = x.numel() // x.shape[-1]
    if (statically_known_true(rows <= cpu_kernels.MAX_ROWS) and weight.dtype == torch.bfloat16
            and x.dtype == torch.bfloat16 and cpu_kernels.available()):
        y = torch.ops.zoo.gemv_bf16(x.reshape(rows, -1), weight)  # [rows, N]
    elif statically_known_true(rows == 1):
        y = (x.reshape(1, 1, -1).float() * weight[None]).sum(-1).to(x.dtype)  # [1, N]
    else:
        return F.linear(x, weight, bias)
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], weight.shape[0])

Slice = tuple[int, int, int]  # (dim, start, stop) in the checkpoint tensor
Piece = tuple[tuple[int, ...], Slice]  # (the checkpoint tensor's global shape, the part this rank reads)


class QuantizableLinear(nn.Linear):
    """An nn.Linear whose weight can be held weight-only quantized. Subclasses say where their float
    weight's shard lives in the checkpoint (`weight_pieces`); the stored quantized tensors' shards
    follow from it (`checkpoint_pieces`), so tensor parallelism reads each rank's part of them too."""

    quant_mode: str | None = None  # None: a float `weight`; else "int8" | "int4"
    group_size: int = 0  # int4: input columns per scale
    layout = quant.STORED  # how the quantized tensors are laid out at run time (pack_for_device)

    def weight_pieces(self) -> list[Piece]:
        raise NotImplementedError

    def checkpoint_pieces(self, leaf: str) -> list[Piece]:
        if leaf == "bias":
            return self.bias_pieces()
        pieces = self.weight_pieces()
        if leaf == "weight":
            return pieces
        return [self._stored_piece(leaf, shape, part) for shape, part in pieces]

    def bias_pieces(self) -> list[Piece]:
        return [((n,), (0, start, stop)) for (n, _), (_, start, stop) in self.weight_pieces()]

    def _stored_piece(self, leaf: str, shape: tuple[int, ...], part: Slice) -> Piece:
        """The piece of stored tensor `leaf` that matches float-weight piece (shape, part)."""
        rows, cols = shape
        dim, start, stop = part
        if leaf == "qweight":
            per = 2 if self.quant_mode == "int4" else 1  # int4: two columns per byte
        elif self.quant_mode == "int8":  # scales [N]: one per row, whole for a column shard
            return ((rows,), (0, start, stop) if dim == 0 else (0, 0, rows))
        else:  # int4 scales / zeros [N, K/G]
            per = self.group_size
        return ((rows, cols // per), (dim, start, stop) if dim == 0 else (1, start // per, stop // per))

    # ---- quantization ----------------------------------------------------------------------------------
    def quantize_weights(self, mode: str, group_size: int) -> None:
        """Hold the stored form of `mode` instead of `weight` (on the meta device, before loading)."""
        out_features, in_features = self.weight.shape
        global_in = self.weight_pieces()[0][0][1]
        if mode == "int4":
            group_size = quant.int4_group_size(global_in, group_size)
            if in_features % group_size:
                raise ValueError(f"int4 with groups of {group_size} columns cannot split {global_in} input "
                                 f"features into shards of {in_features}")
        device = self.weight.device
        del self.weight
        self.quant_mode, self.group_size = mode, group_size
        shapes = {"qweight": (out_features, in_features // (2 if mode == "int4" else 1)),
                  "scales": (out_features,) if mode == "int8" else (out_features, in_features // group_size)}
        shapes["zeros"] = shapes["scales"]
        for leaf in quant.stored_leaves(mode):
            dtype = {"qweight": torch.int8 if mode == "int8" else torch.uint8}.get(leaf, torch.float32)
            self.register_parameter(leaf, nn.Parameter(torch.empty(shapes[leaf], dtype=dtype, device=device),
                                                       requires_grad=False))

    def float_weight_pieces(self) -> list[Piece]:
        """What the loader reads to quantize this layer from a float checkpoint ..."""
        return self.weight_pieces()

    def float_weight_shape(self) -> tuple[int, int]:
        """... into a tensor of this shape."""
        return (self.out_features, self.in_features)

    def quantized_state(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """The stored tensors of this layer from the float weight the loader read."""
        return quant.quantize(weight, self.quant_mode, self.group_size)

    def pack_for_device(self, dtype: torch.dtype) -> None:
        """After loading: int4 goes into the layout of the decode kernel that will run it
        (quant.int4_layout): zoo's form (bf16 scales and zeros) or ATen's CPU packing."""
        if self.quant_mode != "int4":
            return
        self.layout = quant.int4_layout(self.qweight.device.type, dtype, (self.out_features, self.in_features),
                                        self.group_size)
        stored = {leaf: getattr(self, leaf).data for leaf in ("qweight", "scales", "zeros")}
        if self.layout == quant.ZOO_INT4:
            for leaf, t in quant.int4_for_zoo_kernel(stored).items():
                setattr(self, leaf, nn.Parameter(t, requires_grad=False))
        elif self.layout == quant.ATEN_INT4:
            packed = quant.pack_int4_for_cpu(stored, dtype)
            del self.qweight, self.scales, self.zeros
            for leaf in ("qweight", "scales_and_zeros"):
                self.register_parameter(leaf, nn.Parameter(packed[leaf], requires_grad=False))
            self.register_buffer("qgroup_size", packed["qgroup_size"], persistent=False)  # not in checkpoints

    def quantized_params(self) -> dict[str, torch.Tensor]:
        return {leaf: getattr(self, leaf) for leaf in quant.layout_leaves(self.quant_mode, self.layout)}

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., K] @ W^T (+ bias) -> [..., N], with the float weight or its quantized form."""
        if self.quant_mode is None:
            return linear(x, self.weight, bias)
        y = quant.weight_only_matmul(x, self.quant_mode, self.quantized_params(), self.layout)
        return y if bias is None else y + bias

    @property
    def weight_bytes(self) -> int:
        """Bytes of the weight as held (quantized or not), what one full matmul reads."""
        if self.quant_mode is None:
            return self.weight.numel() * self.weight.element_size()
        return sum(t.numel() * t.element_size() for t in self.quantized_params().values())

    def extra_repr(self) -> str:
        mode = f", {self.quant_mode}" + (f" (groups of {self.group_size})" if self.quant_mode == "int4" else "")
        return super().extra_repr() + (mode if self.quant_mode else "")


def quantize_linear_layers(model: nn.Module, mode: str, group_size: int, lm_head_mode: str | None) -> None:
    """Every QuantizableLinear of `model` (on the meta device) holds `mode` weights, except layers
    marked `is_lm_head`, which hold `lm_head_mode` (None: they stay float, e.g. tied to the embedding)."""
    for module in model.modules():
        if not isinstance(module, QuantizableLinear) or module.quant_mode is not None:
            continue
        layer_mode = lm_head_mode if getattr(module, "is_lm_head", False) else mode
        if layer_mode is not None:
            module.quantize_weights(layer_mode, group_size)


def pack_quantized_layers(model: nn.Module, dtype: torch.dtype, kernel_cache_root: str) -> None:
    """Put every quantized layer in its device's run-time layout. bf16 int4 on CPU loads zoo's CPU
    kernels first (built into kernel_cache_root once per host): whether they load decides the layout."""
    layers = [m for m in model.modules() if isinstance(m, QuantizableLinear) and m.quant_mode is not None]
    if dtype == torch.bfloat16 and any(m.quant_mode == "int4" and m.qweight.device.type == "cpu" for m in layers):
        cpu_kernels.load(kernel_cache_root)
    for module in layers:
        module.pack_for_device(dtype)



class ColumnParallelLinear(QuantizableLinear):
    """Output features split across ranks. `pieces` are the global row counts of the checkpoint
    tensors fused into this layer (default: one piece of out_features); each piece is split
    evenly unless `piece_ranges` gives this rank's [start, stop) rows of each piece."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, tp: TPContext | None = None,
                 pieces: list[int] | None = None, piece_ranges: list[tuple[int, int]] | None = None,
                 gather_output: bool = False, what: str = "output features"):
        tp = tp or SINGLE
        pieces = pieces or [out_features]
        if piece_ranges is None:
            piece_ranges = [tp.shard(n, what) for n in pieces]
        local = sum(stop - start for start, stop in piece_ranges)
        super().__init__(in_features, local, bias=bias)
        self.tp, self.pieces, self.piece_ranges = tp, list(pieces), list(piece_ranges)
        self.gather_output = gather_output

    def weight_pieces(self) -> list[Piece]:
        return [((n, self.in_features), (0, start, stop)) for n, (start, stop) in zip(self.pieces, self.piece_ranges)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matmul(x, self.bias)
        if self.gather_output and self.tp.enabled:
            y = all_gather_last_dim(y, self.tp)
        return y


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs in one matmul, e.g. [gate; up]: each piece is split across
    ranks, so rank r holds [gate_r; up_r] and `.chunk(len(sizes), -1)` still separates them."""

    def __init__(self, in_features: int, sizes: list[int], bias: bool = False, tp: TPContext | None = None):
        super().__init__(in_features, sum(sizes), bias, tp, pieces=sizes, what="intermediate size")


def qkv_head_ranges(num_heads: int, num_kv_heads: int, tp: TPContext) -> tuple[tuple[int, int], tuple[int, int]]:
    """This rank's [start, stop) q heads and kv heads.

    q heads are split evenly (num_heads % tp == 0). kv heads are split evenly when
    num_kv_heads % tp == 0; when there are fewer kv heads than ranks (tp % num_kv_heads == 0),
    each rank keeps the one kv head its q heads attend with (kv head h // (num_heads / num_kv_heads)),
    replicated on tp / num_kv_heads ranks."""
    ws = tp.world_size
    problem = tp_head_split_problem(num_heads, num_kv_heads, ws)
    if problem:
        raise ValueError(problem)
    q = tp.shard(num_heads, "num_attention_heads")
    if num_kv_heads % ws == 0:
        kv = tp.shard(num_kv_heads, "num_key_value_heads")
    else:
        group = num_heads // num_kv_heads  # q heads per kv head
        first = q[0] // group
        kv = (first, first + 1)
    return q, kv


class QKVParallelLinear(ColumnParallelLinear):
    """Fused [q; k; v] projection, sharded by heads: q, k and v are split separately so every rank
    holds whole heads, and the kv heads it holds are the ones its q heads use (GQA)."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, bias: bool = False,
                 tp: TPContext | None = None):
        tp = tp or SINGLE
        (q0, q1), (k0, k1) = qkv_head_ranges(num_heads, num_kv_heads, tp)
        hd = head_dim
        super().__init__(hidden_size, (num_heads + 2 * num_kv_heads) * hd, bias, tp,
                         pieces=[num_heads * hd, num_kv_heads * hd, num_kv_heads * hd],
                         piece_ranges=[(q0 * hd, q1 * hd), (k0 * hd, k1 * hd), (k0 * hd, k1 * hd)])
        self.num_heads, self.num_kv_heads = q1 - q0, k1 - k0  # local head counts


class RowParallelLinear(QuantizableLinear):
    """Input features split across ranks; the partial outputs are summed with an all-reduce and
    the bias is added once, after it.

    use_mc2 (tp.use_mc2) overlaps compute and communication: the output features are computed in
    tp.mc2_chunks chunks, and each chunk's all-reduce is issued (asynchronously) as soon as that
    chunk is done, while the next chunk's matmul runs; all are waited for only at the final
    concatenation. On npu the fused kernel torch_npu.npu_mm_all_reduce_base does the same pipelining
    inside one op (written against its documented signature; not run here)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, tp: TPContext | None = None):
        tp = tp or SINGLE
        self.in_range = tp.shard(in_features, "input features")
        super().__init__(self.in_range[1] - self.in_range[0], out_features, bias=bias)
        self.tp, self.global_in_features = tp, in_features

    def weight_pieces(self) -> list[Piece]:
        return [((self.out_features, self.global_in_features), (1, *self.in_range))]

    def bias_pieces(self) -> list[Piece]:
        return [((self.out_features,), (0, 0, self.out_features))]  # bias: whole, added after the reduce

    # int8 scales span whole rows: read them whole, so every rank's shard matches tp=1's quantization
    def float_weight_pieces(self) -> list[Piece]:
        if self.quant_mode == "int8" and self.tp.enabled:
            return [((self.out_features, self.global_in_features), (0, 0, self.out_features))]
        return self.weight_pieces()

    def float_weight_shape(self) -> tuple[int, int]:
        if self.quant_mode == "int8" and self.tp.enabled:
            return (self.out_features, self.global_in_features)
        return super().float_weight_shape()

    def quantized_state(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        state = super().quantized_state(weight)
        if self.quant_mode == "int8" and self.tp.enabled:
            state["qweight"] = state["qweight"][:, self.in_range[0]:self.in_range[1]].contiguous()
        return state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.tp.enabled:
            return self.matmul(x, self.bias)
        if self.tp.use_mc2 and x.device.type == "npu" and self.quant_mode is None:
            return self._npu_mm_all_reduce(x)
        if self.tp.use_mc2 and self.quant_mode is None:
            y = self._chunked_matmul_all_reduce(x)
        else:  # (quantized weights are not split into mc2 chunks: their layouts come in row blocks)
            y = all_reduce(self.matmul(x), self.tp)
        return y if self.bias is None else y + self.bias

    def _chunked_matmul_all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        n = max(1, min(self.tp.mc2_chunks, self.out_features))
        step = -(-self.out_features // n)
        parts = []
        for j in range(0, self.out_features, step):
            # issued now, waited for at the cat below: the next chunk's matmul overlaps this reduce
            parts.append(all_reduce(F.linear(x, self.weight[j:j + step]), self.tp))
        return torch.cat([wait(p) for p in parts], dim=-1)

    def _npu_mm_all_reduce(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - needs Ascend
        import torch_npu

        pg = self.tp.group
        hcomm = pg._get_backend(x.device).get_hccl_comm_name(self.tp.rank)
        x2 = x.reshape(-1, x.shape[-1])
        # allreduce(x1 @ x2 + bias): the bias goes in on rank 0 only, so it is added once
        y = torch_npu.npu_mm_all_reduce_base(x2, self.weight.t(), hcomm, reduce_op="sum",
                                             bias=self.bias if self.tp.rank == 0 else None)
        return y.reshape(*x.shape[:-1], self.out_features)
