"""The KV data plane against a hostile peer: forged, replayed, oversized and NaN-carrying messages sent by hand to
a real TCP receiver (and the P2P receiver's control channel). Nothing is written, each refusal is counted, and the
receiver goes on serving honest senders."""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
import struct
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict

import pytest
import torch

from kv_peer import grant
from pdserve.kvcache import KVCache, KVLayout
from pdserve.transfer import TcpReceiver, TcpSender, TransferError, TransferSpec, wire

LAYOUT = KVLayout(2, 16, 4, 2, 8, torch.float32)
BLOCK_BYTES = 4 * 2 * 8 * 4


@pytest.fixture
def rx() -> Iterator[TcpReceiver]:
    kv = KVCache(LAYOUT)
    receiver = TcpReceiver(kv, node_id="n", model_id="m")
    yield receiver
    receiver.close()


def _address(rx: TcpReceiver) -> tuple[str, int]:
    return wire.split_address(str(rx.endpoint.tcp_address))


def _hello_bytes(rx: TcpReceiver, challenge: bytes, secret: bytes, **override: object) -> bytes:
    proof = hmac.new(secret, challenge + rx.cache_id.encode(), hashlib.sha256).hexdigest()
    fields = {"cache_id": rx.cache_id, "spec": asdict(rx.spec), "proof": proof, "nonce": "ab" * 32, **override}
    text = json.dumps(fields).encode()
    return wire.HELLO.pack(wire.MAGIC, wire.VERSION, len(text)) + text


def _reply(conn: socket.socket) -> str | bool:
    try:
        return wire.read_reply(conn, wire.Deadline(5), "the handshake")
    except (TransferError, ConnectionError, struct.error):
        return "hung up"


def _refused(rx: TcpReceiver, want: int) -> int:
    """The receiver's refusal count once it reaches `want` (its thread counts just after hanging up)."""
    deadline = time.monotonic() + 5
    while rx.num_refused < want and time.monotonic() < deadline:
        time.sleep(0.01)
    return rx.num_refused


def _untouched(rx: TcpReceiver) -> bool:
    return bool(rx.kv.flat.abs().sum() == 0 and rx.kv.block_epochs.sum() == 0)


def _honest_send_works(rx: TcpReceiver) -> None:
    src = KVCache(LAYOUT)
    src.flat.normal_()
    spec = grant(rx.kv, TransferSpec(77, [1], [5], f"ok-{uuid.uuid4().hex}"))
    TcpSender("m").send(rx.endpoint, spec, src, timeout_s=5)
    assert torch.equal(rx.kv.k[1][5], src.k[1][1])
    rx.kv.flat.zero_()
    rx.kv.block_epochs.zero_()


def test_a_hello_without_the_secret_is_refused(rx: TcpReceiver) -> None:
    for secret in (b"a guess", b""):
        with socket.create_connection(_address(rx), timeout=5) as conn:
            _, nonce = wire.CHALLENGE.unpack(wire.recv_bytes(conn, wire.CHALLENGE.size))
            conn.sendall(_hello_bytes(rx, nonce, secret))
            assert "could not prove the cluster secret" in str(_reply(conn))
    with socket.create_connection(_address(rx), timeout=5) as conn:  # no proof at all
        _, nonce = wire.CHALLENGE.unpack(wire.recv_bytes(conn, wire.CHALLENGE.size))
        conn.sendall(_hello_bytes(rx, nonce, wire.cluster_secret(), proof=None))
        assert "could not prove" in str(_reply(conn))
    assert _refused(rx, 3) == 3 and _untouched(rx)
    _honest_send_works(rx)


def test_a_peer_without_the_secret_learns_nothing_and_a_bad_proof_is_refused_cleanly(rx: TcpReceiver) -> None:
    """Only a peer that proved the secret hears why it was refused: a guess naming another cache hears nothing of
    this one's id or layout. A proof that is not ASCII (hmac.compare_digest raised on it) is refused, not a crash."""
    for override in ({"cache_id": "guess"}, {"proof": "\u00e9" * 64}, {"nonce": "zz"}):
        with socket.create_connection(_address(rx), timeout=5) as conn:
            _, nonce = wire.CHALLENGE.unpack(wire.recv_bytes(conn, wire.CHALLENGE.size))
            secret = wire.cluster_secret() if "nonce" in override else b"a guess"
            conn.sendall(_hello_bytes(rx, nonce, secret, **override))
            reply = str(_reply(conn))
        assert reply != "hung up" and rx.cache_id not in reply and "layout" not in reply, (override, reply)
    assert _refused(rx, 3) == 3 and _untouched(rx)
    _honest_send_works(rx)


@pytest.mark.parametrize("answer", ["nothing", "a sender's proof"])
def test_a_listener_without_the_secret_is_sent_no_kv(rx: TcpReceiver, answer: str) -> None:
    """A listener at a decode replica's address that does not know the secret (a dead replica's port reused, a
    spoofed endpoint) accepts every hello: the sender asks it to prove the secret first, and sends it no KV byte.
    "a sender's proof": what a reflection yields (the sender's own nonce sent as the challenge of a second connection
    of the same sender, whose answer is played back here); a receiver's proof is another message than a sender's, so
    it proves nothing (equal, the sender sent its KV: 1104 bytes)."""
    import dataclasses
    import json
    import threading

    received_after_hello: list[int] = []
    listener = socket.create_server(("127.0.0.1", 0))

    def rogue() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.sendall(wire.CHALLENGE.pack(wire.MAGIC, b"\x00" * 32))
            _, _, size = wire.HELLO.unpack(wire.recv_bytes(conn, wire.HELLO.size))
            hello = json.loads(wire.recv_bytes(conn, size))
            if answer == "nothing":
                conn.sendall(wire.REPLY.pack(0, 0))  # "ok", with nothing to show for it
            else:
                reflected = wire._proof(wire.cluster_secret(), bytes.fromhex(hello["nonce"]), hello["cache_id"])
                conn.sendall(wire.REPLY.pack(0, 64) + reflected.encode())
            received, chunk = 0, b"x"
            while chunk:
                chunk = conn.recv(1 << 16)
                received += len(chunk)
            received_after_hello.append(received)

    thread = threading.Thread(target=rogue, daemon=True)
    thread.start()
    endpoint = dataclasses.replace(rx.endpoint, tcp_address=f"127.0.0.1:{listener.getsockname()[1]}")
    src = KVCache(LAYOUT)
    src.flat.normal_()
    with pytest.raises(TransferError, match="could not prove the cluster secret"):
        TcpSender("m").send(endpoint, TransferSpec(77, [1], [5], "r"), src, timeout_s=5)
    thread.join(5)
    listener.close()
    assert received_after_hello == [0]


def test_a_hello_trickled_byte_by_byte_loses_its_slot_at_the_handshake_timeout(
    rx: TcpReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A peer sending its hello a byte at a time, each within the socket timeout, is cut off once the handshake's
    whole time is up (it held a connection slot for days: 64 of them locked every sender out)."""
    from pdserve.transfer import tcp

    monkeypatch.setattr(tcp, "_HANDSHAKE_TIMEOUT_S", 1.0)
    with socket.create_connection(_address(rx), timeout=5) as conn:
        wire.recv_bytes(conn, wire.CHALLENGE.size)
        hello = _hello_bytes(rx, b"\x00" * 32, b"a guess")
        start = time.monotonic()
        cut_after = None
        for byte in hello:
            try:
                conn.sendall(bytes([byte]))
            except OSError:
                cut_after = time.monotonic() - start
                break
            time.sleep(0.2)  # each byte well within the socket timeout
        if cut_after is None:  # the hello went out whole: the peer must have hung up long before
            cut_after = time.monotonic() - start
    assert cut_after < 3.0, cut_after
    _honest_send_works(rx)


def test_a_recorded_hello_cannot_be_replayed(rx: TcpReceiver) -> None:
    with socket.create_connection(_address(rx), timeout=5) as conn:
        _, nonce = wire.CHALLENGE.unpack(wire.recv_bytes(conn, wire.CHALLENGE.size))
        recorded = _hello_bytes(rx, nonce, wire.cluster_secret())
        conn.sendall(recorded)
        assert _reply(conn) is True  # valid once, for its own nonce
    with socket.create_connection(_address(rx), timeout=5) as conn:
        wire.recv_bytes(conn, wire.CHALLENGE.size)  # a fresh nonce
        conn.sendall(recorded)
        assert "could not prove" in str(_reply(conn))
    assert _refused(rx, 1) == 1


@pytest.mark.parametrize(
    ("header", "why"),
    [
        ((3, float("nan"), 0, 1, BLOCK_BYTES), "NaN deadline: would never pass"),
        ((3, float("inf"), 0, 1, BLOCK_BYTES), "infinite deadline"),
        ((3, -1.0, 0, 1, BLOCK_BYTES), "negative deadline"),
        ((3, 1e9, 0, 1, BLOCK_BYTES), "a deadline of 30 years"),
        ((3, 5.0, 0, (1 << 31) - 1, BLOCK_BYTES * ((1 << 31) - 1)), "more blocks than the cache"),
        ((3, 5.0, 0, -1, -BLOCK_BYTES), "a negative block count"),
        ((3, 5.0, 0, 1, BLOCK_BYTES + 1), "a payload size that is not the blocks'"),
        ((3, 5.0, 1, 1, BLOCK_BYTES), "starting past layer 0"),
    ],
)
def test_bad_transfer_headers_write_nothing(rx: TcpReceiver, header: tuple[object, ...], why: str) -> None:
    grant(rx.kv, TransferSpec(3, [0], [2], "r"))  # block 2 open to epoch 3: only the header's flaw stops it
    with socket.create_connection(_address(rx), timeout=5) as conn:
        wire.handshake(conn, rx.cache_id, rx.spec, wire.Deadline(5))  # accepted (raises otherwise)
        payload = struct.pack("<q", 2) + b"\x01" * 2 * BLOCK_BYTES
        try:
            conn.sendall(wire.LAYER.pack(*header) + payload)
            answer = conn.recv(64)
        except ConnectionError:
            answer = b""
        assert answer == b"", why  # no ack: refused and hung up on
    deadline = time.monotonic() + 5
    while rx.num_refused + rx.num_fenced < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert rx.num_refused >= 1, why  # (a fenced write is refused too)
    assert _untouched(rx), why
    _honest_send_works(rx)


def test_a_transfer_for_an_epoch_no_reservation_holds_is_read_and_refused(rx: TcpReceiver) -> None:
    """Well-formed, but its epoch holds no reservation: read to its end into nothing and refused in the reply (the
    connection stays in step), counted as fenced, never as a refused peer; nothing is written."""
    grant(rx.kv, TransferSpec(3, [0], [2], "r"))  # block 2 open to epoch 3, not 999
    with socket.create_connection(_address(rx), timeout=5) as conn:
        wire.handshake(conn, rx.cache_id, rx.spec, wire.Deadline(5))
        ids = struct.pack("<q", 2)
        for layer in range(LAYOUT.num_layers):
            conn.sendall(wire.LAYER.pack(999, 5.0, layer, 1, BLOCK_BYTES) + ids + b"\x01" * 2 * BLOCK_BYTES)
        assert str(_reply(conn)).startswith("fenced: ")
    assert (rx.num_fenced, rx.num_refused) == (1, 0)
    assert _untouched(rx)
    _honest_send_works(rx)


def test_oversized_and_malformed_hellos(rx: TcpReceiver) -> None:
    cases = [
        wire.HELLO.pack(wire.MAGIC, wire.VERSION, 1 << 30),  # announces a 1 GiB hello
        wire.HELLO.pack(b"EVIL", wire.VERSION, 2) + b"{}",
        wire.HELLO.pack(wire.MAGIC, 1, 2) + b"{}",  # the version without proofs
        wire.HELLO.pack(wire.MAGIC, wire.VERSION, 9) + b"[1, 2, 3]",
        wire.HELLO.pack(wire.MAGIC, wire.VERSION, 4) + b"\xff\xfe{}",
    ]
    for message in cases:
        with socket.create_connection(_address(rx), timeout=5) as conn:
            wire.recv_bytes(conn, wire.CHALLENGE.size)
            conn.sendall(message)
            assert _reply(conn) is not True
    assert _refused(rx, len(cases)) == len(cases) and _untouched(rx)
    _honest_send_works(rx)


def _proven(rx: TcpReceiver) -> socket.socket:
    """A connection whose handshake proved the cluster secret, then idle (as a sender's pooled connection)."""
    conn = socket.create_connection(_address(rx), timeout=5)
    _, nonce = wire.CHALLENGE.unpack(wire.recv_bytes(conn, wire.CHALLENGE.size))
    conn.sendall(_hello_bytes(rx, nonce, wire.cluster_secret()))
    assert _reply(conn) is True
    return conn


def _unproven(rx: TcpReceiver) -> socket.socket:
    """A connection that took its challenge and never answers it (anyone who can reach the port)."""
    conn = socket.create_connection(_address(rx), timeout=5)
    wire.recv_bytes(conn, wire.CHALLENGE.size)  # accepted: it got its challenge
    return conn


def _is_cut(conn: socket.socket) -> bool:
    try:
        return conn.recv(64) == b""
    except ConnectionError:
        return True


def test_peers_in_their_handshake_cannot_hold_every_slot() -> None:
    """With every slot taken, a new connection takes the oldest unproven one's slot: connections that never finish
    a handshake held all 64 slots (each for the handshake's timeout, again and again) and locked every sender out
    (found in review). Only when every slot holds a proven peer is a new connection refused."""
    receivers = [TcpReceiver(KVCache(LAYOUT), node_id="n", model_id="m") for _ in range(2)]
    for receiver in receivers:
        receiver._listener.max_connections = 3
    first, second = receivers
    try:
        stalled = [_unproven(first) for _ in range(3)]  # every slot
        _honest_send_works(first)  # at once, in the oldest one's slot
        assert _is_cut(stalled[0]) and first._listener.num_evicted == 1

        stalled = [_unproven(second) for _ in range(3)]
        proven = []
        for i in range(3):  # each proven peer takes the oldest stalled one's slot, in turn
            proven.append(_proven(second))
            assert _is_cut(stalled[i]) and second._listener.num_evicted == i + 1
        with socket.create_connection(_address(second), timeout=5) as extra:  # every slot is a proven peer's
            assert _is_cut(extra)
        assert _refused(second, 1) == 1 and second._listener.num_evicted == 3
        proven[0].close()
        deadline = time.monotonic() + 5
        while True:  # its thread ends (the closed socket); then an honest sender fits
            try:
                _honest_send_works(second)
                break
            except TransferError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        for conn in [*stalled, *proven]:
            conn.close()
    finally:
        for receiver in receivers:
            receiver.close()


def test_peer_seconds() -> None:
    assert wire.peer_seconds(2, "x") == 2.0
    for bad in (float("nan"), float("inf"), 0, -3, 601, "5", None, True):
        with pytest.raises(TransferError):
            wire.peer_seconds(bad, "x")


def test_a_short_configured_secret_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """An HMAC key of a few characters falls to an offline search over one recorded handshake: refused where a
    replica reads it, with what to do instead; one long enough is the secret as given."""
    from pdserve.serve.cluster_store import shared_kv_secret

    monkeypatch.setenv("PDSERVE_KV_SECRET", "s3cret")
    for read in (wire.cluster_secret, shared_kv_secret):
        with pytest.raises(ValueError, match="at least 16 characters"):
            read()
    monkeypatch.setenv("PDSERVE_KV_SECRET", "0123456789abcdef")
    assert wire.cluster_secret() == shared_kv_secret() == b"0123456789abcdef"


def test_stored_exporter_headers_reach_only_replicas_exporting_where_they_were_given_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A deploy stored its exporter headers for the whole cluster, and a later deploy to another collector (or
    without headers) sent the first collector's credentials to its own endpoint (found in review): the headers are
    stored with the endpoints they came with, and applied only to replicas exporting there."""
    from ray.experimental import internal_kv

    from pdserve.serve import cluster_store

    kv: dict[object, object] = {}
    monkeypatch.setattr(internal_kv, "_internal_kv_initialized", lambda: True)
    monkeypatch.setattr(internal_kv, "_internal_kv_put", lambda k, v, overwrite, namespace: kv.__setitem__(k, v))
    monkeypatch.setattr(internal_kv, "_internal_kv_get", lambda k, namespace: kv.get(k))
    first = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector-a:4318"}
    cluster_store.publish_tracing_secrets(first, {"OTEL_EXPORTER_OTLP_HEADERS": "x-team=SECRET"})
    assert cluster_store.replica_tracing_env(first)["OTEL_EXPORTER_OTLP_HEADERS"] == "x-team=SECRET"
    other = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector-b:4318"}
    cluster_store.publish_tracing_secrets(other, {})  # a later deploy without headers: nothing stored
    assert cluster_store.replica_tracing_env(other) == other
