"""Paged KV cache: one pool of fixed-size blocks per layer, a block table per batch slot.

Per layer, k and v are [num_blocks + 1, KV, block_size, hd]. A *slot* is a row of the decode batch
(decode row i = slot i); it owns a block table row, `block_tables[slot]` [blocks_per_seq + 1],
whose column j names the block holding positions [j * block_size, (j + 1) * block_size). Blocks
are taken from the pool only as a sequence grows (`reserve`), so memory is sized by tokens in use,
not slots x max_seq_len, and full prompt blocks are shared between requests with the same prefix
(`share_prefix`, `cache_prefix`: zoo.graphs.block_pool).

Scratch space: the last block is never handed out. Unused table entries point at it, so padding
rows of a prefill batch and idle rows of a decode batch write there and no live request is
touched. Every table row's last column is always the scratch block, and `scratch_position` (the
first position of that column) is where idle decode rows write. (Per-layer tensors, not one stacked
tensor: a stacked cache measured 30% slower compiled on CPU, because functionalisation copies the
whole stack for each layer's in-place write.)
"""
from __future__ import annotations

import torch

from zoo.graphs.block_pool import BlockPool, prefix_keys


class KVCache:
    def __init__(self, num_layers: int, num_slots: int, num_kv_heads: int, max_seq_len: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device, block_size: int = 32,
                 num_tokens: int | None = None):
        """num_tokens: the pool's size in tokens (rounded up to whole blocks); default
        num_slots x max_seq_len, what a cache of whole-sequence slots would take."""
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_slots, self.max_seq_len, self.block_size = num_slots, max_seq_len, block_size
        self.blocks_per_seq = -(-max_seq_len // block_size)  # table columns a whole sequence needs
        num_tokens = num_slots * max_seq_len if num_tokens is None else num_tokens
        self.num_blocks = -(-num_tokens // block_size)
        if self.num_blocks < self.blocks_per_seq:
            raise ValueError(f"a KV cache of {num_tokens} tokens cannot hold one sequence of max_seq_len="
                             f"{max_seq_len} tokens; give it at least {max_seq_len}")
        shape = (self.num_blocks + 1, num_kv_heads, block_size, head_dim)
        # zeros, not empty: masked-out positions still enter softmax(QK)V as 0 * V, and garbage
        # memory could hold NaN/inf bit patterns.
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        # one row per slot plus the scratch slot's; real columns, then the scratch column
        self.block_tables = torch.full((num_slots + 1, self.blocks_per_seq + 1), self.scratch_block,
                                       dtype=torch.long, device=device)
        self.pool = BlockPool(self.num_blocks)
        self._blocks: dict[int, list[int]] = {}  # allocated slot -> its blocks, in position order
        self._free = list(range(num_slots))

    # ---- geometry --------------------------------------------------------------------------
    @property
    def scratch_slot(self) -> int:
        return self.num_slots

    @property
    def scratch_block(self) -> int:
        return self.num_blocks

    @property
    def scratch_position(self) -> int:
        """A position of every table row's scratch column: idle decode rows write there."""
        return self.blocks_per_seq * self.block_size

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    @property
    def bytes_per_token(self) -> int:
        return self.nbytes // ((self.num_blocks + 1) * self.block_size)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- scratch inputs (warm-up, export) ----------------------------------------------------
    def scratch_tables(self, B: int) -> torch.Tensor:
        return self.block_tables[self.scratch_slot].expand(B, -1).contiguous()  # [B, blocks_per_seq + 1]

    def scratch_prefill_inputs(self, B: int, S: int) -> tuple:
        """prefill inputs of shape [B, S] whose writes all land in the scratch block."""
        dev = self.k[0].device
        return (torch.zeros(B, S, dtype=torch.long, device=dev),  # input_ids [B, S]
                torch.zeros(B, dtype=torch.long, device=dev),  # start positions [B]
                torch.ones(B, dtype=torch.long, device=dev),  # lengths [B]
                self.scratch_tables(B), self.k, self.v)

    def scratch_decode_inputs(self, B: int) -> tuple:
        """decode inputs of batch B whose writes all land in the scratch block."""
        dev = self.k[0].device
        return (torch.zeros(B, 1, dtype=torch.long, device=dev),  # input_ids [B, 1]
                torch.full((B,), self.scratch_position, dtype=torch.long, device=dev),  # positions [B]
                self.scratch_tables(B), self.k, self.v)

    # ---- slots -----------------------------------------------------------------------------
    def num_free(self) -> int:
        return len(self._free)

    def is_free(self, slot) -> bool:
        return isinstance(slot, int) and slot in self._free

    def free_slots(self) -> list[int]:
        return sorted(self._free)

    def alloc(self, slot: int | None = None) -> int:
        """Take `slot`, or by default the lowest free slot, so the decode batch (slots [0, B))
        stays as small as possible. It holds no blocks until `reserve` / `share_prefix`."""
        if not self._free:
            raise RuntimeError("no free KV-cache slot")
        if slot is not None:
            if slot not in self._free:
                raise ValueError(f"slot {slot!r} is not free")
            self._free.remove(slot)
        else:
            self._free.sort()
            slot = self._free.pop(0)
        self._blocks[slot] = []
        return slot

    def free(self, slot: int) -> None:
        """Give the slot back; its blocks return to the pool (cached prefix blocks stay findable
        until evicted)."""
        if slot not in self._blocks:
            raise ValueError(f"slot {slot} is not allocated")
        for block in self._blocks.pop(slot):
            self.pool.release(block)
        self.block_tables[slot] = self.scratch_block
        self._free.append(slot)

    def reset(self) -> None:
        for slot in list(self._blocks):
            self.free(slot)

    # ---- blocks ----------------------------------------------------------------------------
    def capacity(self, slot: int) -> int:
        """Positions [0, capacity) of the slot have blocks."""
        return len(self._blocks[slot]) * self.block_size

    @property
    def free_blocks(self) -> int:
        """Blocks a reserve can take: never used, or cached and unreferenced (evicted on demand)."""
        return self.pool.num_available

    def blocks_to_reserve(self, slot: int, num_tokens: int) -> int:
        return max(0, self.blocks_for(num_tokens) - len(self._blocks[slot]))

    def reserve(self, slot: int, num_tokens: int) -> bool:
        """Give the slot blocks for positions [0, num_tokens); False (nothing taken) when the pool
        has too few free blocks."""
        if num_tokens > self.blocks_per_seq * self.block_size:
            raise ValueError(f"{num_tokens} positions exceed max_seq_len={self.max_seq_len}")
        need = self.blocks_to_reserve(slot, num_tokens)
        if need > self.pool.num_available:
            return False
        blocks = self._blocks[slot]
        new = [self.pool.allocate() for _ in range(need)]
        if new:
            self.block_tables[slot, len(blocks):len(blocks) + need] = torch.tensor(new, device=self.block_tables.device)
            blocks += new
        return True

    def share_prefix(self, slot: int, token_ids: list[int]) -> int:
        """Attach the cached blocks of the longest prefix of `token_ids` in whole blocks to this
        empty slot; the number of positions they cover. At least one token is left to compute,
        so a prefill always has a last token to take logits from."""
        if self._blocks[slot]:
            raise ValueError(f"slot {slot} already holds blocks")
        usable = (len(token_ids) - 1) // self.block_size
        shared = []
        for key in prefix_keys(token_ids, self.block_size, usable):
            block = self.pool.lookup(key)
            if block is None:
                break
            self.pool.acquire(block)
            shared.append(block)
        self.pool.count_lookup(len(token_ids), len(shared) * self.block_size)
        if shared:
            self.block_tables[slot, :len(shared)] = torch.tensor(shared, device=self.block_tables.device)
            self._blocks[slot] = shared
        return len(shared) * self.block_size

    def cache_prefix(self, slot: int, token_ids: list[int], computed: int) -> None:
        """Make the slot's full blocks of `token_ids[:computed]` (their KV written) findable by
        share_prefix."""
        full = min(computed, len(token_ids)) // self.block_size
        for j, key in enumerate(prefix_keys(token_ids, self.block_size, full)):
            self.pool.register(self._blocks[slot][j], key)

    # ---- moving a request's KV (n samples, prefill/decode hand-over) ---------------------
    def copy_slot(self, src: int, dst: int, length: int) -> bool:
        """Give empty slot `dst` the first `length` positions of slot `src`: its full blocks are
        shared, the partial last one copied. False (nothing taken) when no block is free."""
        if self._blocks[dst]:
            raise ValueError(f"slot {dst} already holds blocks")
        full, partial = divmod(length, self.block_size)
        if partial and not self.pool.num_available:
            return False
        shared = self._blocks[src][:full]
        for block in shared:
            self.pool.acquire(block)
        self._blocks[dst] = list(shared)
        if shared:
            self.block_tables[dst, :full] = torch.tensor(shared, device=self.block_tables.device)
        if partial:
            self.reserve(dst, length)
            src_block, dst_block = self._blocks[src][full], self._blocks[dst][full]
            for t in self.k + self.v:
                t[dst_block, :, :partial] = t[src_block, :, :partial]
        return True

    def export_slot(self, slot: int, length: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """A request's first `length` positions, per layer: k, v of shape [KV, length, hd]."""
        blocks = torch.tensor(self._blocks[slot][:self.blocks_for(length)], device=self.block_tables.device)

        def gather(t):  # [nb, KV, bs, hd] -> [KV, nb * bs, hd] -> the first `length` positions
            g = t[blocks]
            return g.transpose(0, 1).reshape(g.shape[1], -1, g.shape[3])[:, :length].clone()
        return [gather(k) for k in self.k], [gather(v) for v in self.v]

    def import_slot(self, slot: int, ks: list[torch.Tensor], vs: list[torch.Tensor]) -> None:
        """Write a request's exported k/v (per layer [KV, length, hd]) into empty slot `slot` at
        positions [0, length), in blocks taken from the pool (RuntimeError when too few are free)."""
        if len(ks) != len(self.k) or len(vs) != len(self.v):
            raise ValueError(f"expected {len(self.k)} layers of k and v, got {len(ks)} and {len(vs)}")
        _, KV, bs, hd = self.k[0].shape
        length = ks[0].shape[1] if ks else 0
        for src in ks + vs:
            if src.dim() != 3 or src.shape[0] != KV or src.shape[2] != hd or src.shape[1] != length \
                    or length > self.max_seq_len:
                raise ValueError(f"KV of shape {list(src.shape)} does not fit this cache: [{KV}, length <= "
                                 f"{self.max_seq_len}, {hd}] expected, the same length in every layer")
        if self._blocks[slot]:
            raise ValueError(f"slot {slot} already holds blocks")
        if not self.reserve(slot, length):
            raise RuntimeError(f"not enough free KV blocks for {length} positions "
                               f"({self.blocks_for(length)} needed, {self.free_blocks} free)")
        nb = self.blocks_for(length)
        blocks = torch.tensor(self._blocks[slot][:nb], device=self.block_tables.device)
        for dst, src in zip(self.k + self.v, ks + vs):
            padded = src.new_zeros(KV, nb * bs, hd)
            padded[:, :length] = src
            dst[blocks] = padded.view(KV, nb, bs, hd).transpose(0, 1).to(dst.dtype)
