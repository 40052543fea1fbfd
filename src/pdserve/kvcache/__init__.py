"""Paged KV bookkeeping: block pool, prefix cache, KV events, tensor layout. Imports nothing else of pdserve but
`lazy`: the tensor layout (torch) is imported on first use."""

from typing import TYPE_CHECKING

from pdserve.kvcache.block_pool import Block, BlockPool, PoolStats
from pdserve.kvcache.events import KVEvent, KVEventBatch, KVEventKind, KVEventLog
from pdserve.kvcache.hashing import ROOT_HASH, BlockHash, hash_block, hash_block_chain
from pdserve.lazy import lazy_exports

if TYPE_CHECKING:
    from pdserve.kvcache.layout import KVCache, KVLayout

__getattr__ = lazy_exports(__name__, {"KVCache": "pdserve.kvcache.layout", "KVLayout": "pdserve.kvcache.layout"})

__all__ = [
    "ROOT_HASH",
    "Block",
    "BlockHash",
    "BlockPool",
    "KVCache",
    "KVEvent",
    "KVEventBatch",
    "KVEventKind",
    "KVEventLog",
    "KVLayout",
    "PoolStats",
    "hash_block",
    "hash_block_chain",
]
