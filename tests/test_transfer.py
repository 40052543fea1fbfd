"""KV transports between two processes: exact blocks, epochs stamped, incompatible peers refused."""

from __future__ import annotations

import os
import uuid
from dataclasses import replace

import pytest
import torch

from kv_peer import kv_peer
from pdserve.kvcache import KVCache, KVLayout
from pdserve.transfer import (
    KVEndpoint,
    SharedMemorySender,
    TcpSender,
    TransferError,
    TransferSpec,
    layout_spec,
    make_sender,
)
from pdserve.transfer.base import runs


def layout(dtype: torch.dtype, num_blocks: int = 12) -> KVLayout:
    return KVLayout(num_layers=3, num_blocks=num_blocks, block_size=4, num_kv_heads=2, head_dim=8, dtype=dtype)


def random_cache(dtype: torch.dtype) -> KVCache:
    kv = KVCache(layout(dtype))
    g = torch.Generator().manual_seed(0)
    for t in kv.k + kv.v:
        t.copy_(torch.randn(t.shape, generator=g).to(dtype))
    return kv


def shm_path() -> str:
    return f"/dev/shm/pdserve-test-{uuid.uuid4().hex}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sender_cls", [SharedMemorySender, TcpSender])
def test_blocks_arrive_exactly_and_are_stamped(dtype: torch.dtype, sender_cls: type) -> None:
    src = random_cache(dtype)
    path = shm_path()
    with kv_peer(layout(dtype), path) as endpoint:
        sender = sender_cls("m")
        spec = TransferSpec("r1", epoch=7, src_block_ids=[1, 2, 3, 9], dst_block_ids=[5, 6, 7, 0])
        stats = sender.send(endpoint, spec, src, timeout_s=10)
        dst = KVCache.open_shared(layout(dtype), path)
        for layer in range(3):
            for s, d in zip(spec.src_block_ids, spec.dst_block_ids, strict=True):
                assert torch.equal(dst.k[layer][d], src.k[layer][s]) and torch.equal(dst.v[layer][d], src.v[layer][s])
            untouched = [b for b in range(12) if b not in spec.dst_block_ids]
            assert dst.k[layer][untouched].abs().sum() == 0
        assert dst.block_epochs.tolist() == [7 if b in spec.dst_block_ids else 0 for b in range(12)]
        assert stats.num_blocks == 4 and stats.num_bytes == 4 * src.layout.bytes_per_block
        sender.close()
    assert not os.path.exists(path)  # the owner unlinked its shared files


def test_incompatible_peers_are_refused_before_any_byte_moves() -> None:
    src = random_cache(torch.float32)
    path = shm_path()
    with kv_peer(layout(torch.float32), path) as endpoint:
        for bad in (
            replace(endpoint.spec, dtype="bfloat16"),
            replace(endpoint.spec, model_id="other"),
            replace(endpoint.spec, num_kv_heads=4),
        ):
            for sender in (SharedMemorySender("m"), TcpSender("m")):
                with pytest.raises(TransferError, match="incompatible"):
                    sender.send(replace(endpoint, spec=bad), TransferSpec("r", 1, [0], [0]), src, timeout_s=5)
        dst = KVCache.open_shared(layout(torch.float32), path)
        assert dst.block_epochs.sum() == 0 and dst.k[0].abs().sum() == 0


def test_dead_receiver_fails_within_the_deadline() -> None:
    src = random_cache(torch.float32)
    with kv_peer(layout(torch.float32), shm_path()) as endpoint:
        pass  # the receiver is gone now
    with pytest.raises(TransferError):
        TcpSender("m").send(endpoint, TransferSpec("r", 1, [0], [0]), src, timeout_s=2)


def test_auto_sender_picks_shm_on_the_same_node_and_tcp_elsewhere() -> None:
    src = random_cache(torch.float32)
    path = shm_path()
    with kv_peer(layout(torch.float32), path) as endpoint:
        spec = TransferSpec("r", 3, [0, 1], [2, 3])
        assert make_sender("auto", "m", "node-a").send(endpoint, spec, src, 10).transport == "shm"
        assert make_sender("auto", "m", "node-b").send(endpoint, spec, src, 10).transport == "tcp"
        assert make_sender("tcp", "m", "node-a").send(endpoint, spec, src, 10).transport == "tcp"
        no_tcp: KVEndpoint = replace(endpoint, tcp_address=None)
        with pytest.raises(TransferError):
            make_sender("auto", "m", "node-b").send(no_tcp, spec, src, 10)
    assert layout_spec(src.layout, "m").dtype == "float32"


def test_runs_group_consecutive_blocks() -> None:
    assert runs([1, 2, 3, 9], [5, 6, 7, 0]) == [(1, 5, 3), (9, 0, 1)]
    assert runs([], []) == []
