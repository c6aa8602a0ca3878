import torch
import torch.nn.functional as F
from torch import nn


class GatedMLP(nn.Module):
    """SwiGLU MLP with gate and up projections fused into one matmul: down(silu(gate) * up)."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False):
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=bias)  # [gate; up]
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, S, D]
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # [B, S, I] each
        return self.down_proj(F.silu(gate) * up)
