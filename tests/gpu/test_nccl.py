"""The NCCL backend of the point-to-point KV transport, as far as one GPU lets it run: NCCL needs one GPU per rank,
so a 2-rank pair cannot form here. What runs: NCCL's unique id, a 1-rank communicator moving KV blocks through
NCCL's send/recv to itself (gather -> send/recv -> scatter, exact, GB/s next to a device-to-device copy), the
control channel's handshake refusing incompatible peers before any communicator exists, and a 2-rank pair attempted
on one GPU: it must fail cleanly (TransferError, blocks unstamped) or, if NCCL allowed it, arrive exactly.
Skipped without CUDA or without cupy (the `gpu` extra)."""

from __future__ import annotations

import multiprocessing as mp
import time
from dataclasses import replace
from multiprocessing.connection import Connection

import pytest
import torch

from pdserve.kvcache import KVCache, KVLayout
from pdserve.transfer import TransferError, TransferSpec, layout_spec
from pdserve.transfer.base import Deadline, planes
from timing import best_of

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
nccl = pytest.importorskip("cupy.cuda.nccl", reason="needs cupy with NCCL (the gpu extra)")

from pdserve.transfer.nccl import NcclBackend, NcclCommunicator  # noqa: E402
from pdserve.transfer.p2p import P2PReceiver, P2PSender  # noqa: E402

LAYOUT = KVLayout(num_layers=30, num_blocks=512, block_size=16, num_kv_heads=3, head_dim=64, dtype=torch.bfloat16)


def random_cache(seed: int = 0) -> KVCache:
    kv = KVCache(LAYOUT, device="cuda")
    g = torch.Generator("cuda").manual_seed(seed)
    kv.flat.copy_(torch.randn(kv.flat.shape, device="cuda", generator=g))
    return kv


def test_unique_id_and_a_single_rank_loopback_move_blocks_exactly() -> None:
    backend = NcclBackend()
    uid = bytes.fromhex(backend.root("127.0.0.1", torch.device("cuda")).unique_id)
    assert len(uid) == 128 and any(uid)  # NCCL_UNIQUE_ID_BYTES
    comm = NcclCommunicator.build(backend.nccl, uid, 1, 0, torch.device("cuda", 0), timeout_s=60)
    src, dst, num = random_cache(), KVCache(LAYOUT, device="cuda"), 128
    src_ids = torch.arange(num, device="cuda")
    dst_ids = torch.randperm(LAYOUT.num_blocks, generator=torch.Generator().manual_seed(1))[:num].cuda()

    def move() -> None:
        comm.wait_for(None)
        with comm.stream():
            out = planes(src).index_select(2, src_ids)
            into = torch.empty_like(out)
        backend.nccl.groupStart()  # to itself: the send and the receive must be posted together
        sent, received = comm.send(out), comm.recv(into)
        backend.nccl.groupEnd()
        sent.wait(Deadline(30), "sent")
        received.wait(Deadline(30), "received")
        with comm.stream():
            planes(dst).index_copy_(2, dst_ids, into)
        comm.synchronize()

    move()
    for layer in (0, 17, 29):
        assert torch.equal(dst.k[layer][dst_ids], src.k[layer][:num])
        assert torch.equal(dst.v[layer][dst_ids], src.v[layer][:num])
    nbytes = num * LAYOUT.bytes_per_block
    loop_s = best_of(move, 10)
    flat = src.flat[: nbytes // 2]
    out = torch.empty_like(flat)
    memcpy_s = best_of(lambda: (out.copy_(flat), torch.cuda.synchronize()), 10)
    print(
        f"\nNCCL {nccl.get_version()} 1-rank loopback ({torch.cuda.get_device_name()}), {num} blocks = "
        f"{nbytes / 1e6:.1f} MB: gather + send/recv + scatter {nbytes / 1e9 / loop_s:.1f} GB/s "
        f"({loop_s * 1e3:.2f} ms); one contiguous device-to-device copy: {nbytes / 1e9 / memcpy_s:.1f} GB/s"
    )
    comm.close()


def test_the_handshake_refuses_incompatible_peers_before_any_communicator() -> None:
    kv = KVCache(LAYOUT, device="cuda")
    rx = P2PReceiver(kv, NcclBackend(), node_id="node-b", model_id="m")
    try:
        src = random_cache()
        spec = TransferSpec(1, [0], [0], "r")
        other_model = replace(rx.endpoint, spec=layout_spec(LAYOUT, "other"))
        with pytest.raises(TransferError, match="model_id: other != m"):
            P2PSender("other", NcclBackend()).send(other_model, spec, src, 10)
        with pytest.raises(TransferError, match="not stale"):
            P2PSender("m", NcclBackend()).send(replace(rx.endpoint, cache_id="stale"), spec, src, 10)
        assert rx.counters.built == 0 and kv.block_epochs.sum().item() == 0
    finally:
        rx.close()


def _decode_replica(conn: Connection) -> None:
    kv = KVCache(LAYOUT, device="cuda")
    rx = P2PReceiver(kv, NcclBackend(), node_id="node-b", model_id="m")
    conn.send(rx.endpoint)
    while (message := conn.recv()) != "stop":
        torch.cuda.synchronize()
        conn.send(([kv.k[i][message].cpu() for i in (0, 29)], kv.block_epochs[message].cpu(), rx.counters))
    rx.close()


def test_a_two_rank_pair_on_one_gpu_fails_cleanly_or_is_exact() -> None:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    peer = ctx.Process(target=_decode_replica, args=(child,), daemon=True)
    peer.start()
    try:
        endpoint = parent.recv()
        src, num = random_cache(), 16
        spec = TransferSpec(7, list(range(num)), list(range(200, 200 + num)), "two-ranks")
        sender = P2PSender("m", NcclBackend())
        start = time.monotonic()
        try:
            stats = sender.send(endpoint, spec, src, timeout_s=60)
        except TransferError as e:
            outcome = f"refused by NCCL as expected with one GPU: {e}"
            assert "NCCL" in str(e)
            stamped = 0
        else:
            outcome = f"NCCL formed the pair on one GPU: {stats}"
            stamped = 7
        parent.send(spec.dst_block_ids)
        (k0, k29), epochs, counters = parent.recv()
        assert epochs.tolist() == [stamped] * num
        if stamped:
            assert torch.equal(k0, src.k[0][:num].cpu()) and torch.equal(k29, src.k[29][:num].cpu())
        print(f"\n2 ranks on 1 GPU after {time.monotonic() - start:.1f} s: {outcome}; receiver {counters}")
    finally:
        parent.send("stop")
        peer.join(timeout=30)
