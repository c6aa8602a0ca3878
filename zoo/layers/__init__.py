"""Building blocks shared by every architecture: norms, rotary embeddings, attention with an
explicit KV cache, the gated MLP. Modeling files compose these and add only what differs."""
from zoo.layers.attention import Attention, AttentionMetadata
from zoo.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from zoo.layers.linear import (ColumnParallelLinear, MergedColumnParallelLinear, QKVParallelLinear,
                               RowParallelLinear)
from zoo.layers.mlp import GatedMLP
from zoo.layers.norm import RMSNorm
from zoo.layers.ops import AttentionOps
from zoo.layers.rotary import RotaryEmbedding, apply_rotary

__all__ = ["Attention", "AttentionOps", "AttentionMetadata", "ColumnParallelLinear", "GatedMLP",
           "MergedColumnParallelLinear", "ParallelLMHead", "QKVParallelLinear", "RMSNorm", "RotaryEmbedding",
           "RowParallelLinear", "VocabParallelEmbedding", "apply_rotary"]
