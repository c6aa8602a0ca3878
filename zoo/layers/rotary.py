"""Rotary position embeddings with the scalings Llama checkpoints use: default, linear, dynamic
(NTK) and llama3. cos/sin are computed from a positions tensor inside the graph, so one graph
serves every position; "dynamic" rescales the base from each row's current length, also as tensors.
"""
import math

import torch
from torch import nn

from zoo.config import RopeConfig


def base_inv_freq(theta: float, head_dim: int) -> torch.Tensor:  # [hd/2]
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    return 1.0 / (theta**exponents)


def llama3_inv_freq(rope: RopeConfig, head_dim: int) -> torch.Tensor:  # [hd/2]
    """Llama 3.1: long wavelengths divided by `factor`, short ones kept, a smooth blend between."""
    inv_freq = base_inv_freq(rope.theta, head_dim)
    old_len = rope.original_max_position_embeddings
    low_freq_wavelen = old_len / rope.low_freq_factor
    high_freq_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    blended = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, blended, scaled)


class RotaryEmbedding(nn.Module):
    def __init__(self, rope: RopeConfig, head_dim: int, max_position_embeddings: int):
        super().__init__()
        self.rope = rope
        self.head_dim = head_dim
        self.max_position_embeddings = max_position_embeddings
        # Built on the CPU explicitly: the model may be constructed under a meta-device context.
        with torch.device("cpu"):
            if rope.type == "llama3":
                inv_freq = llama3_inv_freq(rope, head_dim)
            elif rope.type == "linear":
                inv_freq = base_inv_freq(rope.theta, head_dim) / rope.factor
            else:  # default; dynamic rescales per call, from this base
                inv_freq = base_inv_freq(rope.theta, head_dim)
            exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("exponents", exponents, persistent=False)

    def _dynamic_inv_freq(self, seq_lens: torch.Tensor) -> torch.Tensor:  # [B] -> [B, 1, hd/2]
        """NTK-aware scaling: once a row is longer than max_position_embeddings, grow the base."""
        r, d, max_pos = self.rope, self.head_dim, self.max_position_embeddings
        seq = torch.clamp(seq_lens, min=max_pos).float()  # [B]
        base = r.theta * ((r.factor * seq / max_pos) - (r.factor - 1)) ** (d / (d - 2))  # [B]
        return (1.0 / (base[:, None] ** self.exponents))[:, None, :]

    def forward(self, positions: torch.Tensor, seq_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, S] (int), seq_lens [B] (each row's length, used by dynamic scaling)
        -> cos, sin [B, S, hd] in float32."""
        inv_freq = self._dynamic_inv_freq(seq_lens) if self.rope.type == "dynamic" else self.inv_freq
        freqs = positions[..., None].float() * inv_freq  # [B, S, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [B, S, hd]
        return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, S, hd]; cos/sin [B, S, hd] (float32, cast to x's dtype like the reference)."""
    cos = cos.to(x.dtype)[:, None]
    sin = sin.to(x.dtype)[:, None]
    return x * cos + _rotate_half(x) * sin
