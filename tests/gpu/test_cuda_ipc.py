"""CUDA IPC KV transfer between two processes on one GPU: exact blocks, stamps after the data, refusals before any
byte moves, and its GB/s next to a device-to-device copy measured in the same run. Skipped without CUDA."""

from __future__ import annotations

import multiprocessing as mp
from multiprocessing.connection import Connection

import pytest
import torch

from pdserve.kvcache import KVCache, KVLayout
from pdserve.transfer import CudaIpcSender, TransferError, TransferSpec, make_receiver
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


def test_cuda_ipc_is_exact_and_reports_gb_per_s() -> None:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    peer = ctx.Process(target=_decode_replica, args=(child,), daemon=True)
    peer.start()
    try:
        endpoint = parent.recv()
        src, sender = random_cache(), CudaIpcSender("m")
        num = 128  # a 2048-token prompt
        dst_ids = torch.randperm(LAYOUT.num_blocks, generator=torch.Generator().manual_seed(1))[:num].tolist()
        spec = TransferSpec(epoch=5, src_block_ids=list(range(num)), dst_block_ids=dst_ids, transfer_id="r1")
        stats = sender.send(endpoint, spec, src, timeout_s=30)
        parent.send(dst_ids)
        (k0, k29), epochs = parent.recv()
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
    finally:
        parent.send("stop")
        peer.join(timeout=30)


def _local_copy(src: KVCache, dst: KVCache, num: int, index: torch.Tensor) -> None:
    src_index = torch.arange(num, device="cuda")
    for layer in range(LAYOUT.num_layers):
        for s, d in ((src.k[layer], dst.k[layer]), (src.v[layer], dst.v[layer])):
            d.index_copy_(0, index, s.index_select(0, src_index))
    torch.cuda.synchronize()
