"""CUDA IPC KV transfer between two processes on one GPU: exact blocks, stamps after the data, refusals before any
byte moves, the write fence (a writer whose reservation is not open to it writes nothing), and its GB/s next to a
device-to-device copy measured in the same run. Skipped without CUDA."""

from __future__ import annotations

import multiprocessing as mp
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection

import pytest
import torch

from kv_peer import grant, push_in_thread
from pdserve.kvcache import KVCache, KVLayout
from pdserve.transfer import (
    CudaIpcSender,
    FencedError,
    KVEndpoint,
    LayerProgress,
    TransferError,
    TransferSpec,
    make_receiver,
)
from timing import best_of

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
# SmolLM2-135M's KV in bf16: 30 layers x 3 KV heads x 64 dims, blocks of 16 tokens.
LAYOUT = KVLayout(num_layers=30, num_blocks=512, block_size=16, num_kv_heads=3, head_dim=64, dtype=torch.bfloat16)


def _decode_replica(conn: Connection, transport: str = "cuda_ipc") -> None:
    """A decode replica's side: a KV cache on the GPU, served over CUDA IPC (and NCCL with "auto"); answers
    reads of its blocks."""
    kv = KVCache(LAYOUT, device="cuda")
    receiver = make_receiver(transport, kv, "m", "node-a")
    conn.send(receiver.endpoint)
    while (message := conn.recv()) != "stop":
        block_ids = message
        torch.cuda.synchronize()
        conn.send(([kv.k[i][block_ids].cpu() for i in (0, 29)], kv.block_epochs[block_ids].cpu()))


def random_cache() -> KVCache:
    kv = KVCache(LAYOUT, device="cuda")
    kv.flat.copy_(torch.randn(kv.flat.shape, device="cuda", generator=torch.Generator("cuda").manual_seed(0)))
    return kv


class Peer:
    """A decode replica in a spawned process, serving its GPU cache over CUDA IPC; `read` returns its layers 0 and 29
    (K) and the arrival stamps of some blocks, `permits` is this process's mapping of its cache (grants here bind
    every writer)."""

    def __init__(self, conn: Connection, endpoint: KVEndpoint) -> None:
        self.conn, self.endpoint = conn, endpoint

    def read(self, block_ids: list[int]) -> tuple[list[torch.Tensor], torch.Tensor]:
        self.conn.send(block_ids)
        layers, epochs = self.conn.recv()
        return layers, epochs

    def permits(self, sender: CudaIpcSender) -> KVCache:
        return sender.map(self.endpoint, torch.device("cuda"))


@pytest.fixture(scope="module")
def peer() -> Iterator[Peer]:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=_decode_replica, args=(child,), daemon=True)
    process.start()
    try:
        yield Peer(parent, parent.recv())
    finally:
        parent.send("stop")
        process.join(timeout=30)


def test_cuda_ipc_is_exact_and_reports_gb_per_s(peer: Peer) -> None:
    endpoint = peer.endpoint
    src, sender = random_cache(), CudaIpcSender("m")
    num = 128  # a 2048-token prompt
    dst_ids = torch.randperm(LAYOUT.num_blocks, generator=torch.Generator().manual_seed(1))[:num].tolist()
    spec = TransferSpec(epoch=5, src_block_ids=list(range(num)), dst_block_ids=dst_ids, transfer_id="r1")
    grant(peer.permits(sender), spec)
    stats = sender.send(endpoint, spec, src, timeout_s=30)
    (k0, k29), epochs = peer.read(dst_ids)
    assert torch.equal(k0, src.k[0][:num].cpu()) and torch.equal(k29, src.k[29][:num].cpu())
    assert epochs.tolist() == [5] * num
    assert stats.num_bytes == num * LAYOUT.bytes_per_block and stats.transport == "cuda_ipc"

    for bad in (TransferSpec(6, [0], [LAYOUT.num_blocks], "r2"),):
        with pytest.raises(TransferError, match="block ids"):
            sender.send(endpoint, bad, src, timeout_s=5)
    with pytest.raises(TransferError, match="model_id"):
        CudaIpcSender("another-model").send(endpoint, spec, src, timeout_s=5)

    ipc_s = best_of(lambda: sender.send(endpoint, spec, src, timeout_s=30), 20)
    local = KVCache(LAYOUT, device="cuda")
    index = torch.tensor(dst_ids, device="cuda")
    ceiling_s = best_of(lambda: _local_copy(src, local, num, index), 20)
    flat = src.flat[: stats.num_bytes // 2]  # bf16: the same number of bytes, one contiguous copy
    out = torch.empty_like(flat)
    memcpy_s = best_of(lambda: (out.copy_(flat), torch.cuda.synchronize()), 20)
    gb = stats.num_bytes / 1e9
    print(
        f"\nCUDA IPC ({torch.cuda.get_device_name()}), {num} blocks = {stats.num_bytes / 1e6:.1f} MB, "
        f"30 layers: {gb / ipc_s:.1f} GB/s ({ipc_s * 1e3:.2f} ms); per-layer gather/scatter within one "
        f"process: {gb / ceiling_s:.1f} GB/s ({ceiling_s * 1e3:.2f} ms); one contiguous device-to-device "
        f"copy of as many bytes: {gb / memcpy_s:.1f} GB/s ({memcpy_s * 1e3:.3f} ms)"
    )


def test_a_writer_whose_reservation_is_not_open_to_it_writes_nothing(peer: Peer) -> None:
    """Never granted, expired, granted to a newer epoch, or revoked between layers of a layer-pipelined send: the
    CUDA IPC writer copies no later layer and stamps nothing (the decode replica could have freed those blocks)."""
    src, sender = random_cache(), CudaIpcSender("m")
    dst = peer.permits(sender)
    ids = [300, 301, 302]
    spec = TransferSpec(epoch=50, src_block_ids=[0, 1, 2], dst_block_ids=ids, transfer_id="fenced")
    (k0_before, k29_before), epochs_before = peer.read(ids)
    expired = time.monotonic_ns() - 1
    for when in ("never", "expired", "newer"):
        if when == "expired":
            dst.open_writes(ids, spec.epoch, expired)
        elif when == "newer":
            dst.open_writes(ids, spec.epoch + 1, time.monotonic_ns() + 60 * 10**9)
        with pytest.raises(FencedError):
            sender.send(peer.endpoint, spec, src, timeout_s=10)
        (k0, k29), epochs = peer.read(ids)
        assert torch.equal(k0, k0_before) and torch.equal(k29, k29_before), when
        assert torch.equal(epochs, epochs_before), when

    spec = grant(dst, TransferSpec(epoch=52, src_block_ids=[0, 1, 2], dst_block_ids=ids, transfer_id="revoked"))
    progress = LayerProgress(torch.device("cuda"))
    errors, done = push_in_thread(sender, peer.endpoint, spec, src, progress)
    progress.layer_done(0, spec.src_block_ids)
    deadline = time.monotonic() + 10
    while not torch.equal(peer.read(ids)[0][0], src.k[0][[0, 1, 2]].cpu()):
        assert time.monotonic() < deadline, "layer 0 never landed"
        time.sleep(0.01)
    dst.close_writes(ids)  # aborted: the decode replica may hand the blocks to another request now
    for layer in range(1, LAYOUT.num_layers):
        progress.layer_done(layer, spec.src_block_ids)
    assert done.wait(timeout=15) and len(errors) == 1 and isinstance(errors[0], FencedError)
    (k0, k29), epochs = peer.read(ids)
    assert torch.equal(k29, k29_before) and torch.equal(epochs, epochs_before)  # no later layer, no stamp
    # The same writer still serves a granted transfer.
    spec = grant(dst, TransferSpec(epoch=53, src_block_ids=[0, 1, 2], dst_block_ids=ids, transfer_id="next"))
    sender.send(peer.endpoint, spec, src, timeout_s=10)
    (k0, k29), epochs = peer.read(ids)
    assert torch.equal(k29, src.k[29][[0, 1, 2]].cpu()) and epochs.tolist() == [53] * 3


def _local_copy(src: KVCache, dst: KVCache, num: int, index: torch.Tensor) -> None:
    src_index = torch.arange(num, device="cuda")
    for layer in range(LAYOUT.num_layers):
        for s, d in ((src.k[layer], dst.k[layer]), (src.v[layer], dst.v[layer])):
            d.index_copy_(0, index, s.index_select(0, src_index))
    torch.cuda.synchronize()
