"""The block pool: reference-counted KV blocks, a free queue in eviction order, and the prefix cache.

Invariants:
- a block is in the free queue iff its ref_count is 0;
- the free queue is ordered least-recently-freed first: allocation takes (and evicts) from the front;
- a block with a hash is in `_cached` under that hash, and stays there while free until it is reallocated;
- every hash added or dropped from `_cached` is recorded as a KV event.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from pdserve.kvcache.events import KVEventBatch, KVEventKind, KVEventLog
from pdserve.kvcache.hashing import BlockHash


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: BlockHash | None = None  # set once the block is full, computed and registered in the cache


@dataclass(frozen=True)
class PoolStats:
    num_blocks: int
    num_used_blocks: int  # ref_count > 0
    num_cached_blocks: int  # registered in the prefix cache (used or free)
    num_free_blocks: int  # allocatable now (includes free cached blocks, which allocation evicts)


class BlockPool:
    """Owns block ids [0, num_blocks). Not thread-safe: one engine loop drives it."""

    def __init__(self, num_blocks: int, enable_prefix_caching: bool = True, max_events: int = 10_000) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # block_id -> None, oldest first. OrderedDict gives O(1) removal from the middle on a prefix hit.
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[BlockHash, int] = {}
        self.events = KVEventLog(max_events)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def allocate(self, num_blocks: int) -> list[int] | None:
        """Take `num_blocks` blocks with ref_count 1, evicting cached free blocks oldest first; None if no room."""
        if num_blocks > len(self._free):
            return None
        block_ids = [self._free.popitem(last=False)[0] for _ in range(num_blocks)]
        evicted = [h for h in (self._evict(b) for b in block_ids) if h is not None]
        self.events.record(KVEventKind.REMOVED, evicted)
        for block_id in block_ids:
            self.blocks[block_id].ref_count = 1
        return block_ids

    def touch(self, block_ids: Sequence[int]) -> None:
        """Take one more reference on each block (a prefix hit); free ones leave the free queue."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self._free[block_id]
            block.ref_count += 1

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one reference on each block. Pass a request's blocks in order: they are queued tail first, so a
        prefix outlives its own suffix in the cache."""
        for block_id in reversed(block_ids):
            block = self.blocks[block_id]
            assert block.ref_count > 0, f"double free of block {block_id}"
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None

    def lookup(self, block_hashes: Sequence[BlockHash]) -> list[int]:
        """Block ids of the longest cached prefix of the chain `block_hashes` (no references taken)."""
        block_ids: list[int] = []
        if not self.enable_prefix_caching:
            return block_ids
        for block_hash in block_hashes:
            block_id = self._cached.get(block_hash)
            if block_id is None:
                break
            block_ids.append(block_id)
        return block_ids

    def cache(self, block_ids: Sequence[int], block_hashes: Sequence[BlockHash]) -> None:
        """Register full, computed blocks under their hashes. A hash already cached by another block keeps the
        first block (the duplicate stays uncached and is simply freed later)."""
        if not self.enable_prefix_caching:
            return
        stored = []
        for block_id, block_hash in zip(block_ids, block_hashes, strict=True):
            block = self.blocks[block_id]
            if block.block_hash is not None or block_hash in self._cached:
                continue
            block.block_hash = block_hash
            self._cached[block_hash] = block_id
            stored.append(block_hash)
        self.events.record(KVEventKind.STORED, stored)

    def clear_cache(self) -> bool:
        """Drop every cached hash; refused (False) while any block is referenced."""
        if len(self._free) != self.num_blocks:
            return False
        for block in self.blocks:
            block.block_hash = None
        self._cached.clear()
        self.events.record(KVEventKind.CLEARED)
        return True

    def events_since(self, seq: int, incarnation: str | None = None) -> KVEventBatch:
        return self.events.since(seq, lambda: frozenset(self._cached), incarnation)

    def stats(self) -> PoolStats:
        num_free = len(self._free)
        return PoolStats(self.num_blocks, self.num_blocks - num_free, len(self._cached), num_free)

    def _evict(self, block_id: int) -> BlockHash | None:
        block = self.blocks[block_id]
        block_hash, block.block_hash = block.block_hash, None
        if block_hash is not None:
            del self._cached[block_hash]
        return block_hash
