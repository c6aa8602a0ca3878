import torch
import torch.nn.functional as F
from torch import nn

from zoo.layers.linear import MergedColumnParallelLinear, RowParallelLinear
from zoo.distributed.comm import TPContext


class GatedMLP(nn.Module):
    """SwiGLU MLP with gate and up projections fused into one matmul: down(silu(gate) * up).
    Column-parallel gate/up, row-parallel down: one all-reduce per MLP under tensor parallelism."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False, tp: TPContext | None = None):
        super().__init__()
        # [gate; up] (each split across ranks: [gate_r; up_r]), then row-parallel down
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [intermediate_size, intermediate_size], bias, tp)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias=bias, tp=tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, S, D]
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # [B, S, I] each
        return self.down_proj(F.silu(gate) * up)
