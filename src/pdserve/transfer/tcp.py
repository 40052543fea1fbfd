"""Cross-node transport over TCP (wire.py has the protocol): the decode replica's listener writes arriving blocks
straight into its KV cache; the prefill replica keeps a pool of connections per decode endpoint, one transfer at a
time on each."""

from __future__ import annotations

import secrets
import socket
import struct
import threading
import time
from collections.abc import Callable

import torch

from pdserve.kvcache import KVCache
from pdserve.transfer import wire
from pdserve.transfer.base import (
    Deadline,
    FencedError,
    KVEndpoint,
    KVLayoutSpec,
    KVReceiver,
    KVSender,
    LayerProgress,
    TransferError,
    TransferSpec,
    TransferStats,
    check_compatible,
    fence_deadline,
    is_scattered,
    layout_spec,
    require_host_memory,
    runs,
)

_HANDSHAKE_TIMEOUT_S = 10.0
FENCED_REPLY = "fenced: "  # a refusal's reply starts so when the transfer's reservation no longer admitted it
# A sender keeps at most this many idle connections per destination cache, none idle longer than _IDLE_TTL_S: the
# receiver's connection cap (`wire.Listener.max_connections`) is shared by every prefill replica, and a departed
# decode replica's connections must not stay open for the sender's life. A receiver closes a connection idle for
# _RECEIVER_IDLE_S, well after its sender stopped reusing it.
_MAX_IDLE_PER_PEER = 4
_IDLE_TTL_S = 30.0
_RECEIVER_IDLE_S = 2 * _IDLE_TTL_S


class TcpReceiver(KVReceiver):
    """Listens on `host:port` (port 0: a free one) and writes arriving blocks straight into `kv`: one thread
    accepts, one thread per connection receives. `advertise_host` is the address other nodes reach this one by
    (e.g. the Ray node IP); it must be given when `host` binds every interface."""

    def __init__(
        self,
        kv: KVCache,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        node_id: str,
        model_id: str,
        advertise_host: str | None = None,
    ) -> None:
        reachable = advertise_host or host
        if reachable in wire.WILDCARDS:
            raise ValueError(f"the KV receiver binds {host!r}: give advertise_host, the address peers reach it by")
        require_host_memory(kv)
        self.kv = kv
        self.spec = layout_spec(kv.layout, model_id)
        self.cache_id = kv.shared_id or secrets.token_hex(8)
        self._num_fenced = 0
        self._listener = wire.Listener(host, port, self._hello, self._serve, "pdserve-kv-recv")
        address = wire.join_address(reachable, self._listener.port)
        self.endpoint = KVEndpoint(node_id, self.spec, kv.layout.num_blocks, self.cache_id, tcp_address=address)

    def close(self) -> None:
        """Stop listening and cut every connection (a transfer in flight fails on its sender's side); once this
        returns, no thread of the receiver writes into the cache."""
        self._listener.close()

    def _hello(self, conn: socket.socket, proven: Callable[[], bool]) -> None:
        wire.accept_hello(conn, self.cache_id, self.spec, _HANDSHAKE_TIMEOUT_S, proven=proven)

    def _serve(self, conn: socket.socket) -> None:
        scratch: torch.Tensor | None = _empty(0)  # reused by every transfer on this connection
        while scratch is not None:
            scratch = self._receive_transfer(conn, scratch)

    def _receive_transfer(self, conn: socket.socket, scratch: torch.Tensor) -> torch.Tensor | None:
        """Receive one transfer, stamp it and ack it; returns the (maybe grown) scratch buffer, or None when the
        sender closed the connection between transfers."""
        # Between transfers a pooled connection idles while its sender keeps it (at most _IDLE_TTL_S): one idle
        # much longer is left behind by its sender (gone, or its pool full), and holds one of the capped slots.
        conn.settimeout(_RECEIVER_IDLE_S)
        raw = bytearray(wire.LAYER.size)
        try:
            num_read = wire.recv_into(conn, memoryview(raw))
        except TimeoutError:
            return None
        if num_read == 0:
            return None
        if num_read < wire.LAYER.size:
            raise TransferError("connection closed mid-header")
        first = wire.LayerHeader._make(wire.LAYER.unpack(raw))
        if first.layer != 0:
            raise TransferError(f"a transfer must start at layer 0, not {first.layer}")
        self._check_header(first)
        # the sender's deadline, on this machine's clock
        sender_deadline_at = time.monotonic() + wire.peer_seconds(first.remaining_s, "the transfer's deadline")
        raw_ids = wire.recv_bytes(conn, 8 * first.num_blocks, sender_deadline_at)
        ids = self._check_ids(raw_ids)
        # A transfer its reservation no longer admits (`fenced`) is read to its end and thrown away, then refused
        # in the reply: the connection stays in step for the next transfer, and the sender learns why (it saw a
        # reset connection, retried the whole transfer on a new one, and was refused again; found in review).
        fenced: FencedError | None = None
        deadline_at = sender_deadline_at
        try:
            deadline_at = min(deadline_at, self._fence(ids, first.epoch, "the transfer"))
        except FencedError as e:
            fenced = e
        write = _block_writer(conn, ids, deadline_at)
        if write is None:  # short runs: receive each payload whole, then scatter it in one indexed copy
            scratch = scratch if scratch.numel() >= first.num_payload_bytes else _empty(first.num_payload_bytes)
            write = _scattering_writer(conn, ids, scratch[: first.num_payload_bytes], deadline_at)
        for layer in range(self.kv.layout.num_layers):
            if layer > 0:
                at = deadline_at if fenced is None else sender_deadline_at
                header = wire.LayerHeader._make(wire.LAYER.unpack(wire.recv_bytes(conn, wire.LAYER.size, at)))
                is_same = header._replace(remaining_s=0) == first._replace(remaining_s=0, layer=layer)
                if not is_same or wire.recv_bytes(conn, len(raw_ids), at) != raw_ids:
                    raise TransferError(f"layer {layer} of epoch {first.epoch} does not continue its transfer")
            if fenced is None and time.monotonic() > deadline_at:
                raise TransferError(f"epoch {first.epoch}: the deadline passed before layer {layer}; dropped")
            if fenced is None:
                try:
                    self._fence(ids, first.epoch, f"layer {layer}")
                except FencedError as e:
                    fenced = e
            if fenced is None:
                write(self.kv.k[layer])
                write(self.kv.v[layer])
            else:  # K and V of the layer, read and dropped: never into the cache
                _discard(conn, 2 * first.num_payload_bytes, sender_deadline_at)
        if fenced is None:
            try:
                self._fence(ids, first.epoch, "the arrival stamps")
            except FencedError as e:
                fenced = e
        if fenced is not None:
            wire.send_reply(conn, f"{FENCED_REPLY}{fenced}")
            return scratch
        self.kv.block_epochs[ids] = first.epoch  # after every layer of every block
        wire.send_reply(conn, "")
        return scratch

    @property
    def num_fenced(self) -> int:
        return self._num_fenced

    @property
    def num_refused(self) -> int:
        """Connections refused: failed handshakes (no proof of the cluster secret, another cache or layout),
        malformed or out-of-range messages, and connections beyond the cap."""
        return self._listener.num_refused

    def _fence(self, ids: list[int], epoch: int, what: str) -> float:
        """The reservation's write deadline; FencedError (counted) when its blocks are not open to `epoch`."""
        try:
            return fence_deadline(self.kv, ids, epoch, what)
        except FencedError:
            self._num_fenced += 1
            raise

    def _check_header(self, header: wire.LayerHeader) -> None:
        layout = self.kv.layout
        block_bytes = layout.block_size * layout.num_kv_heads * layout.head_dim * self.kv.k[0].element_size()
        if (
            not 0 < header.num_blocks <= layout.num_blocks
            or header.num_payload_bytes != header.num_blocks * block_bytes
        ):
            raise TransferError(f"bad KV layer header {header}")

    def _check_ids(self, raw_ids: bytes) -> list[int]:
        ids = list(struct.unpack(f"<{len(raw_ids) // 8}q", raw_ids))
        if any(not 0 <= b < self.kv.layout.num_blocks for b in ids) or len(set(ids)) != len(ids):
            raise TransferError("destination block ids out of range or repeated")
        return ids


def _block_writer(conn: socket.socket, ids: list[int], deadline_at: float) -> Callable[[torch.Tensor], None] | None:
    """write(cache) receiving one payload straight into the blocks `ids` of `cache` (a layer's K or V), a run of
    blocks at a time (each run is one contiguous slab); None when the runs are too short for that to be fast."""
    dst_runs = runs(ids)
    if is_scattered(len(dst_runs), len(ids)):
        return None

    def write(cache: torch.Tensor) -> None:
        for start, n in dst_runs:
            wire.recv_exact(conn, wire.as_bytes(cache[start : start + n]), deadline_at)

    return write


def _scattering_writer(
    conn: socket.socket, ids: list[int], scratch: torch.Tensor, deadline_at: float
) -> Callable[[torch.Tensor], None]:
    index = torch.tensor(ids, dtype=torch.long)

    def write(cache: torch.Tensor) -> None:
        wire.recv_exact(conn, wire.as_bytes(scratch), deadline_at)
        cache.index_copy_(0, index, scratch.view(cache.dtype).view(len(ids), *cache.shape[1:]))

    return write


def _discard(conn: socket.socket, num_bytes: int, deadline_at: float) -> None:
    buffer = memoryview(bytearray(min(num_bytes, 1 << 20)))
    while num_bytes > 0:
        n = min(num_bytes, len(buffer))
        wire.recv_exact(conn, buffer[:n], deadline_at)
        num_bytes -= n


def _empty(num_bytes: int) -> torch.Tensor:
    return torch.empty(num_bytes, dtype=torch.uint8)


class TcpSender(KVSender):
    """Keeps idle connections per destination cache (at most _MAX_IDLE_PER_PEER, each for at most _IDLE_TTL_S) and
    reuses them; a connection that fails is closed, and a reused one that fails is replaced once (rewriting the same
    blocks under the same epoch is harmless)."""

    def __init__(self, model_id: str) -> None:
        self.model_id = model_id
        # (address, cache id) -> idle connections, each with when it went idle (time.monotonic())
        self._idle: dict[tuple[str, str], list[tuple[socket.socket, float]]] = {}
        self._lock = threading.Lock()  # guards _idle and _is_closed; each transfer holds its own connection
        self._is_closed = False

    def send(
        self,
        endpoint: KVEndpoint,
        spec: TransferSpec,
        src: KVCache,
        timeout_s: float,
        progress: LayerProgress | None = None,
    ) -> TransferStats:
        start, deadline = time.perf_counter(), Deadline(timeout_s)
        require_host_memory(src)
        local = layout_spec(src.layout, self.model_id)
        check_compatible(local, endpoint.spec)
        spec.check_ranges(src.layout.num_blocks, endpoint.num_blocks)
        if endpoint.tcp_address is None:
            raise TransferError("the decode replica has no TCP receiver")
        layer_s: tuple[float, ...] = ()
        if spec.dst_block_ids:
            try:
                layer_s = self._transfer(endpoint, local, spec, src, deadline, progress)
            except (OSError, TransferError) as e:
                error = FencedError if isinstance(e, FencedError) else TransferError
                raise error(f"KV transfer {spec.transfer_id} to {endpoint.tcp_address} failed: {e}") from e
        num = len(spec.dst_block_ids)
        return TransferStats(num, num * src.layout.bytes_per_block, time.perf_counter() - start, "tcp", layer_s)

    def close(self) -> None:
        """Close the idle connections; those of transfers in flight close when they end."""
        with self._lock:
            self._is_closed = True
            conns = [c for idle in self._idle.values() for c, _ in idle]
            self._idle.clear()
        for conn in conns:
            conn.close()

    def _transfer(
        self,
        endpoint: KVEndpoint,
        local: KVLayoutSpec,
        spec: TransferSpec,
        src: KVCache,
        deadline: Deadline,
        progress: LayerProgress | None,
    ) -> tuple[float, ...]:
        """Send over a pooled connection; returns each layer's send time."""
        key = (str(endpoint.tcp_address), endpoint.cache_id)
        layer_s: tuple[float, ...] = ()
        for attempt in range(2):
            conn, is_reused = self._checkout(key, endpoint, local, deadline)
            try:
                layer_s = _send_transfer(conn, spec, src, deadline, progress)
            except FencedError:  # refused in its reply, the transfer read to its end: the connection is in step
                self._keep(key, conn)
                raise
            except BaseException as e:
                conn.close()
                if isinstance(e, OSError) and is_reused and attempt == 0:
                    continue  # the pooled connection may have died while idle
                raise
            self._keep(key, conn)
            return layer_s
        return layer_s

    def _keep(self, key: tuple[str, str], conn: socket.socket) -> None:
        """Back to the pool (closed if the pool is full or the sender closed)."""
        with self._lock:
            idle = self._idle.setdefault(key, [])
            if not self._is_closed and len(idle) < _MAX_IDLE_PER_PEER:
                idle.append((conn, time.monotonic()))
                return
        conn.close()

    def _checkout(
        self, key: tuple[str, str], endpoint: KVEndpoint, local: KVLayoutSpec, deadline: Deadline
    ) -> tuple[socket.socket, bool]:
        for conn in self._expire():
            conn.close()
        with self._lock:
            idle = self._idle.get(key)
            if idle:
                return idle.pop()[0], True
        return _connect(endpoint, local, deadline), False

    def _expire(self) -> list[socket.socket]:
        """Take out the connections idle past _IDLE_TTL_S (the newest are reused first: the oldest expire), and
        the keys left empty (a decode replica that left is never asked for again)."""
        oldest_kept = time.monotonic() - _IDLE_TTL_S
        expired = []
        with self._lock:
            for key, idle in list(self._idle.items()):
                expired += [conn for conn, since in idle if since < oldest_kept]
                idle[:] = [(conn, since) for conn, since in idle if since >= oldest_kept]
                if not idle:
                    del self._idle[key]
        return expired


def _connect(endpoint: KVEndpoint, local: KVLayoutSpec, deadline: Deadline) -> socket.socket:
    """A new connection that passed the handshake (the receiver checked the cache id and the layout)."""
    assert endpoint.tcp_address is not None
    conn = socket.create_connection(
        wire.split_address(endpoint.tcp_address), timeout=deadline.remaining_s("connecting")
    )
    try:
        wire.tune(conn)
        wire.handshake(conn, endpoint.cache_id, local, deadline)
    except BaseException:
        conn.close()
        raise
    return conn


def _send_transfer(
    conn: socket.socket, spec: TransferSpec, src: KVCache, deadline: Deadline, progress: LayerProgress | None
) -> tuple[float, ...]:
    num = len(spec.src_block_ids)
    ids = struct.pack(f"<{num}q", *spec.dst_block_ids)
    src_runs = runs(spec.src_block_ids)
    # Scattered source blocks are gathered into one buffer per K/V (one sendall each); one run is sent in place.
    index = torch.tensor(spec.src_block_ids, dtype=torch.long)
    shape, num_buffers = (num, *src.layout.block_shape), 0 if len(src_runs) == 1 else 2
    gathered = [torch.empty(shape, dtype=src.layout.dtype) for _ in range(num_buffers)]
    layer_s = []
    for layer in range(src.layout.num_layers):
        if progress is not None:
            progress.wait_layer(layer, deadline)
        layer_start = time.perf_counter()
        k, v = (
            _blocks(t, src_runs, index, gathered[i] if gathered else None)
            for i, t in enumerate((src.k[layer], src.v[layer]))
        )
        remaining_s = deadline.remaining_s(f"layer {layer}")
        header = wire.LAYER.pack(spec.epoch, remaining_s, layer, num, k.numel() * k.element_size())
        conn.settimeout(remaining_s)  # sendall's timeout bounds the whole call
        conn.sendall(header + ids)
        for payload in (k, v):
            conn.settimeout(deadline.remaining_s(f"layer {layer}"))
            conn.sendall(wire.as_bytes(payload))
        layer_s.append(time.perf_counter() - layer_start)
    problem = wire.read_reply(conn, deadline, "the acknowledgement")
    if problem is not True:
        refused = FencedError if str(problem).startswith(FENCED_REPLY) else TransferError
        raise refused(f"the decode replica refused it: {problem}")
    return tuple(layer_s)


def _blocks(
    t: torch.Tensor, src_runs: list[tuple[int, int]], index: torch.Tensor, out: torch.Tensor | None
) -> torch.Tensor:
    """Blocks `index` of `t`, `[num, block_size, num_kv_heads, head_dim]`, contiguous: in place if one run."""
    if out is None:
        (start, n) = src_runs[0]
        return t[start : start + n]
    return torch.index_select(t, 0, index, out=out)
