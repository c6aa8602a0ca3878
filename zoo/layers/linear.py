"""Tensor-parallel linear layers. Each is an `nn.Linear` holding this rank's shard, so parameter
names (`weight`, `bias`) are those of a plain Linear; with world size 1 the shard is the whole
tensor and forward is `F.linear` (same graph as before TP existed), except for the one-token
matmul of a compiled CPU graph (see `linear`).

Each layer also tells the loader where its shard lives in the checkpoint: `checkpoint_pieces(leaf)`
-> one `(global_shape, (dim, start, stop))` per checkpoint tensor it is built from (concatenated
along dim 0 in the parameter). zoo.loader reads only that range of each tensor.

  ColumnParallelLinear  y_r = x W_r^T         W split by output rows; output stays sharded
                        (gather_output=True all-gathers it, e.g. the LM head's logits)
  MergedColumnParallelLinear  several outputs fused in one matmul ([gate; up]), each split alike
  QKVParallelLinear     fused [q; k; v], q heads split evenly, k/v heads split or replicated (GQA)
  RowParallelLinear     y = all_reduce(x_r W_r^T) + b   W split by input columns; bias once, after
                        the reduce. use_mc2 overlaps the matmul with the all-reduce (see forward).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zoo.config import tp_head_split_problem
from zoo.distributed.comm import SINGLE, TPContext, all_gather_last_dim, all_reduce, wait


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, but a single token on CPU under torch.compile becomes a reduction inductor fuses.

    Batch-1 decode multiplies one row by every weight matrix: a GEMV, bound by reading the weights.
    On this CPU, for a [1, 2048] x [2048, 11264] product, ATen's GEMV read 22-28 GB/s while the
    inductor-generated reduction over (x * W).sum(-1) read 41-43 GB/s (bf16 and fp32, 2 threads;
    a bf16 sum over 2 GB reads ~47 GB/s). With more rows the matmul kernels win (bf16, 4 rows:
    28 vs 14 GB/s), so only one-row calls take this path. x is upcast, W is not: W * x promotes
    inside the fused kernel, so freezing has no weight-only op to constant-fold into an fp32 copy.
    Eager mode keeps F.linear (there the product would be materialised)."""
    rows = x.numel() // x.shape[-1]
    if rows != 1 or x.device.type != "cpu" or not torch.compiler.is_compiling():
        return F.linear(x, weight, bias)
    y = (x.reshape(1, 1, -1).float() * weight[None]).sum(-1).to(x.dtype)  # [1, N]
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], weight.shape[0])

Slice = tuple[int, int, int]  # (dim, start, stop) in the checkpoint tensor


class ColumnParallelLinear(nn.Linear):
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

    def checkpoint_pieces(self, leaf: str) -> list[tuple[tuple[int, ...], Slice]]:
        tail = (self.in_features,) if leaf == "weight" else ()
        return [((n, *tail), (0, start, stop)) for n, (start, stop) in zip(self.pieces, self.piece_ranges)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.weight, self.bias)
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


class RowParallelLinear(nn.Linear):
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

    def checkpoint_pieces(self, leaf: str) -> list[tuple[tuple[int, ...], Slice]]:
        if leaf == "weight":
            return [((self.out_features, self.global_in_features), (1, *self.in_range))]
        return [((self.out_features,), (0, 0, self.out_features))]  # bias: whole, added after the reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.tp.enabled:
            return linear(x, self.weight, self.bias)
        if self.tp.use_mc2:
            if x.device.type == "npu":
                return self._npu_mm_all_reduce(x)
            y = self._chunked_matmul_all_reduce(x)
        else:
            y = all_reduce(linear(x, self.weight), self.tp)
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
