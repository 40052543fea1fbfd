"""Paged KV bookkeeping: block pool, prefix cache, KV events, tensor layout. Imports nothing else of pdserve."""

from pdserve.kvcache.block_pool import Block, BlockPool, PoolStats
from pdserve.kvcache.events import KVEvent, KVEventBatch, KVEventKind, KVEventLog
from pdserve.kvcache.hashing import ROOT_HASH, BlockHash, hash_block, hash_block_chain
from pdserve.kvcache.layout import KVCache, KVLayout

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
