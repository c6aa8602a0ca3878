"""The kernels whose best implementation differs per device: the in-place KV-cache write, the
read of a request's blocks from the paged cache, and attention. Layers call them through an `AttentionOps` object so a device backend (e.g.
zoo.backends.npu) can swap in its fused kernels without touching the modeling code.

Shapes (what every implementation receives and returns):
  write_kv(cache [N, KV, bs, hd], index (block [B,1,S], head [1,KV,1], offset [B,1,S]), value [B, KV, S, hd])
      -> None, cache updated in place: cache[block, head, offset] = value
  read_kv(cache [N, KV, bs, hd], index (block [B,1,T], head [1,KV,1], offset [1,1,T]), block_tables [B, NB])
      -> [B, KV, T, hd]: each row's positions [0, T) gathered from its blocks (index, or the same
      read from the tables: position t is at offset t % bs of block_tables[b, t // bs]), as one
      contiguous sequence
  attention(q [B, H, S, hd], k [B, KV, T, hd], v [B, KV, T, hd], mask [B, 1, S, T] bool (True = attend),
            is_decode: bool) -> [B, H, S, hd]
"""
import torch
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true

from zoo.layers import cpu_kernels

# Up to this many queries per row, CPU attention runs as GEMVs (decode_attention) rather than SDPA's
# flash kernel: compiled, 16 layers of 32 heads / 8 kv heads / hd 64 in bf16 on the 2-core host took
# 12.3 vs 28.0 ms for 16 queries over 1,016 positions, 22.2 vs 35.5 ms over 2,000, and 77.5 vs
# 128 ms for 64 queries over 2,000 (a prefill chunk riding with a decode step, 2026-12-07).
SHORT_QUERIES = 64


class AttentionOps:
    """Generic PyTorch ops: index_put_ and scaled_dot_product_attention (inductor fuses both),
    except for decode and short queries on CPU (see decode_attention)."""

    name = "generic"

    def write_kv(self, cache: torch.Tensor, index: tuple, value: torch.Tensor) -> None:
        cache.index_put_(index, value)

    def read_kv(self, cache: torch.Tensor, index: tuple, block_tables: torch.Tensor) -> torch.Tensor:
        # A gather copy: on CPU the batched GEMVs of decode_attention over the copy measured faster
        # than over a strided view of a contiguous cache (benches/results/paged_attention-*.md).
        # With zoo's CPU kernels built, the copy takes a whole block at a time (zoo::gather_kv),
        # where inductor's gather read at a fifth of a copy's speed.
        if cache.device.type == "cpu" and cpu_kernels.available():
            return torch.ops.zoo.gather_kv(cache, block_tables, index[2].shape[-1])  # T = the offsets' length
        return cache[index]

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                  is_decode: bool) -> torch.Tensor:
        # the query count must be known short when the graph is traced: a dynamic prompt length
        # counts only when its upper bound is (zoo.graphs.build bounds it by the chunk size)
        if q.device.type == "cpu" and (is_decode or statically_known_true(q.shape[2] <= SHORT_QUERIES)):
            return decode_attention(q, k, v, mask)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention of a few queries (decode, a short prefill chunk) over the whole cache as two
    batched matmuls (GEMVs); mask [B, 1, S, T] gives each query's causal limit.

    On CPU, scaled_dot_product_attention's flash kernel is tuned for long queries: for one query
    over a 2049-position bfloat16 cache it measured 3.4 ms per layer against 0.42 ms for this
    (16 heads, hd 128, 2 threads), i.e. it, not the weights, dominated a 1B model's decode step.
    Scores and softmax are float32; the probabilities are cast back to the cache dtype for the
    second matmul, as transformers' eager attention does.
    """
    B, H, S, hd = q.shape  # q [B, H, S, hd]; k, v [B, KV, T, hd]
    KV = k.shape[1]
    G = H // KV  # query heads per kv head: grouped so that k / v are read once, not repeated
    scores = torch.matmul(q.reshape(B, KV, G * S, hd), k.transpose(-1, -2)).float()  # [B, KV, G*S, T]
    scores = scores.view(B, KV, G, S, -1) * hd ** -0.5
    scores = scores.masked_fill(~mask[:, :, None], float("-inf"))  # mask [B, 1, S, T] -> [B, 1, 1, S, T]
    probs = scores.softmax(dim=-1).to(v.dtype).view(B, KV, G * S, -1)
    return torch.matmul(probs, v).view(B, H, S, hd)  # [B, KV, G*S, hd] -> [B, H, S, hd]
