"""The KV cache's block pool: which blocks are free, who references them, and which full prompt
blocks can be found again by their content (automatic prefix caching).

A block is *free* (never cached, or its cache entry dropped), *referenced* (held by one or more
slots; n samples of a prompt and requests with a shared prefix hold the same blocks) or *cached
and unreferenced*: its KV is kept and findable by its prefix key until a new allocation needs the
space, least recently released first.

A full block's key is its tokens chained with the key of the block before it, so a block is
found only after the same whole prefix (like vLLM's block hashes). The dict compares the tokens
exactly; only the previous block's key enters as a hash.
"""
from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterator


def prefix_keys(token_ids: list[int], block_size: int, num_blocks: int) -> Iterator[tuple]:
    """The keys of the first `num_blocks` full blocks of token_ids."""
    parent = 0
    for j in range(num_blocks):
        key = (parent, tuple(token_ids[j * block_size:(j + 1) * block_size]))
        yield key
        parent = hash(key)


class BlockPool:
    def __init__(self, num_blocks: int):
        self.refs = [0] * num_blocks
        self._free = deque(range(num_blocks))
        self._unreferenced: OrderedDict[int, None] = OrderedDict()  # cached, refs 0: oldest first
        self._key_of: dict[int, tuple] = {}
        self._block_of: dict[tuple, int] = {}
        self.lookup_tokens = 0  # prompt tokens looked up (share_prefix) ...
        self.hit_tokens = 0  # ... and those found cached

    @property
    def num_available(self) -> int:
        return len(self._free) + len(self._unreferenced)

    def allocate(self) -> int:
        """A block for new KV, referenced once: a free one, else the least recently released
        cached one (its entry is dropped)."""
        if self._free:
            block = self._free.popleft()
        elif self._unreferenced:
            block, _ = self._unreferenced.popitem(last=False)
            del self._block_of[self._key_of.pop(block)]
        else:
            raise RuntimeError("no free KV block")
        self.refs[block] = 1
        return block

    def acquire(self, block: int) -> None:
        """One more reference to a cached block (a prefix hit) or a held one (a shared copy)."""
        if self.refs[block] == 0:
            del self._unreferenced[block]
        self.refs[block] += 1

    def release(self, block: int) -> None:
        if self.refs[block] < 1:
            raise ValueError(f"block {block} is not referenced")
        self.refs[block] -= 1
        if self.refs[block] == 0:
            if block in self._key_of:
                self._unreferenced[block] = None  # kept, findable, evicted last-released-last
            else:
                self._free.append(block)

    def lookup(self, key: tuple) -> int | None:
        return self._block_of.get(key)

    def register(self, block: int, key: tuple) -> None:
        """Make a referenced block findable by `key` (its KV is written). A key already cached in
        another block keeps that one."""
        if block in self._key_of or key in self._block_of:
            return
        self._key_of[block] = key
        self._block_of[key] = block

    def count_lookup(self, tokens: int, hits: int) -> None:
        self.lookup_tokens += tokens
        self.hit_tokens += hits
