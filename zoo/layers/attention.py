"""Self-attention over an explicit, paged KV cache.

The cache for one layer is a pair of block pools k/v of shape [blocks, kv_heads, block_size,
head_dim] owned by the caller (zoo.graphs.kv_cache). Each forward writes this call's keys/values in
place at (block, offset) with `index_put_`, then attends over the row's blocks read back in
position order. Block ids and positions are tensors — no Python ints from the data, so one graph
serves all lengths and block layouts.
"""
from dataclasses import dataclass

import torch
from torch import nn

from zoo.layers.linear import QKVParallelLinear, RowParallelLinear
from zoo.layers.norm import RMSNorm
from zoo.layers.ops import AttentionOps
from zoo.layers.rotary import apply_rotary
from zoo.distributed.comm import TPContext


@dataclass
class AttentionMetadata:
    """Per-forward inputs every layer shares; built once by the model, inside the graph."""

    cos: torch.Tensor  # [B, S, hd] float32
    sin: torch.Tensor  # [B, S, hd] float32
    # index_put_ indices that broadcast to [B, KV, S]: block [B,1,S], head [1,KV,1], offset [B,1,S]
    kv_write_index: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    # the same for reading positions [0, T) back: block [B,1,T], head [1,KV,1], offset [1,1,T]
    kv_read_index: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    block_tables: torch.Tensor  # [B, NB] each row's blocks in position order (what kv_read_index reads)
    mask: torch.Tensor  # [B, 1, S, T] bool, True = may attend
    is_decode: bool  # one query per row


class Attention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 qkv_bias: bool = False, o_bias: bool = False, tp: TPContext | None = None,
                 qk_norm_eps: float | None = None):
        super().__init__()
        # q, k and v projections fused into one matmul: rows [q; k; v] of this rank's heads
        self.qkv_proj = QKVParallelLinear(hidden_size, num_heads, num_kv_heads, head_dim, qkv_bias, tp)
        # local head counts (all heads when there is no tensor parallelism)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.head_dim = head_dim
        self.q_size, self.kv_size = self.num_heads * head_dim, self.num_kv_heads * head_dim
        self.o_proj = RowParallelLinear(num_heads * head_dim, hidden_size, bias=o_bias, tp=tp)
        # Qwen3: RMSNorm over head_dim of every q and k head, before rope (one weight shared by all heads)
        if qk_norm_eps is not None:
            self.q_norm = RMSNorm(head_dim, qk_norm_eps)
            self.k_norm = RMSNorm(head_dim, qk_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.ops = AttentionOps()  # a device backend may replace it (see zoo.layers.ops)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata | tuple[AttentionMetadata, ...],
                k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        """x [B, S, D] with one AttentionMetadata; or, for a step that runs several groups of rows
        in one forward (a prefill chunk with a decode step), their tokens flattened, x [1, N, D],
        and a tuple of the groups' metadata in order (N = the sum of their B * S): the projections
        read each weight once for all of them, each group attends on its own."""
        qkv = self.qkv_proj(x)  # [B, S, q + 2 kv]
        if isinstance(meta, AttentionMetadata):
            out = self._attend(qkv, meta, k_cache, v_cache)  # [B, S, q]
        else:
            sizes = [m.cos.shape[0] * m.cos.shape[1] for m in meta]
            out = torch.cat([self._attend(part.view(*m.cos.shape[:2], -1), m, k_cache, v_cache).view(1, -1, self.q_size)
                             for part, m in zip(qkv.split(sizes, dim=1), meta)], dim=1)  # [1, N, q]
        return self.o_proj(out)

    def _attend(self, qkv: torch.Tensor, meta: AttentionMetadata, k_cache: torch.Tensor,
                v_cache: torch.Tensor) -> torch.Tensor:
        """One group of rows: qkv [B, S, q + 2 kv] -> attention output [B, S, q], this group's keys
        and values written into the cache first."""
        B, S, _ = qkv.shape
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(B, S, self.num_heads, self.head_dim)  # [B, S, H, hd]
        k = k.view(B, S, self.num_kv_heads, self.head_dim)  # [B, S, KV, hd]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, H, S, hd], [B, KV, S, hd]
        v = v.view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, KV, S, hd]
        q = apply_rotary(q, meta.cos, meta.sin)
        k = apply_rotary(k, meta.cos, meta.sin)

        self.ops.write_kv(k_cache, meta.kv_write_index, k)
        self.ops.write_kv(v_cache, meta.kv_write_index, v)
        # every position the rows attend to, this call's included: [B, KV, T, hd]
        k = self.ops.read_kv(k_cache, meta.kv_read_index, meta.block_tables)
        v = self.ops.read_kv(v_cache, meta.kv_read_index, meta.block_tables)

        out = self.ops.attention(q, k, v, meta.mask, is_decode=meta.is_decode)  # [B, H, S, hd]
        return out.transpose(1, 2).reshape(B, S, self.q_size)
