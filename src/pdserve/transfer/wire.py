"""The TCP transport's wire protocol and socket helpers. Little-endian. Once per connection, the handshake:

    receiver -> sender   CHALLENGE (magic, 32 random bytes: a nonce)
    sender -> receiver   HELLO (magic, version, JSON length) + JSON {"cache_id", "spec": KVLayoutSpec fields,
                         "proof": HMAC-SHA256(cluster secret, nonce + cache id)}
    receiver -> sender   REPLY (status 0 = ok, message length) + message naming whatever does not match

The proof shows the sender holds the cluster's secret without sending it; a fresh nonce per connection makes a
recorded hello useless. The secret (`cluster_secret`) is the same on every replica of a cluster: PDSERVE_KV_SECRET,
or one the replicas share through Ray's internal KV store (`set_cluster_secret`).

Then per transfer, for each layer 0..num_layers-1 in order:

    sender -> receiver   LAYER (epoch, remaining seconds, layer, num_blocks, K payload bytes)
                         + destination block ids (int64) + K payload + V payload (raw bytes, blocks in dst-id order)

and after the last layer the receiver stamps the epoch on the blocks and sends a REPLY, so the sender returns only
once the blocks are complete. The receiver times the transfer from the first header's remaining seconds (the two
machines share no clock) and drops it, unstamped, if a layer would start after that.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import math
import os
import secrets
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:  # imported where used: the ingress imports this module (the cluster's secret), not torch
    import torch

from pdserve.transfer.base import Deadline, KVLayoutSpec, TransferError, check_compatible

CHALLENGE = struct.Struct("<4s32s")
HELLO = struct.Struct("<4sHI")
REPLY = struct.Struct("<BI")
LAYER = struct.Struct("<qdiiq")
MAGIC, VERSION = b"PDKV", 3  # 3: the receiver proves the secret too
MAX_PEER_SECONDS = 600.0  # the longest deadline a peer may ask for (a transfer's time budget)
MAX_CONNECTIONS = 64  # per listener: each connection has a thread and a scratch buffer
ACCEPT_RETRY_S = 0.1  # after a failed accept (out of file descriptors): the listener waits, then accepts again
MAX_MESSAGE_BYTES = 1 << 16  # hello and reply texts
LENGTH = struct.Struct("<I")
MAX_JSON_BYTES = 1 << 24  # control messages (a transfer lists its block ids)
WILDCARDS = ("", "0.0.0.0", "::")
logger = logging.getLogger(__name__)


class LayerHeader(NamedTuple):
    epoch: int
    remaining_s: float  # of the sender's deadline when it sent this header
    layer: int
    num_blocks: int
    num_payload_bytes: int  # of K; V has as many


_process_secret: bytes | None = None


def set_cluster_secret(secret: bytes) -> None:
    """The secret this process proves (as a sender) and checks (as a receiver) in every handshake."""
    global _process_secret
    _process_secret = secret


MIN_SECRET_CHARS = 16


def configured_secret() -> bytes | None:
    """PDSERVE_KV_SECRET, when set; a ValueError when it is too short to resist guessing (an HMAC key of a few
    characters falls to an offline search over one recorded handshake)."""
    env = os.environ.get("PDSERVE_KV_SECRET")
    if not env:
        return None
    if len(env) < MIN_SECRET_CHARS:
        raise ValueError(
            f"PDSERVE_KV_SECRET must have at least {MIN_SECRET_CHARS} characters (e.g. `openssl rand -hex 32`)"
        )
    return env.encode()


def cluster_secret() -> bytes:
    """PDSERVE_KV_SECRET if set, else what `set_cluster_secret` set, else a secret of this process alone (its
    transfers work within the process; another process must share one of the first two)."""
    global _process_secret
    if env := configured_secret():
        return env
    if _process_secret is None:
        _process_secret = secrets.token_bytes(32)
    return _process_secret


def _proof(secret: bytes, nonce: bytes, cache_id: str) -> str:
    return hmac.new(secret, nonce + cache_id.encode(), hashlib.sha256).hexdigest()


def _receiver_proof(secret: bytes, nonce: bytes, cache_id: str) -> str:
    """What a receiver answers to the sender's nonce: its own proof (another message than a sender's, so that
    neither side's proof can be played back as the other's)."""
    return hmac.new(secret, b"pdserve-kv-receiver" + nonce + cache_id.encode(), hashlib.sha256).hexdigest()


def _is_proof(value: object, expected: str) -> bool:
    return isinstance(value, str) and value.isascii() and hmac.compare_digest(value, expected)


def peer_seconds(value: object, what: str) -> float:
    """A duration a peer sent: a finite number of seconds in (0, MAX_PEER_SECONDS]; TransferError otherwise (a NaN
    deadline would never pass: no fence, no timeout)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise TransferError(f"{what} is not a finite number of seconds")
    if not 0 < value <= MAX_PEER_SECONDS:
        raise TransferError(f"{what} must lie in (0, {MAX_PEER_SECONDS:.0f}] seconds")
    return float(value)


def handshake(conn: socket.socket, cache_id: str, spec: KVLayoutSpec, deadline: Deadline, magic: bytes = MAGIC,
              **extra: str) -> None:  # fmt: skip
    """The sender's side of the handshake: read the receiver's nonce, send the proof and a nonce of its own, and
    return once the receiver accepted — having proven the cluster secret too, so that no listener without it (at a
    dead replica's reused port, say) is sent a byte of KV, which encodes prompts."""
    got_magic, nonce = CHALLENGE.unpack(recv_bytes(conn, CHALLENGE.size, deadline.at))
    if got_magic != magic:
        raise TransferError("the peer is not a pdserve KV receiver of this transport")
    proof, own_nonce = _proof(cluster_secret(), nonce, cache_id), secrets.token_bytes(32)
    fields = {"cache_id": cache_id, "spec": asdict(spec), "proof": proof, "nonce": own_nonce.hex(), **extra}
    text = json.dumps(fields).encode()
    conn.sendall(HELLO.pack(magic, VERSION, len(text)) + text)
    status, size = REPLY.unpack(recv_bytes(conn, REPLY.size, deadline.at))
    if size > MAX_MESSAGE_BYTES:
        raise TransferError("oversized reply during the handshake")
    message = recv_bytes(conn, size, deadline.at).decode(errors="replace")
    if status != 0:
        raise TransferError(f"the decode replica refused it: {message}")
    if not _is_proof(message, _receiver_proof(cluster_secret(), own_nonce, cache_id)):
        raise TransferError("the receiver could not prove the cluster secret: not a replica of this cluster")


def accept_hello(
    conn: socket.socket, cache_id: str, local: KVLayoutSpec, timeout_s: float, magic: bytes = MAGIC,
    proven: Callable[[], bool] | None = None, **expect: str,
) -> dict[str, Any]:  # fmt: skip
    """The receiver's side of the handshake: send a nonce, read the hello, reply, and return its fields;
    TransferError (after replying why) if the peer cannot prove the cluster secret, may not write into cache
    `cache_id` of layout `local`, or any field named in `expect` differs. The whole handshake has `timeout_s` (a
    peer trickling its hello a byte at a time cannot hold a connection slot), only a peer that proved the secret
    learns why it was refused, and an accepting reply proves the secret back to the sender (`handshake`).
    `proven`: told before that reply (the listener's slot becomes a proven peer's); False: the slot was given to
    another connection meanwhile, and this one ends (TransferError)."""
    deadline_at = time.monotonic() + timeout_s
    conn.settimeout(timeout_s)
    nonce = secrets.token_bytes(32)
    conn.sendall(CHALLENGE.pack(magic, nonce))
    got_magic, version, size = HELLO.unpack(recv_bytes(conn, HELLO.size, deadline_at))
    if got_magic != magic or version != VERSION or size > MAX_MESSAGE_BYTES:
        raise TransferError("a peer that is not a pdserve KV sender of this transport and version connected")
    fields, problem = _refusal(recv_bytes(conn, size, deadline_at), cache_id, local)
    claimed = fields.get("cache_id")
    if not (isinstance(claimed, str) and _is_proof(fields.get("proof"), _proof(cluster_secret(), nonce, claimed))):
        problem = "the sender could not prove the cluster secret (PDSERVE_KV_SECRET differs?)"  # and nothing more
    sender_nonce = _nonce(fields.get("nonce"))
    if not problem and sender_nonce is None:
        problem = "malformed hello (no nonce)"
    mismatched = [f"{k}: {fields.get(k)!r} != {v!r}" for k, v in expect.items() if fields.get(k) != v]
    if fields and not problem and mismatched:
        problem = "mismatched " + "; ".join(mismatched)
    if problem or sender_nonce is None:
        send_reply(conn, problem)
        raise TransferError(f"refused a KV sender: {problem}")
    if proven is not None and not proven():
        raise TransferError("a connection in its handshake was cut to make room for a newer one")
    conn.sendall(REPLY.pack(0, 64) + _receiver_proof(cluster_secret(), sender_nonce, cache_id).encode())
    return fields


def _nonce(value: object) -> bytes | None:
    if not (isinstance(value, str) and value.isascii() and len(value) == 64):
        return None
    try:
        return bytes.fromhex(value)
    except ValueError:
        return None


def _refusal(hello: bytes, cache_id: str, local: KVLayoutSpec) -> tuple[dict[str, Any], str]:
    """The hello's fields, and why this sender may not write here (empty when it may)."""
    try:
        fields = json.loads(hello)
        remote_cache_id, spec = fields["cache_id"], KVLayoutSpec(**fields["spec"])
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        return {}, f"malformed hello ({e})"
    if remote_cache_id != cache_id:
        return fields, f"this receiver holds KV cache {cache_id}, not {remote_cache_id} (a stale endpoint?)"
    try:
        check_compatible(spec, local)
    except TransferError as e:
        return fields, str(e)
    return fields, ""


def send_json(conn: socket.socket, message: dict[str, Any]) -> None:
    text = json.dumps(message).encode()
    conn.sendall(LENGTH.pack(len(text)) + text)


def recv_json(conn: socket.socket, deadline_at: float | None = None) -> dict[str, Any] | None:
    """The next message; None if the peer closed the connection before it began."""
    raw = bytearray(LENGTH.size)
    num_read = recv_into(conn, memoryview(raw), deadline_at)
    if num_read == 0:
        return None
    if num_read < LENGTH.size:
        raise TransferError("connection closed mid-message")
    (size,) = LENGTH.unpack(raw)
    if size > MAX_JSON_BYTES:
        raise TransferError(f"oversized control message ({size} bytes)")
    message: dict[str, Any] = json.loads(recv_bytes(conn, size, deadline_at))
    return message


def expect_ok(conn: socket.socket, deadline: Deadline, what: str) -> None:
    problem = read_reply(conn, deadline, what)
    if problem is not True:
        raise TransferError(f"the decode replica refused it: {problem}")


def read_reply(conn: socket.socket, deadline: Deadline, what: str) -> str | bool:
    """True for an ok reply, else the peer's reason. TransferError if none came in time or it was malformed."""
    conn.settimeout(deadline.remaining_s(what))
    status, size = REPLY.unpack(recv_bytes(conn, REPLY.size, deadline.at))  # one deadline for the whole reply
    if size > MAX_MESSAGE_BYTES:
        raise TransferError(f"oversized reply during {what}")
    message = recv_bytes(conn, size, deadline.at).decode(errors="replace")
    return True if status == 0 else message


def send_reply(conn: socket.socket, problem: str) -> None:
    message = problem.encode()[:MAX_MESSAGE_BYTES]
    conn.sendall(REPLY.pack(1 if problem else 0, len(message)) + message)


def as_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous tensor, any dtype (bf16 included), without a copy."""
    import torch

    assert t.is_contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().data


def recv_into(conn: socket.socket, view: memoryview, deadline_at: float | None = None) -> int:
    """Fill `view`; returns the bytes received, fewer only if the peer closed. `deadline_at`: time.monotonic()."""
    received = 0
    while received < len(view):
        if deadline_at is not None:
            left_s = deadline_at - time.monotonic()
            if left_s <= 0:
                raise TransferError("the transfer's deadline passed mid-message")
            conn.settimeout(left_s)
        n = conn.recv_into(view[received:])
        if n == 0:
            break
        received += n
    return received


def recv_exact(conn: socket.socket, view: memoryview, deadline_at: float | None = None) -> None:
    if recv_into(conn, view, deadline_at) != len(view):
        raise TransferError("connection closed mid-message")


def recv_bytes(conn: socket.socket, size: int, deadline_at: float | None = None) -> bytes:
    buffer = bytearray(size)
    recv_exact(conn, memoryview(buffer), deadline_at)
    return bytes(buffer)


def tune(conn: socket.socket) -> None:
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # the header and the ack must not wait
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)  # pooled idle connections to a vanished peer end
    # Kernel buffer sizes stay autotuned: fixing them measured no faster on loopback, and on a stock kernel they
    # would be capped at net.core.[rw]mem_max (often 208 KiB), below what autotuning reaches.


def shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already closed or never connected: nothing left to wake
        sock.shutdown(socket.SHUT_RDWR)


def split_address(address: str) -> tuple[str, int]:
    host, port = address.rsplit(":", 1)
    return host.strip("[]"), int(port)


def join_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Listener:
    """A TCP server: one thread accepts, one thread per connection runs `hello(conn, proven)` (the handshake: it
    raises unless the peer proved the cluster secret, and calls `proven()` before it accepts the peer: False says
    its slot was taken, see below), then `serve(conn)` (the connection is closed when it returns).
    `close()` stops accepting and cuts every connection; once it returns no `serve` runs.

    At most `max_connections` are open. When they are, a new connection takes the slot of the oldest one still in
    its handshake, and is refused only when every slot holds a proven peer: anyone who can reach the port could
    otherwise hold every slot with connections that never finish a handshake (each for its timeout, over and over)
    and lock every sender out (found in review)."""

    def __init__(
        self, host: str, port: int, hello: Callable[[socket.socket, Callable[[], bool]], object],
        serve: Callable[[socket.socket], None], name: str, max_connections: int = MAX_CONNECTIONS,
    ) -> None:  # fmt: skip
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._server = socket.create_server((host, port), family=family, backlog=128)
        self.port: int = self._server.getsockname()[1]
        self._hello, self._serve, self._name, self.max_connections = hello, serve, name, max_connections
        self.num_refused = 0  # connections that failed the handshake or broke the protocol, and those over the cap
        self.num_evicted = 0  # connections cut in their handshake to make room for a newer one
        self._conns: dict[socket.socket, threading.Thread] = {}  # open connections and their threads
        self._unproven: dict[socket.socket, None] = {}  # of those, the ones in their handshake, oldest first
        self._lock = threading.Lock()  # guards _conns, _unproven and is_closed
        self.is_closed = False
        self._accepter = threading.Thread(target=self._accept, name=f"{name}-accept", daemon=True)
        self._accepter.start()

    def close(self, join_timeout_s: float = 5.0) -> None:
        with self._lock:
            self.is_closed = True
            conns = dict(self._conns)
        shutdown(self._server)  # wakes the thread blocked in accept()
        self._server.close()
        for conn in conns:
            shutdown(conn)  # wakes its thread blocked in recv()
        for thread in [self._accepter, *conns.values()]:
            thread.join(timeout=join_timeout_s)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError as e:
                if self.is_closed:
                    return
                # Out of file descriptors or buffers (EMFILE, ENFILE, ENOBUFS): this connection is lost, not the
                # listener — its replica stays advertised, and senders would wait out their deadlines on a port
                # nobody accepts on.
                logger.warning("%s: accept failed, retrying: %s", self._name, e)
                time.sleep(ACCEPT_RETRY_S)
                continue
            try:
                tune(conn)
            except OSError:  # reset before it was tuned
                conn.close()
                continue
            thread = threading.Thread(target=self._run, args=(conn,), name=self._name, daemon=True)
            with self._lock:
                if self.is_closed:
                    conn.close()
                    return
                is_full = len(self._conns) >= self.max_connections
                if is_full and not self._unproven:  # every slot holds a proven peer
                    self.num_refused += 1
                    conn.close()
                    continue
                try:
                    thread.start()  # under the lock: close() never joins a thread not yet started
                except RuntimeError as e:  # "can't start new thread": refuse this one, keep accepting
                    self.num_refused += 1
                    conn.close()
                    logger.warning("%s: no thread for a connection: %s", self._name, e)
                    continue
                if is_full:  # its slot: the oldest one still in its handshake (only now that it surely runs)
                    self._evict_oldest_unproven()
                self._conns[conn] = thread
                self._unproven[conn] = None

    def _evict_oldest_unproven(self) -> None:
        """Cut the oldest connection still in its handshake (its thread ends at once on the dead socket) and free
        its slot now. Under the lock."""
        oldest = next(iter(self._unproven))
        del self._unproven[oldest]
        del self._conns[oldest]
        self.num_evicted += 1
        shutdown(oldest)

    def _prove(self, conn: socket.socket) -> bool:
        """`conn`'s peer proved the secret: its slot is no longer anyone's to take (False: it was taken already)."""
        with self._lock:
            if conn not in self._unproven:
                return False
            del self._unproven[conn]
            return True

    def _run(self, conn: socket.socket) -> None:
        try:
            self._hello(conn, partial(self._prove, conn))
            if not self.is_closed:
                self._serve(conn)
        except (OSError, TransferError) as e:
            if not self.is_closed:
                with self._lock:  # (one evicted was counted as such)
                    self.num_refused += isinstance(e, TransferError) and conn in self._conns
                logger.warning("%s: connection closed: %s", self._name, e)
        except Exception:  # whatever a peer sent, the listener lives on
            with self._lock:
                self.num_refused += conn in self._conns
            logger.exception("%s: connection failed", self._name)
        finally:
            with self._lock:
                self._conns.pop(conn, None)
                self._unproven.pop(conn, None)
            conn.close()
