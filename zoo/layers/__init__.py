"""Building blocks shared by every architecture: norms, rotary embeddings, attention with an
explicit KV cache, the gated MLP. Modeling files compose these and add only what differs."""
from zoo.layers.attention import Attention, AttentionMetadata
from zoo.layers.mlp import GatedMLP
from zoo.layers.norm import RMSNorm
from zoo.layers.ops import AttentionOps
from zoo.layers.rotary import RotaryEmbedding, apply_rotary

__all__ = ["Attention", "AttentionOps", "AttentionMetadata", "GatedMLP", "RMSNorm", "RotaryEmbedding", "apply_rotary"]
