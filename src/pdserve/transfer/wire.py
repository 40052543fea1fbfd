"""The TCP transport's wire protocol and socket helpers. Little-endian. Once per connection, the handshake:

    sender -> receiver   HELLO (magic, version, JSON length) + JSON {"cache_id", "spec": KVLayoutSpec fields}
    receiver -> sender   REPLY (status 0 = ok, message length) + message naming whatever does not match

Then per transfer, for each layer 0..num_layers-1 in order:

    sender -> receiver   LAYER (epoch, remaining seconds, layer, num_blocks, K payload bytes)
                         + destination block ids (int64) + K payload + V payload (raw bytes, blocks in dst-id order)

and after the last layer the receiver stamps the epoch on the blocks and sends a REPLY, so the sender returns only
once the blocks are complete. The receiver times the transfer from the first header's remaining seconds (the two
machines share no clock) and drops it, unstamped, if a layer would start after that.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import time
from dataclasses import asdict
from typing import NamedTuple

import torch

from pdserve.transfer.base import Deadline, KVLayoutSpec, TransferError

HELLO = struct.Struct("<4sHI")
REPLY = struct.Struct("<BI")
LAYER = struct.Struct("<qdiiq")
MAGIC, VERSION = b"PDKV", 1
MAX_MESSAGE_BYTES = 1 << 16  # hello and reply texts


class LayerHeader(NamedTuple):
    epoch: int
    remaining_s: float  # of the sender's deadline when it sent this header
    layer: int
    num_blocks: int
    num_payload_bytes: int  # of K; V has as many


def hello(cache_id: str, spec: KVLayoutSpec) -> bytes:
    text = json.dumps({"cache_id": cache_id, "spec": asdict(spec)}).encode()
    return HELLO.pack(MAGIC, VERSION, len(text)) + text


def expect_ok(conn: socket.socket, deadline: Deadline, what: str) -> None:
    conn.settimeout(deadline.remaining_s(what))
    status, size = REPLY.unpack(recv_bytes(conn, REPLY.size))
    if size > MAX_MESSAGE_BYTES:
        raise TransferError(f"oversized reply during {what}")
    message = recv_bytes(conn, size).decode(errors="replace")
    if status != 0:
        raise TransferError(f"the decode replica refused it: {message}")


def send_reply(conn: socket.socket, problem: str) -> None:
    message = problem.encode()[:MAX_MESSAGE_BYTES]
    conn.sendall(REPLY.pack(1 if problem else 0, len(message)) + message)


def as_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous tensor, any dtype (bf16 included), without a copy."""
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
