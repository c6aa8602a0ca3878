"""The two kernels whose best implementation differs per device: the in-place KV-cache write
and attention. Layers call them through an `AttentionOps` object so a device backend (e.g.
zoo.backends.npu) can swap in its fused kernels without touching the modeling code.

Shapes (what every implementation receives and returns):
  write_kv(cache [N, KV, T, hd], index (slot [B,1,1], head [1,KV,1], position [B,1,S]), value [B, KV, S, hd])
      -> None, cache updated in place: cache[slot, head, position] = value
  attention(q [B, H, S, hd], k [B, KV, T, hd], v [B, KV, T, hd], mask [B, 1, S, T] bool (True = attend),
            is_decode: bool) -> [B, H, S, hd]
"""
import torch
import torch.nn.functional as F


class AttentionOps:
    """Generic PyTorch ops: index_put_ and scaled_dot_product_attention (inductor fuses both)."""

    name = "generic"

    def write_kv(self, cache: torch.Tensor, index: tuple, value: torch.Tensor) -> None:
        cache.index_put_(index, value)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                  is_decode: bool) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])
