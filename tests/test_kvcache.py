"""Exact-answer tests of the block pool, prefix cache and KV events on an 11-block pool."""

from __future__ import annotations

import hashlib

import pytest
import torch

from pdserve.kvcache import (
    ROOT_HASH,
    BlockPool,
    KVCache,
    KVEventKind,
    KVLayout,
    hash_block,
    hash_block_chain,
)


def test_hash_is_chained_salted_and_stable() -> None:
    a = hash_block(ROOT_HASH, [1, 2, 3, 4])
    assert a == hash_block(ROOT_HASH, [1, 2, 3, 4])
    assert a != hash_block(ROOT_HASH, [1, 2, 3, 5])
    assert a != hash_block(ROOT_HASH, [1, 2, 3, 4], cache_salt="tenant-a")
    assert hash_block(a, [5, 6, 7, 8]) != hash_block(ROOT_HASH, [5, 6, 7, 8])
    # A fixed value: the chain must be identical in every process, machine and version (never Python's hash()),
    # and a cryptographic hash (SHA-256) of 32-byte parent || 4-byte salt length || salt || int64 token ids, so a
    # client cannot craft a prompt whose chain collides with another's and decode from its KV.
    layout = bytes(32) + (0).to_bytes(4, "little") + b"".join(t.to_bytes(8, "little") for t in [1, 2, 3, 4])
    assert a == int.from_bytes(hashlib.sha256(layout).digest(), "little")
    assert a == 0xFB721C6021F62D2D3E2F89EBAEEE89D9B7B420E5268DA30AC951534CE8FCB328
    salted = a.to_bytes(32, "little") + (3).to_bytes(4, "little") + b"abc" + (5).to_bytes(8, "little")
    assert hash_block(a, [5], cache_salt="abc") == int.from_bytes(hashlib.sha256(salted).digest(), "little")


def test_chain_covers_full_blocks_only_and_extends() -> None:
    tokens = list(range(10))
    chain = hash_block_chain(tokens, block_size=4)
    assert len(chain) == 2
    assert chain[1] == hash_block(chain[0], [4, 5, 6, 7])
    assert hash_block_chain([*tokens, 10, 11], 4, parent_hashes=chain)[:2] == chain
    assert len(hash_block_chain([*tokens, 10, 11], 4, parent_hashes=chain)) == 3


def test_allocate_in_order_and_none_when_full() -> None:
    pool = BlockPool(11)
    assert pool.allocate(3) == [0, 1, 2]
    assert pool.allocate(8) == [3, 4, 5, 6, 7, 8, 9, 10]
    assert pool.allocate(1) is None
    assert pool.stats().num_used_blocks == 11


def test_free_queues_tail_first_and_eviction_is_lru() -> None:
    pool = BlockPool(11)
    a = pool.allocate(3)  # [0, 1, 2]
    b = pool.allocate(2)  # [3, 4]
    assert a is not None and b is not None
    pool.cache(a, [100, 101, 102])
    pool.free(a)  # queued 2, 1, 0 after the never-used 5..10
    pool.free(b)  # then 4, 3
    # The never-used blocks go first, then a's tail before its head, then b.
    assert pool.allocate(6) == [5, 6, 7, 8, 9, 10]
    assert pool.allocate(2) == [2, 1]
    assert pool.lookup([100, 101, 102]) == [0]  # 101 and 102 were evicted with their blocks


def test_prefix_hit_takes_cached_block_out_of_free_queue() -> None:
    pool = BlockPool(11)
    a = pool.allocate(2)
    assert a == [0, 1]
    pool.cache(a, [7, 8])
    pool.free(a)
    hit = pool.lookup([7, 8, 9])
    assert hit == [0, 1]
    pool.touch(hit)
    assert pool.stats().num_used_blocks == 2
    assert pool.allocate(9) == [2, 3, 4, 5, 6, 7, 8, 9, 10]
    assert pool.allocate(1) is None  # cached blocks in use are never evicted
    pool.touch([0])  # a second reader
    pool.free([0, 1])
    assert pool.blocks[0].ref_count == 1 and pool.blocks[1].ref_count == 0
    with pytest.raises(AssertionError):
        pool.free([1])


def test_duplicate_hash_keeps_first_block() -> None:
    pool = BlockPool(11)
    a, b = pool.allocate(1), pool.allocate(1)
    assert a == [0] and b == [1]
    pool.cache(a, [5])
    pool.cache(b, [5])
    assert pool.lookup([5]) == [0]
    assert pool.blocks[1].block_hash is None
    assert pool.events.latest_seq == 1


def test_events_sequence_numbers_and_kinds() -> None:
    pool = BlockPool(11)
    a = pool.allocate(2)
    assert a is not None
    pool.cache(a, [10, 11])
    pool.free(a)
    pool.allocate(11)  # evicts both cached blocks
    batch = pool.events_since(0, pool.events.incarnation)
    assert batch.snapshot is None
    assert [(e.seq, e.kind, e.block_hashes) for e in batch.events] == [
        (1, KVEventKind.STORED, (10, 11)),
        (2, KVEventKind.REMOVED, (11, 10)),  # the tail block (hash 11) was queued first, so evicted first
    ]
    assert [e.seq for e in pool.events_since(1, pool.events.incarnation).events] == [2]
    assert pool.events_since(2, pool.events.incarnation).events == ()


def test_clear_emits_cleared_and_is_refused_while_blocks_are_used() -> None:
    pool = BlockPool(11)
    a = pool.allocate(1)
    assert a is not None
    pool.cache(a, [3])
    assert not pool.clear_cache()
    pool.free(a)
    assert pool.clear_cache()
    assert pool.lookup([3]) == []
    last = pool.events_since(1, pool.events.incarnation).events[-1]
    assert (last.seq, last.kind, last.block_hashes) == (2, KVEventKind.CLEARED, ())


def test_consumer_that_fell_behind_or_restarted_gets_a_snapshot() -> None:
    pool = BlockPool(11, max_events=2)
    for h in range(4):  # 4 stored events, only the last 2 kept
        b = pool.allocate(1)
        assert b is not None
        pool.cache(b, [h])
    behind = pool.events_since(1, pool.events.incarnation)
    assert behind.snapshot == frozenset({0, 1, 2, 3}) and behind.latest_seq == 4 and behind.events == ()
    caught_up = pool.events_since(2, pool.events.incarnation)
    assert caught_up.snapshot is None and [e.seq for e in caught_up.events] == [3, 4]
    first_contact = pool.events_since(0, None)
    assert first_contact.snapshot == frozenset({0, 1, 2, 3})
    restarted = BlockPool(11)
    assert restarted.events_since(4, pool.events.incarnation).snapshot == frozenset()


def test_kv_layout_and_block_copy() -> None:
    layout = KVLayout(num_layers=2, num_blocks=4, block_size=16, num_kv_heads=2, head_dim=32, dtype=torch.float32)
    assert layout.bytes_per_block == 2 * 2 * 16 * 2 * 32 * 4
    src, dst = KVCache(layout), KVCache(layout)
    assert src.k[0].shape == (4, 16, 2, 32) and src.k[0].is_contiguous()
    src.k[1][2].fill_(3.0)
    src.v[1][3].fill_(4.0)
    k, v = src.read_blocks(1, [2, 3])
    dst.write_blocks(1, [0, 1], k, v)
    assert torch.equal(dst.k[1][0], src.k[1][2]) and torch.equal(dst.v[1][1], src.v[1][3])
    assert dst.k[0].abs().sum() == 0
