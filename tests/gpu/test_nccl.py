"""The NCCL backend of the point-to-point KV transport, as far as one GPU lets it run: NCCL needs one GPU per rank,
so a 2-rank pair cannot form here. What runs: NCCL's unique id, a 1-rank communicator moving KV blocks through
NCCL's send/recv to itself (gather -> send/recv -> scatter, exact, GB/s next to a device-to-device copy), the
control channel's handshake refusing incompatible peers before any communicator exists, and a 2-rank pair attempted
on one GPU: it must fail cleanly (TransferError, blocks unstamped) or, if NCCL allowed it, arrive exactly.
Skipped without CUDA or without cupy (the `gpu` extra)."""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from multiprocessing.connection import Connection

import pytest
import torch

from pdserve.kvcache import KVCache, KVLayout
from pdserve.transfer import KVEndpoint, LayerProgress, TransferError, TransferSpec, layout_spec
from pdserve.transfer.base import Deadline, planes
from timing import best_of

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(autouse=True, scope="module")
def _shared_kv_secret() -> Iterator[None]:
    """The peer processes this module spawns share the KV handshake's secret with it, as a cluster's replicas do
    (they inherit the environment)."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PDSERVE_KV_SECRET", "gpu-tests-shared-secret")
        yield


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


def _decode_replica(conn: Connection, host_id: str | None) -> None:
    if host_id is not None:
        os.environ["NCCL_HOSTID"] = host_id  # before NCCL starts in this process
    kv = KVCache(LAYOUT, device="cuda")
    for epoch, ids in enumerate(_destinations(), start=3):  # what the decode engine's reservations would grant
        kv.open_writes(ids, epoch, time.monotonic_ns() + 600 * 10**9)
    rx = P2PReceiver(kv, NcclBackend(), node_id="node-b", model_id="m")
    conn.send(rx.endpoint)
    while (message := conn.recv()) != "stop":
        torch.cuda.synchronize()
        conn.send(([kv.k[i][message].cpu() for i in (0, 29)], kv.block_epochs[message].cpu(), rx.counters))
    rx.close()


@contextmanager
def decode_replica(host_id: str | None) -> Iterator[tuple[KVEndpoint, Connection]]:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    peer = ctx.Process(target=_decode_replica, args=(child, host_id), daemon=True)
    peer.start()
    try:
        yield parent.recv(), parent
    finally:
        parent.send("stop")
        peer.join(timeout=30)


def test_two_ranks_on_one_gpu_are_refused_cleanly() -> None:
    """Same GPU, same host: NCCL refuses the pair (duplicate GPU); the transport fails cleanly, nothing stamped."""
    with decode_replica(None) as (endpoint, conn):
        src, num = random_cache(), 16
        spec = TransferSpec(7, list(range(num)), list(range(200, 200 + num)), "two-ranks")
        start = time.monotonic()
        with pytest.raises(TransferError, match="NCCL") as refused:
            P2PSender("m", NcclBackend()).send(endpoint, spec, src, timeout_s=60)
        conn.send(spec.dst_block_ids)
        _, epochs, counters = conn.recv()
        assert epochs.tolist() == [0] * num and counters.built == 0
        print(f"\n2 ranks on 1 GPU, {time.monotonic() - start:.1f} s: {refused.value}")


def _destinations(num: int = 64) -> list[list[int]]:
    """The destination blocks of the pair test's three reservations (epochs 3, 4 and 5)."""
    dst = torch.randperm(LAYOUT.num_blocks, generator=torch.Generator().manual_seed(2))[: 3 * num].tolist()
    return [dst[:num], dst[num : 2 * num], dst[2 * num :]]


def _prefill_replica(conn: Connection, endpoint: KVEndpoint) -> None:
    """The prefill side of the real pair: its transfers, and what it sent, back to the test."""
    os.environ["NCCL_HOSTID"] = "pdserve-prefill"
    src, num, report = random_cache(seed=3), 64, {}
    sender = P2PSender("m", NcclBackend())
    dst = torch.randperm(LAYOUT.num_blocks, generator=torch.Generator().manual_seed(2))[: 3 * num].tolist()
    after = TransferSpec(3, list(range(num)), dst[:num], "after")
    report["first_s"] = sender.send(endpoint, after, src, 60).seconds  # builds the pair
    report["again_s"] = min(sender.send(endpoint, after, src, 60).seconds for _ in range(5))
    # Layer-pipelined: layers written behind a GPU sleep, each reported with its CUDA event.
    pipelined = TransferSpec(4, list(range(num, 2 * num)), dst[num : 2 * num], "pipelined")
    values, progress, results = random_cache(seed=4), LayerProgress(torch.device("cuda")), []
    thread = threading.Thread(target=lambda: results.append(sender.send(endpoint, pipelined, src, 60, progress)))
    thread.start()
    for layer in range(LAYOUT.num_layers):
        torch.cuda._sleep(2_000_000)
        src.k[layer][num : 2 * num].copy_(values.k[layer][num : 2 * num])
        src.v[layer][num : 2 * num].copy_(values.v[layer][num : 2 * num])
        progress.layer_done(layer, list(range(num, 2 * num)))
    thread.join(timeout=60)
    report["pipelined_layers"] = len(results[0].layer_seconds)
    # Deadline: the prefill stalls after layer 0; the pair is aborted on both sides, nothing stamped.
    stalled = LayerProgress(torch.device("cuda"))
    stalled.layer_done(0, list(range(num)))
    try:
        sender.send(endpoint, TransferSpec(5, list(range(num)), dst[2 * num :], "stalled"), src, 1.0, stalled)
    except TransferError as e:
        report["stalled"] = str(e)
    # The same reservation retried over the rebuilt pair (its permit still names epoch 5).
    report["rebuilt_s"] = sender.send(endpoint, TransferSpec(5, list(range(num)), dst[2 * num :], "x"), src, 60).seconds
    report["counters"] = sender.counters
    torch.cuda.synchronize()
    sent = {layer: src.k[layer][: 2 * num].cpu() for layer in (0, 29)}
    conn.send((report, dst, sent))


def test_a_real_two_rank_nccl_pair_on_one_gpu() -> None:
    """Two ranks on one GPU form when each process claims another host (NCCL_HOSTID): NCCL then connects them
    as if across nodes (its socket transport, not NVLink or shared memory). The whole transport runs: rendezvous,
    handshake, warm-up, exact blocks, pair reuse, layer-pipelined push behind CUDA events, deadline -> abort on
    both sides -> rebuild, and no block stamped by the cut transfer."""
    with decode_replica("pdserve-decode") as (endpoint, conn):
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        prefill = ctx.Process(target=_prefill_replica, args=(child, endpoint), daemon=True)
        prefill.start()
        assert parent.poll(240), "the prefill side did not report"
        report, dst, sent = parent.recv()
        prefill.join(timeout=30)
        num = 64
        conn.send(dst)
        (k0, k29), epochs, counters = conn.recv()
        assert torch.equal(k0[: 2 * num], sent[0]) and torch.equal(k29[: 2 * num], sent[29])
        assert epochs.tolist() == [3] * num + [4] * num + [5] * num  # stamped by the retry, not the stalled one
        assert torch.equal(k0[2 * num :], sent[0][:num])  # the rebuilt pair's transfer
        assert report["pipelined_layers"] == LAYOUT.num_layers and "deadline" in report["stalled"]
        assert report["counters"].built == 2 and report["counters"].aborted == 1
        assert counters.built == 2 and counters.aborted == 1
        nbytes = num * LAYOUT.bytes_per_block
        print(
            f"\nNCCL 2-rank pair on one GPU (socket transport between 'hosts'): first transfer incl. building the "
            f"pair {report['first_s'] * 1e3:.0f} ms, then {nbytes / 1e9 / report['again_s']:.2f} GB/s for "
            f"{nbytes / 1e6:.1f} MB ({report['again_s'] * 1e3:.1f} ms); after abort, rebuild + transfer "
            f"{report['rebuilt_s'] * 1e3:.0f} ms; {report['stalled'][:120]}"
        )
