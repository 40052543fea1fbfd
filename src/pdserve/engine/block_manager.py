"""Maps sequences onto pool blocks: prefix-cache matching, slot allocation, registration and freeing."""

from __future__ import annotations

from pdserve.engine.sequence import Sequence
from pdserve.kvcache import BlockPool


class BlockManager:
    def __init__(self, pool: BlockPool, block_size: int) -> None:
        self.pool = pool
        self.block_size = block_size

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def match_prefix(self, seq: Sequence, max_tokens: int) -> list[int]:
        """Cached blocks covering the longest prefix of `seq`, at most `max_tokens` tokens (no refs taken)."""
        hashes = seq.block_hashes(self.block_size)[: max_tokens // self.block_size]
        return self.pool.lookup(hashes)

    def admit(self, seq: Sequence, cached_block_ids: list[int], num_tokens: int) -> bool:
        """Give a blockless `seq` the cached blocks plus fresh ones up to `num_tokens` tokens; False (and no
        change) if the pool lacks room."""
        assert not seq.block_ids
        self.pool.touch(cached_block_ids)  # first, so allocation cannot evict them
        num_new = self.num_blocks_for(num_tokens) - len(cached_block_ids)
        new_block_ids = self.pool.allocate(max(num_new, 0))
        if new_block_ids is None:
            self.pool.free(cached_block_ids)
            return False
        seq.block_ids = cached_block_ids + new_block_ids
        seq.num_registered_blocks = len(cached_block_ids)
        return True

    def grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Ensure `seq` has blocks for `num_tokens` tokens; False (and no change) if the pool lacks room."""
        num_new = self.num_blocks_for(num_tokens) - len(seq.block_ids)
        if num_new <= 0:
            return True
        new_block_ids = self.pool.allocate(num_new)
        if new_block_ids is None:
            return False
        seq.block_ids.extend(new_block_ids)
        return True

    def register_computed(self, seq: Sequence) -> None:
        """Offer every full block whose KV is computed to the prefix cache (emits `stored` events)."""
        num_full = seq.num_computed_tokens // self.block_size
        if num_full <= seq.num_registered_blocks:
            return
        hashes = seq.block_hashes(self.block_size)
        start = seq.num_registered_blocks
        self.pool.cache(seq.block_ids[start:num_full], hashes[start:num_full])
        seq.num_registered_blocks = num_full

    def free(self, seq: Sequence) -> None:
        """Drop the sequence's references; its registered blocks stay cached until evicted."""
        self.pool.free(seq.block_ids)
        seq.block_ids = []
        seq.num_registered_blocks = 0
