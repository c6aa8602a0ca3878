"""Vocab-parallel embedding table and LM head.

The vocabulary is padded up to a multiple of the tensor-parallel size and split in equal row
ranges; rank r holds rows [r * Vp / tp, (r + 1) * Vp / tp) (padding rows are zero and never used).
The embedding looks up the ids inside its range, zeroes the others and all-reduces; the LM head is
column-parallel over the vocabulary, all-gathers the logits and slices the padding off. Both hold
the same rows, so a tied head can share the embedding's shard. With world size 1 both are exactly
nn.Embedding / nn.Linear (no masking, no collectives).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zoo.layers.linear import ColumnParallelLinear, Piece, Slice
from zoo.distributed.comm import SINGLE, TPContext, all_reduce


def vocab_range(vocab_size: int, tp: TPContext) -> tuple[int, int, int]:
    """(start, stop, padded vocab size) of this rank's rows; stop may pass vocab_size (padding)."""
    padded = -(-vocab_size // tp.world_size) * tp.world_size
    start, stop = tp.shard(padded, "padded vocab size")
    return start, stop, padded


class VocabParallelEmbedding(nn.Embedding):
    def __init__(self, vocab_size: int, dim: int, tp: TPContext | None = None):
        tp = tp or SINGLE
        self.vocab_start, self.vocab_stop, _ = vocab_range(vocab_size, tp)
        super().__init__(self.vocab_stop - self.vocab_start, dim)
        self.tp, self.vocab_size = tp, vocab_size

    def checkpoint_pieces(self, leaf: str) -> list[tuple[tuple[int, ...], Slice]]:
        # rows past the real vocabulary (padding) are not in the checkpoint; the loader zeroes them
        return [((self.vocab_size, self.embedding_dim), (0, self.vocab_start, min(self.vocab_stop, self.vocab_size)))]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if not self.tp.enabled:
            return F.embedding(ids, self.weight)
        inside = (ids >= self.vocab_start) & (ids < self.vocab_stop)
        local = torch.where(inside, ids - self.vocab_start, 0)
        h = F.embedding(local, self.weight) * inside[..., None].to(self.weight.dtype)
        return all_reduce(h, self.tp)


class ParallelLMHead(ColumnParallelLinear):
    """Column-parallel over the (padded) vocabulary; logits all-gathered, padding sliced off."""

    is_lm_head = True  # quantize_linear_layers gives it its own mode

    def __init__(self, dim: int, vocab_size: int, tp: TPContext | None = None):
        tp = tp or SINGLE
        start, stop, padded = vocab_range(vocab_size, tp)
        super().__init__(dim, padded, bias=False, tp=tp, pieces=[vocab_size],
                         piece_ranges=[(start, stop)], gather_output=True)
        self.vocab_size = vocab_size

    def weight_pieces(self) -> list[Piece]:
        start, stop = self.piece_ranges[0]
        return [((self.vocab_size, self.in_features), (0, start, min(stop, self.vocab_size)))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return y[..., : self.vocab_size] if self.tp.enabled and y.shape[-1] != self.vocab_size else y
