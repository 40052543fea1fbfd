"""Paged KV bookkeeping: block pool, prefix cache, KV events, tensor layout. Imports nothing else of pdserve; the
tensor layout (torch) is imported on first use (PEP 562), so the ingress's block hashes never load torch."""

from typing import TYPE_CHECKING, Any

from pdserve.kvcache.block_pool import Block, BlockPool, PoolStats
from pdserve.kvcache.events import KVEvent, KVEventBatch, KVEventKind, KVEventLog
from pdserve.kvcache.hashing import ROOT_HASH, BlockHash, hash_block, hash_block_chain

if TYPE_CHECKING:
    from pdserve.kvcache.layout import KVCache, KVLayout


def __getattr__(name: str) -> Any:
    if name in ("KVCache", "KVLayout"):
        from pdserve.kvcache import layout

        return getattr(layout, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
