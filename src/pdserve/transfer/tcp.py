"""Cross-node transport over TCP: the decode replica runs a listener thread that writes arriving blocks straight
into its KV cache; the prefill replica keeps one connection per decode endpoint.

Wire format, per layer: a fixed header (epoch, layer, num_layers, num_blocks, bytes per K payload), the destination
block ids (int64), then K bytes and V bytes. After the last layer the receiver stamps the epochs and acks one byte,
so `send` returns only once the blocks are complete on the other side.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time

import torch

from pdserve.kvcache import KVCache
from pdserve.transfer.base import (
    KVEndpoint,
    KVReceiver,
    KVSender,
    TransferError,
    TransferSpec,
    TransferStats,
    check_compatible,
    layout_spec,
)

logger = logging.getLogger(__name__)
_HEADER = struct.Struct("<4sqiiiq")  # magic, epoch, layer, num_layers, num_blocks, payload bytes (K; V alike)
_MAGIC = b"PDKV"
_ACK = b"\x01"
_SOCKET_BUFFER_BYTES = 8 << 20  # large kernel buffers: loopback throughput ~3x the defaults


def _tune(conn: socket.socket) -> None:
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER_BYTES)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCKET_BUFFER_BYTES)


class TcpReceiver(KVReceiver):
    def __init__(self, kv: KVCache, node_id: str, spec_model_id: str, host: str = "127.0.0.1", port: int = 0) -> None:
        self.kv = kv
        self._server = socket.create_server((host, port))
        address = f"{host}:{self._server.getsockname()[1]}"
        spec = layout_spec(kv.layout, spec_model_id)
        self.endpoint = KVEndpoint(node_id, spec, kv.layout.num_blocks, kv.shared_path, address)
        self._closed = False
        threading.Thread(target=self._accept, name="pdserve-kv-accept", daemon=True).start()

    def close(self) -> None:
        self._closed = True
        self._server.close()
        self.kv.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            _tune(conn)
            threading.Thread(target=self._serve, args=(conn,), name="pdserve-kv-recv", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                while self._receive_layer(conn):
                    pass
            except (OSError, TransferError) as e:
                logger.warning("KV receive connection closed: %s", e)

    def _receive_layer(self, conn: socket.socket) -> bool:
        header = _recv_exact(conn, _HEADER.size)
        if header is None:
            return False
        magic, epoch, layer, num_layers, num_blocks, payload = _HEADER.unpack(header)
        if magic != _MAGIC or num_layers != self.kv.layout.num_layers:
            raise TransferError("bad KV transfer header")
        ids_bytes = _recv_exact(conn, 8 * num_blocks)
        assert ids_bytes is not None
        ids = torch.frombuffer(bytearray(ids_bytes), dtype=torch.int64)
        block_shape = (num_blocks, *self.kv.layout.block_shape)
        for cache in (self.kv.k[layer], self.kv.v[layer]):
            buffer = torch.empty(payload, dtype=torch.uint8)
            _recv_into(conn, buffer)
            cache.index_copy_(0, ids, buffer.view(cache.dtype).view(block_shape))
        if layer == num_layers - 1:
            self.kv.block_epochs[ids] = epoch
            conn.sendall(_ACK)
        return True


class TcpSender(KVSender):
    def __init__(self, model_id: str) -> None:
        self.model_id = model_id
        self._conns: dict[str, socket.socket] = {}
        self._lock = threading.Lock()  # one transfer at a time per sender keeps the per-connection stream ordered

    def send(self, endpoint: KVEndpoint, spec: TransferSpec, src: KVCache, timeout_s: float) -> TransferStats:
        start = time.perf_counter()
        check_compatible(layout_spec(src.layout, self.model_id), endpoint.spec)
        if endpoint.tcp_address is None:
            raise TransferError("the decode replica has no TCP receiver")
        with self._lock:
            try:
                conn = self._connect(endpoint.tcp_address, timeout_s)
                self._send_layers(conn, spec, src)
                conn.settimeout(max(timeout_s - (time.perf_counter() - start), 0.001))
                if _recv_exact(conn, 1) != _ACK:
                    raise TransferError("no acknowledgement from the decode replica")
            except (OSError, TransferError) as e:
                self._drop(endpoint.tcp_address)
                raise TransferError(f"KV transfer {spec.transfer_id} to {endpoint.tcp_address} failed: {e}") from e
        num = len(spec.src_block_ids)
        return TransferStats("tcp", num, num * src.layout.bytes_per_block, time.perf_counter() - start)

    def _send_layers(self, conn: socket.socket, spec: TransferSpec, src: KVCache) -> None:
        index = torch.tensor(spec.src_block_ids, dtype=torch.long)
        ids = torch.tensor(spec.dst_block_ids, dtype=torch.int64).numpy().tobytes()
        num_layers = src.layout.num_layers
        for layer in range(num_layers):
            k = src.k[layer].index_select(0, index)
            v = src.v[layer].index_select(0, index)
            payload = k.numel() * k.element_size()
            conn.sendall(_HEADER.pack(_MAGIC, spec.epoch, layer, num_layers, len(spec.dst_block_ids), payload) + ids)
            conn.sendall(k.view(torch.uint8).numpy().data)
            conn.sendall(v.view(torch.uint8).numpy().data)

    def _connect(self, address: str, timeout_s: float) -> socket.socket:
        conn = self._conns.get(address)
        if conn is None:
            host, port = address.rsplit(":", 1)
            conn = socket.create_connection((host, int(port)), timeout=timeout_s)
            _tune(conn)
            self._conns[address] = conn
        conn.settimeout(timeout_s)
        return conn

    def _drop(self, address: str) -> None:
        conn = self._conns.pop(address, None)
        if conn is not None:
            conn.close()

    def close(self) -> None:
        for address in list(self._conns):
            self._drop(address)


def _recv_exact(conn: socket.socket, size: int) -> bytes | None:
    """Exactly `size` bytes, or None if the peer closed cleanly before the first byte."""
    chunks, received = [], 0
    while received < size:
        chunk = conn.recv(size - received)
        if not chunk:
            if received == 0:
                return None
            raise TransferError("connection closed mid-message")
        chunks.append(chunk)
        received += len(chunk)
    return b"".join(chunks)


def _recv_into(conn: socket.socket, buffer: torch.Tensor) -> None:
    view = buffer.numpy().data.cast("B")
    received = 0
    while received < len(view):
        n = conn.recv_into(view[received:])
        if n == 0:
            raise TransferError("connection closed mid-payload")
        received += n
