"""The point-to-point KV transport (2-rank communicator per pair) over gloo, its CPU backend: the same protocol,
pooling, deadlines and aborts that NCCL runs on GPUs (tests/gpu has the NCCL side). Real communicators between
real processes or threads; nothing is mocked."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace

import pytest
import torch

from kv_peer import grant, kv_peer, open_peer
from pdserve.kvcache import KVCache, KVLayout
from pdserve.transfer import (
    KVEndpoint,
    LayerProgress,
    TransferError,
    TransferSpec,
    layout_spec,
    make_receiver,
    make_sender,
    wire,
)
from pdserve.transfer import p2p as p2p_module
from pdserve.transfer.gloo import GlooBackend
from pdserve.transfer.p2p import MAGIC, P2PReceiver, P2PSender

LAYOUT = KVLayout(num_layers=3, num_blocks=16, block_size=4, num_kv_heads=2, head_dim=8, dtype=torch.bfloat16)


def random_cache(seed: int = 0, layout: KVLayout = LAYOUT) -> KVCache:
    kv = KVCache(layout)
    kv.flat.copy_(torch.randn(kv.flat.shape, generator=torch.Generator().manual_seed(seed)).to(layout.dtype))
    return kv


def assert_moved(src: KVCache, dst: KVCache, spec: TransferSpec) -> None:
    """Every layer's K and V of the spec's blocks arrived exactly and carry the epoch."""
    s, d = list(spec.src_block_ids), list(spec.dst_block_ids)
    for layer in range(src.layout.num_layers):
        assert torch.equal(dst.k[layer][d], src.k[layer][s]) and torch.equal(dst.v[layer][d], src.v[layer][s])
    assert dst.block_epochs[d].tolist() == [spec.epoch] * len(d)


def wait_until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    end = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.01)


@pytest.fixture()
def receivers() -> Iterator[Callable[..., P2PReceiver]]:
    """Makes gloo receivers in this process (each with its own cache); closes them all at the end."""
    made: list[P2PReceiver] = []

    def make(max_pairs: int = 8, model_id: str = "m", layout: KVLayout = LAYOUT) -> P2PReceiver:
        rx = P2PReceiver(KVCache(layout), GlooBackend(), node_id="node-b", model_id=model_id, max_pairs=max_pairs)
        made.append(rx)
        return rx

    yield make
    for rx in made:
        rx.close()


def test_blocks_move_exactly_between_processes() -> None:
    """A receiver in another process (its cache in shared memory, so the test can read it): the rendezvous, the
    communicator and the transfer are real; a second transfer reuses the pair."""
    src = random_cache()
    with kv_peer(LAYOUT, f"/dev/shm/pdserve-test-{uuid.uuid4().hex}", transport="gloo") as endpoint:
        assert endpoint.transports == ("shm", "gloo")  # shm_path only so the test can look
        dst = open_peer(endpoint)  # to look, and to grant: the permits are shared with the receiver process
        sender = make_sender("gloo", "m", "node-a")
        first = grant(dst, TransferSpec(3, [1, 2, 3, 9], [5, 6, 7, 12], "r1"))  # a run and a straggler
        stats = sender.send(endpoint, first, src, timeout_s=30)
        assert stats.transport == "gloo" and stats.num_bytes == 4 * LAYOUT.bytes_per_block
        assert_moved(src, dst, first)
        second = grant(dst, TransferSpec(4, [0, 15], [0, 15], "r2"))
        sender.send(endpoint, second, src, timeout_s=30)
        assert_moved(src, dst, second)
        assert_moved(src, dst, first)
        p2p = sender.sender("gloo")  # type: ignore[attr-defined]
        assert isinstance(p2p, P2PSender) and p2p.counters.built == 1 and p2p.num_pairs == 1
        sender.close()


def test_incompatible_peers_are_refused_before_any_communicator_is_built(receivers) -> None:  # type: ignore[no-untyped-def]
    rx = receivers()
    src = random_cache()
    spec = grant(rx.kv, TransferSpec(1, [0], [0], "r"))  # the fence would let it write: the handshake refuses
    for model_id, endpoint, why in (
        # Same shapes, other weights; the endpoint claims them too, so only the receiver can tell.
        ("other", replace(rx.endpoint, spec=layout_spec(LAYOUT, "other")), "model_id: other != m"),
        ("m", replace(rx.endpoint, cache_id="stale"), "not stale"),  # the endpoint of a cache that is gone
    ):
        with pytest.raises(TransferError, match=f"refused a KV sender|refused it: .*{why}"):
            P2PSender(model_id, GlooBackend()).send(endpoint, spec, src, 10)
    # A sender checks the layout itself too, before connecting.
    other = KVLayout(3, 16, 8, 2, 8, torch.bfloat16)
    with pytest.raises(TransferError, match="block_size: 8 != 4"):
        P2PSender("m", GlooBackend()).send(rx.endpoint, spec, random_cache(layout=other), 10)
    # The wrong backend (an NCCL sender reaching a gloo receiver) and a non-P2P peer are refused in the handshake.
    address = wire.split_address(str(rx.endpoint.p2p_address))
    for magic, backend in ((MAGIC, "nccl"), (wire.MAGIC, "gloo")):
        with socket.create_connection(address, timeout=5) as conn:
            if magic == MAGIC:
                with pytest.raises(TransferError, match="mismatched backend: 'nccl' != 'gloo'"):
                    wire.handshake(conn, rx.cache_id, rx.spec, wire.Deadline(5), magic, backend=backend)
            else:  # another protocol's hello, after the challenge
                wire.recv_bytes(conn, wire.CHALLENGE.size)
                conn.sendall(wire.HELLO.pack(magic, wire.VERSION, 2) + b"{}")
                with contextlib.suppress(ConnectionResetError):
                    assert conn.recv(64) == b""  # not our protocol: hung up on
    assert rx.counters.built == 0 and rx.num_pairs == 0
    assert rx.kv.block_epochs.sum() == 0 and rx.kv.flat.abs().sum() == 0


def test_the_receiver_refuses_bad_transfers_and_keeps_the_pair(receivers) -> None:  # type: ignore[no-untyped-def]
    """Ids out of range reach the receiver only from a lying sender; it refuses before posting a receive, and the
    pair stays usable."""
    rx = receivers()
    src = random_cache()
    sender = P2PSender("m", GlooBackend())
    sender.send(rx.endpoint, grant(rx.kv, TransferSpec(1, [0], [0], "warm")), src, 10)
    lying = replace(rx.endpoint, num_blocks=64)  # claims more blocks than it has
    with pytest.raises(TransferError, match=r"refused it: destination block ids must be distinct, in \[0, 16\)"):
        sender.send(lying, TransferSpec(2, [1], [40], "r"), src, 10)
    # A deadline that is not a finite number of seconds would disable the receiver's timeouts and fence.
    original = p2p_module.wire.send_json

    def lying(conn: socket.socket, message: dict[str, object]) -> None:
        original(conn, {**message, "remaining_s": float("nan")} if "remaining_s" in message else message)

    p2p_module.wire.send_json = lying  # type: ignore[assignment]
    try:
        with pytest.raises(TransferError, match=r"refused it: malformed transfer .*not a finite number"):
            sender.send(rx.endpoint, grant(rx.kv, TransferSpec(4, [1], [5], "nan")), src, 10)
    finally:
        p2p_module.wire.send_json = original  # type: ignore[assignment]

    def overflowing(conn: socket.socket, message: dict[str, object]) -> None:  # JSON 1e400 reads as inf: int() fails
        original(conn, {**message, "epoch": float("inf")} if "remaining_s" in message else message)

    p2p_module.wire.send_json = overflowing  # type: ignore[assignment]
    try:  # refused, not the pair aborted (found in review)
        with pytest.raises(TransferError, match=r"refused it: malformed transfer .*infinity"):
            sender.send(rx.endpoint, grant(rx.kv, TransferSpec(5, [1], [5], "inf")), src, 10)
    finally:
        p2p_module.wire.send_json = original  # type: ignore[assignment]
    assert rx.counters.refused == 2 and rx.kv.block_epochs[5] == 0 and rx.kv.k[0][5].abs().sum() == 0
    spec = grant(rx.kv, TransferSpec(3, [2], [3], "after"))
    sender.send(rx.endpoint, spec, src, 10)
    assert_moved(src, rx.kv, spec)
    assert sender.counters.built == 1 and rx.counters.built == 1 and rx.kv.block_epochs[40 % 16] == 0


def test_a_deadline_spent_waiting_for_the_pair_keeps_the_pair(receivers, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A transfer whose deadline ran out while it waited for its pair (another transfer held it) fails before
    sending anything: the pair was aborted and rebuilt on both sides (for NCCL 50-100 MB; found in review)."""
    rx = receivers()
    src = random_cache()
    sender = P2PSender("m", GlooBackend())
    sender.send(rx.endpoint, grant(rx.kv, TransferSpec(1, [0], [0], "warm")), src, 10)
    hold = P2PSender._hold

    def slow_hold(self: P2PSender, endpoint: object, deadline: object) -> object:
        pair = hold(self, endpoint, deadline)  # type: ignore[arg-type]
        time.sleep(max(0.0, deadline.at - time.monotonic()) + 0.01)  # type: ignore[attr-defined]
        return pair

    monkeypatch.setattr(P2PSender, "_hold", slow_hold)
    with pytest.raises(TransferError, match="deadline passed before the request"):
        sender.send(rx.endpoint, grant(rx.kv, TransferSpec(2, [1], [1], "late")), src, 0.2)
    monkeypatch.setattr(P2PSender, "_hold", hold)
    spec = grant(rx.kv, TransferSpec(3, [2], [3], "after"))
    sender.send(rx.endpoint, spec, src, 10)
    assert_moved(src, rx.kv, spec)
    assert (sender.counters.built, sender.counters.aborted, rx.counters.built) == (1, 0, 1)
    assert rx.kv.block_epochs[1] == 0


def test_pairs_are_bounded_and_evicted_lru_on_the_sending_side(receivers) -> None:  # type: ignore[no-untyped-def]
    rxs = [receivers() for _ in range(3)]
    src = random_cache()
    sender = P2PSender("m", GlooBackend(), max_pairs=2)
    for i, rx in enumerate(rxs):
        sender.send(rx.endpoint, grant(rx.kv, TransferSpec(10 + i, [i], [i], f"r{i}")), src, 10)
    # Three destinations, room for two pairs: the least recently used (the first) was closed on both sides.
    assert sender.num_pairs == 2 and sender.counters.built == 3 and sender.counters.closed_idle == 1
    wait_until(lambda: rxs[0].num_pairs == 0)
    assert [rx.num_pairs for rx in rxs] == [0, 1, 1] and rxs[0].counters.closed_idle == 1
    # Using the second makes the third the least recent: sending to the first again evicts the third.
    sender.send(rxs[1].endpoint, grant(rxs[1].kv, TransferSpec(20, [4], [4], "again")), src, 10)
    spec = grant(rxs[0].kv, TransferSpec(21, [5], [5], "back"))
    sender.send(rxs[0].endpoint, spec, src, 10)
    assert_moved(src, rxs[0].kv, spec)
    wait_until(lambda: rxs[2].num_pairs == 0)
    assert [rx.num_pairs for rx in rxs] == [1, 1, 0] and sender.counters.built == 4
    sender.close()
    wait_until(lambda: sum(rx.num_pairs for rx in rxs) == 0)


def test_the_receiver_bounds_its_pairs_and_senders_rebuild(receivers) -> None:  # type: ignore[no-untyped-def]
    """A receiver over its bound closes its least recently used idle pair; that sender finds the control
    connection closed before its next transfer moves anything and rebuilds the pair, transparently."""
    rx = receivers(max_pairs=1)
    src = random_cache()
    a, b = P2PSender("m", GlooBackend()), P2PSender("m", GlooBackend())
    a.send(rx.endpoint, grant(rx.kv, TransferSpec(1, [0], [0], "a1")), src, 10)
    b.send(rx.endpoint, grant(rx.kv, TransferSpec(2, [1], [1], "b1")), src, 10)
    wait_until(lambda: rx.num_pairs == 1 and rx.counters.closed_idle == 1)
    spec = grant(rx.kv, TransferSpec(3, [2, 3], [2, 3], "a2"))
    a.send(rx.endpoint, spec, src, 10)
    assert_moved(src, rx.kv, spec)
    assert a.counters.built == 2 and a.counters.closed_idle == 1 and a.counters.aborted == 0
    assert rx.counters.built == 3


def test_deadline_aborts_the_pair_leaves_blocks_unstamped_and_the_next_transfer_rebuilds(receivers) -> None:  # type: ignore[no-untyped-def]
    """The prefill stalls after layer 0: the sender hits its deadline mid-transfer and aborts its communicator;
    the receiver, waiting for layer 1, hits the same deadline and aborts too; no destination block is stamped.
    The next transfer builds a new pair and arrives exactly."""
    rx = receivers()
    src = random_cache()
    sender = P2PSender("m", GlooBackend())
    sender.send(rx.endpoint, grant(rx.kv, TransferSpec(1, [0], [0], "warm")), src, 10)
    progress = LayerProgress()
    progress.layer_done(0, [1, 2])
    start = time.monotonic()
    with pytest.raises(TransferError, match="deadline"):
        sender.send(rx.endpoint, grant(rx.kv, TransferSpec(2, [1, 2], [8, 9], "stalled")), src, 0.5, progress)
    assert time.monotonic() - start < 1.5
    assert sender.counters.aborted == 1 and sender.num_pairs == 0
    wait_until(lambda: rx.counters.aborted == 1 and rx.num_pairs == 0)
    assert rx.kv.block_epochs[[8, 9]].tolist() == [0, 0]  # layer 0 may have landed; never committed
    spec = grant(rx.kv, TransferSpec(3, [1, 2], [8, 9], "retry"))
    sender.send(rx.endpoint, spec, src, 10)
    assert_moved(src, rx.kv, spec)
    assert sender.counters.built == 2 and rx.counters.built == 2


def test_a_receiver_that_goes_away_mid_transfer_fails_the_send_cleanly() -> None:
    """The decode process shuts down after layer 0 arrived: once the prefill produces the next layers, the send
    fails well before its deadline (the communicator's connection is gone) and the pair is dropped."""
    src = random_cache()
    sender = P2PSender("m", GlooBackend())
    progress = LayerProgress()
    errors: list[BaseException] = []
    with kv_peer(LAYOUT, f"/dev/shm/pdserve-test-{uuid.uuid4().hex}", transport="gloo") as endpoint:
        dst = open_peer(endpoint)
        sender.send(endpoint, grant(dst, TransferSpec(1, [0], [0], "warm")), src, 30)
        cut = grant(dst, TransferSpec(2, [0], [1], "cut"))  # open to it: only the receiver going away stops it

        def push() -> None:
            try:
                sender.send(endpoint, cut, src, 30, progress)
            except TransferError as e:
                errors.append(e)

        thread = threading.Thread(target=push)
        thread.start()
        progress.layer_done(0, [0])
        time.sleep(0.3)
    start = time.monotonic()  # the peer process has exited
    for layer in range(1, LAYOUT.num_layers):
        progress.layer_done(layer, [0])
    thread.join(timeout=20)
    assert not thread.is_alive() and len(errors) == 1 and time.monotonic() - start < 10
    assert sender.num_pairs == 0  # dropped (aborted mid-data, or found closed before any data moved)


def test_layer_pipelined_push_sends_each_layer_as_it_is_computed(receivers) -> None:  # type: ignore[no-untyped-def]
    rx = receivers()
    src = random_cache(seed=5)
    sender = P2PSender("m", GlooBackend())
    spec = grant(rx.kv, TransferSpec(epoch=9, src_block_ids=[3, 4, 5], dst_block_ids=[10, 1, 2], transfer_id="pipe"))
    progress, done = LayerProgress(), threading.Event()
    result: list[object] = []

    def send() -> None:
        result.append(sender.send(rx.endpoint, spec, src, 10, progress))
        done.set()

    thread = threading.Thread(target=send)
    thread.start()
    for layer in range(LAYOUT.num_layers):
        time.sleep(0.05)
        assert not done.is_set() and rx.kv.block_epochs[10] != 9  # waiting for this layer
        progress.layer_done(layer, [3, 4, 5])
    thread.join(timeout=10)
    assert_moved(src, rx.kv, spec)
    assert len(result[0].layer_seconds) == LAYOUT.num_layers  # type: ignore[attr-defined]


def test_concurrent_transfers_share_a_pair_one_at_a_time(receivers) -> None:  # type: ignore[no-untyped-def]
    rx = receivers()
    src = random_cache(seed=2)
    sender = P2PSender("m", GlooBackend())
    specs = [grant(rx.kv, TransferSpec(30 + i, [i], [i], f"c{i}")) for i in range(8)]
    errors: list[BaseException] = []

    def push(spec: TransferSpec) -> None:
        try:
            sender.send(rx.endpoint, spec, src, 20)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=push, args=(s,)) for s in specs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors
    for spec in specs:
        assert_moved(src, rx.kv, spec)
    assert sender.counters.built == 1


def test_make_receiver_serves_gloo_and_refuses_gpu_transports_for_host_memory() -> None:
    kv = KVCache(LAYOUT)
    rx = make_receiver("gloo", kv, "m", "node-a", host="0.0.0.0", advertise_host="10.1.2.3")
    assert rx.endpoint.transports == ("gloo",) and str(rx.endpoint.p2p_address).startswith("10.1.2.3:")
    rx.close()
    with pytest.raises(ValueError, match="advertise_host"):
        make_receiver("gloo", kv, "m", "node-a", host="0.0.0.0")


def test_a_gloo_endpoint_unreachable_fails_within_the_deadline() -> None:
    with socket.create_server(("127.0.0.1", 0)) as hung:  # accepts into its backlog, never answers
        address = f"127.0.0.1:{hung.getsockname()[1]}"
        endpoint = KVEndpoint("node-b", layout_spec(LAYOUT, "m"), 16, "id", p2p_address=address, p2p_backend="gloo")
        start = time.monotonic()
        with pytest.raises(TransferError, match=r"deadline|timed out"):
            P2PSender("m", GlooBackend()).send(endpoint, TransferSpec(1, [0], [0], "r"), random_cache(), 1)
        assert time.monotonic() - start < 2


def test_serve_config_refuses_a_transport_that_cannot_move_the_devices_kv() -> None:
    from pydantic import ValidationError

    from pdserve.serve.config import ServeConfig

    with pytest.raises(ValidationError, match="kv_transport tcp cannot move KV on cuda: use auto, nccl, cuda_ipc"):
        ServeConfig(model="m", device="cuda", kv_transport="tcp")
    with pytest.raises(ValidationError, match="kv_transport nccl cannot move KV on cpu: use auto, shm, tcp, gloo"):
        ServeConfig(model="m", device="cpu", kv_transport="nccl")
    with pytest.raises(ValidationError, match="kv_transport nccl cannot move KV on cpu"):  # auto, on no GPU: cpu
        ServeConfig(model="m", kv_transport="nccl").with_device(num_gpus=0)
    assert ServeConfig(model="m", device="cuda", kv_transport="nccl", kv_max_pairs=2).kv_max_pairs == 2


def test_an_idle_pair_outlives_the_handshake_timeout(receivers, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import pdserve.transfer.p2p as p2p

    monkeypatch.setattr(p2p, "HANDSHAKE_TIMEOUT_S", 0.3)
    rx = receivers()
    src = random_cache()
    sender = P2PSender("m", GlooBackend())
    sender.send(rx.endpoint, grant(rx.kv, TransferSpec(1, [0], [0], "a")), src, 10)
    time.sleep(0.8)  # idle for longer than the handshake may take
    spec = grant(rx.kv, TransferSpec(2, [1], [1], "b"))
    sender.send(rx.endpoint, spec, src, 10)
    assert_moved(src, rx.kv, spec)
    assert sender.counters.built == 1 and rx.counters == p2p.PairCounters(built=1)


def test_closing_the_receiver_mid_transfer_stops_every_write(receivers) -> None:  # type: ignore[no-untyped-def]
    """close() aborts the pair's communicator: the transfer waiting on it fails at once and its blocks are never
    written or stamped, even when the rest of the layers come afterwards."""
    rx = receivers()
    src = random_cache()
    sender = P2PSender("m", GlooBackend())
    sender.send(rx.endpoint, grant(rx.kv, TransferSpec(1, [0], [0], "warm")), src, 10)
    progress, errors = LayerProgress(), []
    progress.layer_done(0, [5])
    cut = grant(rx.kv, TransferSpec(7, [5], [9], "cut"))  # open to it: only close() stops its later layers

    def push() -> None:
        try:
            sender.send(rx.endpoint, cut, src, 20, progress)
        except TransferError as e:
            errors.append(e)

    thread = threading.Thread(target=push)
    thread.start()
    wait_until(lambda: rx.kv.k[0][9].abs().sum() > 0)  # layer 0 landed: the receiver waits for layer 1
    start = time.monotonic()
    rx.close()
    assert time.monotonic() - start < 2
    for layer in range(1, LAYOUT.num_layers):
        progress.layer_done(layer, [5])
    thread.join(timeout=10)
    assert len(errors) == 1 and rx.kv.block_epochs[9] == 0 and rx.kv.k[2][9].abs().sum() == 0


def test_closing_the_sender_closes_a_busy_pair_when_its_transfer_ends(receivers) -> None:  # type: ignore[no-untyped-def]
    rx = receivers()
    src = random_cache()
    sender = P2PSender("m", GlooBackend())
    progress = LayerProgress()
    progress.layer_done(0, [1])
    spec = grant(rx.kv, TransferSpec(2, [1], [1], "busy"))
    thread = threading.Thread(target=lambda: sender.send(rx.endpoint, spec, src, 10, progress))
    thread.start()
    wait_until(lambda: rx.num_pairs == 1)
    sender.close()
    for layer in range(1, LAYOUT.num_layers):
        progress.layer_done(layer, [1])
    thread.join(timeout=10)
    assert_moved(src, rx.kv, spec)  # the transfer in flight completes
    wait_until(lambda: rx.num_pairs == 0)  # then its pair is closed on both sides
    with pytest.raises(TransferError, match="closed"):
        sender.send(rx.endpoint, grant(rx.kv, TransferSpec(3, [2], [2], "late")), src, 10)


def test_a_receiver_at_its_bound_with_every_pair_busy_keeps_the_new_one(receivers) -> None:  # type: ignore[no-untyped-def]
    rx = receivers(max_pairs=1)
    src = random_cache()
    a, b = P2PSender("m", GlooBackend()), P2PSender("m", GlooBackend())
    a.send(rx.endpoint, grant(rx.kv, TransferSpec(1, [0], [0], "a1")), src, 10)
    progress = LayerProgress()
    progress.layer_done(0, [1])
    busy = grant(rx.kv, TransferSpec(2, [1], [1], "a2"))
    thread = threading.Thread(target=lambda: a.send(rx.endpoint, busy, src, 10, progress))
    thread.start()
    wait_until(lambda: rx.kv.k[0][1].abs().sum() > 0)  # a's pair is mid-transfer
    spec = grant(rx.kv, TransferSpec(3, [2], [2], "b"))
    b.send(rx.endpoint, spec, src, 10)  # over the bound, but the only idle pair is the one just built
    assert_moved(src, rx.kv, spec)
    for layer in range(1, LAYOUT.num_layers):
        progress.layer_done(layer, [1])
    thread.join(timeout=10)
    assert_moved(src, rx.kv, busy)


def test_the_gloo_rendezvous_listens_on_the_control_links_interface_only() -> None:
    """The pair's TCPStore listened on every interface, whatever `kv_host` said: anyone reaching the node could
    list and rewrite the pair's rendezvous keys (found in review). It listens where the control link does now."""
    import json

    rendezvous = GlooBackend().root("127.0.0.1", torch.device("cpu"))
    port = f"{json.loads(rendezvous.unique_id)['port']:04X}"
    listening = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            rows = [line.split() for line in f.read().splitlines()[1:]]
        listening += [row[1] for row in rows if row[3] == "0A" and row[1].endswith(f":{port}")]
    assert listening == [f"0100007F:{port}"], listening
