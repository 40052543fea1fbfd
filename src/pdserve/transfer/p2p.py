"""Point-to-point KV transport over a 2-rank communicator per (prefill replica, decode replica) pair: NCCL (through
cupy, `nccl.py`) between GPUs, gloo (torch.distributed, `gloo.py`) between hosts. One protocol for both, so all of
it but NCCL's own calls runs in CI.

Control channel: the decode replica listens on TCP (its endpoint's `p2p_address`); a prefill replica keeps one
control connection per pair, beside the pair's communicator:

    D -> P  CHALLENGE (a nonce)                 wire.py's handshake: the proof of the cluster secret, then
    P -> D  HELLO {cache_id, spec, backend, proof} the compatibility check: a refusal ends it before anything is
    D -> P  REPLY                               built or moved
    D -> P  {"unique_id"}                       D is rank 0 and makes the id: NCCL's bootstrap root (gloo's store)
                                                then listens on D, which every P can already reach
    both    build the communicator              blocking, in the connection's thread (never an event loop),
                                                bounded by the handshake timeout (D) or the transfer's deadline (P)

then per transfer, one at a time per pair:

    P -> D  {"epoch", "transfer_id", "remaining_s", "dst_block_ids", "layers_per_message"}
    D -> P  REPLY                               ids valid and receives posted (a refusal leaves the pair usable)
    P => D  per message: layers [i, i + layers_per_message) of K and V of the blocks, one tensor
            [layers, 2, blocks, block elements] over the communicator
    D -> P  REPLY                               every message arrived, was scattered into the reserved blocks, and
                                                the epoch is stamped on them

Layer-pipelined push (`LayerProgress`) sends one layer per message as soon as the engine reports it computed (on
GPU after that layer's CUDA event); otherwise all layers go as one message: one gather, one send, one scatter.

Deadlines: both sides bound every wait by the transfer's deadline (D counts from the remaining seconds P sent: the
machines share no clock). On expiry, or on any error once data may be in flight, a side aborts its communicator and
closes the control connection, so the other side's next wait fails at once; the pair is dropped on both sides and
the next transfer builds a new one. D stamps the epoch only after every message arrived, so a transfer cut midway
leaves its blocks unstamped: the request fails cleanly and never decodes from partial KV. On a CUDA stream D queues
no write before the last message landed, so none can land after a cut (a scatter runs behind every receive posted
before it, and an abort would release them).

Pooling: each communicator holds memory (NCCL: ~50-100 MB of GPU memory), so each side keeps at most `max_pairs`
and closes its least recently used idle pair beyond that. When D closes a pair, P sees the control connection closed
at its next transfer, before any data moved, and rebuilds the pair once.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import socket
import threading
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

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
    layer_chunks,
    layout_spec,
    planes,
)

logger = logging.getLogger(__name__)
MAGIC = b"PDKP"  # a P2P sender never talks to a TCP receiver by mistake (and vice versa)
HANDSHAKE_TIMEOUT_S = 10.0
DEFAULT_MAX_PAIRS = 8


class _Refused(TransferError):
    """The decode replica refused this transfer before anything was posted: the pair stays usable."""


class Pending(ABC):
    """A posted send or receive."""

    @abstractmethod
    def wait(self, deadline: Deadline, what: str) -> None:
        """Return once it completed; TransferError if it failed or the deadline passed first."""


class Communicator(ABC):
    """One end of a 2-rank communicator; the peer is the other rank. Operations complete in the order posted."""

    @abstractmethod
    def send(self, tensor: torch.Tensor) -> Pending:
        """Post a send of the contiguous `tensor` (kept unchanged until the send completed)."""

    @abstractmethod
    def recv(self, tensor: torch.Tensor) -> Pending:
        """Post a receive into the contiguous `tensor`, of exactly its size."""

    def stream(self) -> contextlib.AbstractContextManager[object]:
        """Where this pair's gathers and scatters run (its CUDA stream; on CPU, right here)."""
        return contextlib.nullcontext()

    @property
    def is_stream_ordered(self) -> bool:
        """Whether work queued in `stream()` runs after every operation posted before it (a CUDA stream: a scatter
        waits behind receives posted earlier), rather than at once (CPU)."""
        return False

    def wait_for(self, event: torch.cuda.Event | None = None) -> None:  # noqa: B027 (nothing to wait on CPU)
        """Make the pair's later work wait for `event` (a layer computed), or for all the work queued so far on
        the device's current stream (the prefill)."""

    def synchronize(self) -> None:  # noqa: B027
        """Return once the pair's queued work (scatters, stamps) is done."""

    @abstractmethod
    def abort(self) -> None:
        """Cut it: pending operations end (failing), here and at the peer; unusable afterwards."""

    @abstractmethod
    def close(self) -> None:
        """Free it (no operation pending)."""


class Rendezvous(ABC):
    """Rank 0's side of building a communicator: `unique_id` goes to rank 1, then both connect."""

    unique_id: str

    @abstractmethod
    def connect(self, timeout_s: float) -> Communicator:
        """Block until rank 1 joined. TransferError after `timeout_s`."""


class Backend(ABC):
    """A communication library: NCCL between GPUs, gloo between hosts."""

    name: str
    device_type: str  # where the tensors it moves live: "cuda" or "cpu"

    @abstractmethod
    def root(self, host: str, device: torch.device) -> Rendezvous:
        """Rank 0: a fresh unique id, reachable by peers at `host` (this side's address on the control link)."""

    @abstractmethod
    def join(self, unique_id: str, host: str, device: torch.device, timeout_s: float) -> Communicator:
        """Rank 1: connect to the rendezvous that made `unique_id`. TransferError after `timeout_s`."""


@dataclass
class PairCounters:
    """What a side did with its pairs since it started (tests and metrics read these)."""

    built: int = 0
    closed_idle: int = 0  # closed by the LRU bound (or by the peer going away)
    aborted: int = 0  # cut by a failure or deadline
    fenced: int = 0  # receiver: transfers refused because their reservation was not open to them
    refused: int = 0  # receiver: malformed or out-of-range transfer requests (a NaN deadline, say)


def _check_device(kv: KVCache, backend: Backend) -> None:
    if kv.flat.device.type != backend.device_type:
        raise ValueError(f"{backend.name} moves KV on {backend.device_type}, this cache is on {kv.flat.device}")


# --- decode side -------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Peer:
    """D's side of one pair."""

    conn: socket.socket
    comm: Communicator
    is_busy: bool = False  # inside a transfer
    is_closing: bool = False  # evicted (or the receiver closes): takes no new transfer


class P2PReceiver(KVReceiver):
    """Serves `kv` to prefill replicas over `backend`: listens for control connections on `host:port` and keeps
    at most `max_pairs` communicators (`advertise_host`: how other nodes reach `host`, needed when it binds every
    interface)."""

    def __init__(
        self,
        kv: KVCache,
        backend: Backend,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        node_id: str,
        model_id: str,
        advertise_host: str | None = None,
        max_pairs: int = DEFAULT_MAX_PAIRS,
        cache_id: str | None = None,
    ) -> None:
        reachable = advertise_host or host
        if reachable in wire.WILDCARDS:
            raise ValueError(f"the KV receiver binds {host!r}: give advertise_host, the address peers reach it by")
        _check_device(kv, backend)
        if max_pairs < 1:
            raise ValueError(f"max_pairs must be at least 1, not {max_pairs}")
        self.kv, self.backend, self.max_pairs = kv, backend, max_pairs
        self.spec = layout_spec(kv.layout, model_id)
        self.cache_id = cache_id or kv.shared_id or secrets.token_hex(8)
        self.counters = PairCounters()
        self._peers: OrderedDict[socket.socket, _Peer] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()  # guards _peers, the peers' flags, counters and _is_closed
        self._is_closed = False
        self._write_lock = threading.Lock()  # held while checking _is_closed and queueing writes into the cache
        self._listener = wire.Listener(host, port, self._hello, self._serve, f"pdserve-kv-{backend.name}")
        address = wire.join_address(reachable, self._listener.port)
        self.endpoint = KVEndpoint(
            node_id, self.spec, kv.layout.num_blocks, self.cache_id, p2p_address=address, p2p_backend=backend.name
        )

    @property
    def num_pairs(self) -> int:
        with self._lock:
            return len(self._peers)

    @property
    def num_fenced(self) -> int:
        return self.counters.fenced

    def close(self) -> None:
        """Stop listening and cut every pair: its transfer fails unstamped. Once this returns, nothing of the
        receiver writes into the cache (a thread still waiting on an aborted gloo operation ends at its deadline,
        writing nothing)."""
        with self._write_lock, self._lock:  # a write in progress finishes queueing first
            self._is_closed = True
            peers = list(self._peers.values())
            for peer in peers:
                peer.is_closing = True
        for peer in peers:
            peer.comm.abort()
        if self.kv.flat.device.type == "cuda":
            torch.cuda.synchronize(self.kv.flat.device)  # writes already queued land now, not later
        self._listener.close(join_timeout_s=1.0)

    def _hello(self, conn: socket.socket, proven: Callable[[], bool]) -> None:
        wire.accept_hello(
            conn, self.cache_id, self.spec, HANDSHAKE_TIMEOUT_S, MAGIC, proven=proven, backend=self.backend.name
        )

    def _serve(self, conn: socket.socket) -> None:
        rendezvous = self.backend.root(conn.getsockname()[0], self.kv.flat.device)
        wire.send_json(conn, {"unique_id": rendezvous.unique_id})
        peer = _Peer(conn, rendezvous.connect(HANDSHAKE_TIMEOUT_S))
        conn.settimeout(None)  # between transfers a pair idles as long as its sender keeps it
        with self._lock:
            self._peers[conn] = peer
            self.counters.built += 1
            peer.is_closing = self._is_closed
        self._evict_beyond_bound(peer)
        is_clean = False
        try:
            while (message := wire.recv_json(conn)) is not None:
                if not self._start(peer):
                    break  # evicted just now: the sender sees the connection close before anything moved
                try:
                    self._receive(peer, message)
                finally:
                    with self._lock:
                        peer.is_busy = False
            is_clean = True
        finally:
            with self._lock:
                self._peers.pop(conn, None)
                if is_clean:
                    self.counters.closed_idle += 1
                else:
                    self.counters.aborted += 1
            if is_clean:
                peer.comm.close()
            else:
                peer.comm.abort()

    def _start(self, peer: _Peer) -> bool:
        """Mark the pair busy for a transfer (and most recently used); False if it is being closed."""
        with self._lock:
            if peer.is_closing:
                return False
            peer.is_busy = True
            self._peers.move_to_end(peer.conn)
            return True

    def _receive(self, peer: _Peer, message: dict[str, Any]) -> None:
        """One transfer: post the receives, scatter the messages into the reserved blocks as they land (on a CUDA
        stream, once the last one landed), stamp."""
        try:
            ids, epoch, per_message, deadline = self._parse_transfer(message)
        except _Refused as e:
            wire.send_reply(peer.conn, str(e))  # nothing posted: the pair stays usable
            return
        comm, layout, dst = peer.comm, self.kv.layout, planes(self.kv)
        chunks = layer_chunks(layout.num_layers, per_message)
        with comm.stream():
            index = torch.tensor(ids, dtype=torch.long, device=dst.device)
            shape = (layout.num_layers, 2, len(ids), dst.shape[-1])
            buffer = torch.empty(shape, dtype=layout.dtype, device=dst.device)
        posted = [comm.recv(buffer[a:b]) for a, b in chunks]
        wire.send_reply(peer.conn, "")
        written = 0  # layers [0, written) are in the blocks
        for (a, b), pending in zip(chunks, posted, strict=True):
            pending.wait(deadline, f"layers {a}-{b - 1} of epoch {epoch} arrived")
            # On a CUDA stream a scatter runs after every receive posted before it: one queued as its own message
            # landed would wait behind the later ones and, were they cut by an abort (the sender failed, this
            # receiver gave up at its deadline), run then, long after its fence check, into blocks freed and
            # reused meanwhile. So there the layers are written once the last message landed (no later than they
            # would have run anyway); on CPU each as it lands.
            if comm.is_stream_ordered and b < layout.num_layers:
                continue
            with self._writable(deadline, ids, epoch, f"writing layers {written}-{b - 1}"), comm.stream():
                dst[written:b].index_copy_(2, index, buffer[written:b])
            written = b
        with self._writable(deadline, ids, epoch, f"stamping epoch {epoch}"), comm.stream():
            # In stream order after every scatter, and queued only once every message arrived.
            self.kv.block_epochs.index_fill_(0, index, epoch)
        comm.synchronize()
        wire.send_reply(peer.conn, "")

    @contextlib.contextmanager
    def _writable(self, deadline: Deadline, ids: list[int], epoch: int, what: str) -> Iterator[None]:
        """Hold the write lock if the blocks may still be written — before the deadline, while their reservation
        is open to `epoch` (the fence: else the decode replica may have freed them) and while the receiver is open;
        else TransferError."""
        with self._write_lock:
            deadline.remaining_s(what)
            try:
                fence_deadline(self.kv, ids, epoch, what)
            except FencedError:
                self.counters.fenced += 1
                raise
            if self._is_closed:
                raise TransferError(f"the receiver closed before {what}")
            yield

    def _parse_transfer(self, message: dict[str, Any]) -> tuple[list[int], int, int, Deadline]:
        """(destination ids, epoch, layers per message, deadline); _Refused naming what is wrong."""
        try:
            ids = [int(b) for b in message["dst_block_ids"]]
            epoch, per_message = int(message["epoch"]), int(message["layers_per_message"])
            deadline = Deadline(wire.peer_seconds(message["remaining_s"], "the transfer's deadline"))
        except (KeyError, TypeError, ValueError, OverflowError, TransferError) as e:  # OverflowError: int(1e400)
            self.counters.refused += 1
            raise _Refused(f"malformed transfer ({e})") from e
        num_blocks, num_layers = self.kv.layout.num_blocks, self.kv.layout.num_layers
        if not ids or any(not 0 <= b < num_blocks for b in ids) or len(set(ids)) != len(ids):
            raise _Refused(f"destination block ids must be distinct, in [0, {num_blocks}), and at least one")
        if not 1 <= per_message <= num_layers:
            raise _Refused(f"layers per message must lie in [1, {num_layers}]")
        try:
            until = fence_deadline(self.kv, ids, epoch, "the transfer")
        except FencedError as e:
            self.counters.fenced += 1
            raise _Refused(str(e)) from e
        deadline.at = min(deadline.at, until)
        return ids, epoch, per_message, deadline

    def _evict_beyond_bound(self, new: _Peer) -> None:
        """Close the least recently used idle pairs beyond `max_pairs`, never the one just built (their threads
        end and free them); with every other pair busy the bound stays exceeded until the next pair is built."""
        with self._lock:
            excess = sum(not p.is_closing for p in self._peers.values()) - self.max_pairs
            victims = [p for p in self._peers.values() if p is not new and not p.is_busy and not p.is_closing]
            victims = victims[: max(0, excess)]
            for peer in victims:
                peer.is_closing = True  # under the lock: it can no longer start a transfer
        for peer in victims:
            wire.shutdown(peer.conn)  # its thread wakes in recv_json (or _start) and closes the communicator


# --- prefill side ------------------------------------------------------------------------------------------------


class _StalePair(Exception):
    """The pair was closed by the peer before this transfer moved anything: rebuilding it is safe."""


@dataclass(eq=False)
class _Pair:
    """P's side of one pair; `lock` is held by the transfer using it (one at a time)."""

    key: tuple[str, str]  # (control address, cache id)
    lock: threading.Lock = field(default_factory=threading.Lock)
    conn: socket.socket | None = None
    comm: Communicator | None = None
    is_retired: bool = False  # out of the pool (evicted, failed, sender closed): its holder closes it

    def close(self, abort: bool) -> None:
        if self.comm is not None:
            self.comm.abort() if abort else self.comm.close()
        if self.conn is not None:
            self.conn.close()
        self.conn = self.comm = None


class P2PSender(KVSender):
    """Keeps one pair (control connection + communicator) per destination cache, at most `max_pairs`, the least
    recently used idle one closed beyond that."""

    def __init__(self, model_id: str, backend: Backend, max_pairs: int = DEFAULT_MAX_PAIRS) -> None:
        if max_pairs < 1:
            raise ValueError(f"max_pairs must be at least 1, not {max_pairs}")
        self.model_id, self.backend, self.max_pairs = model_id, backend, max_pairs
        self.counters = PairCounters()
        self._pairs: OrderedDict[tuple[str, str], _Pair] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()  # guards _pairs, is_retired flags, counters and _is_closed
        self._is_closed = False

    @property
    def num_pairs(self) -> int:
        with self._lock:
            return sum(p.comm is not None for p in self._pairs.values())

    def send(
        self,
        endpoint: KVEndpoint,
        spec: TransferSpec,
        src: KVCache,
        timeout_s: float,
        progress: LayerProgress | None = None,
    ) -> TransferStats:
        start, deadline = time.perf_counter(), Deadline(timeout_s)
        _check_device(src, self.backend)
        local = layout_spec(src.layout, self.model_id)
        check_compatible(local, endpoint.spec)
        spec.check_ranges(src.layout.num_blocks, endpoint.num_blocks)
        if endpoint.p2p_address is None or endpoint.p2p_backend != self.backend.name:
            raise TransferError(f"the decode replica serves KV over {endpoint.transports}, not {self.backend.name}")
        layer_s: tuple[float, ...] = ()
        if spec.dst_block_ids:
            try:
                layer_s = self._transfer(endpoint, local, spec, src, deadline, progress)
            except Exception as e:
                raise TransferError(
                    f"KV transfer {spec.transfer_id} over {self.backend.name} to {endpoint.p2p_address} failed: {e}"
                ) from e
        num = len(spec.dst_block_ids)
        seconds = time.perf_counter() - start
        return TransferStats(num, num * src.layout.bytes_per_block, seconds, self.backend.name, layer_s)

    def close(self) -> None:
        """Close every idle pair; a pair in use closes when its transfer ends. Later sends fail."""
        with self._lock:
            self._is_closed = True
            pairs = list(self._pairs.values())
            self._pairs.clear()
            for pair in pairs:
                pair.is_retired = True
        for pair in pairs:
            if pair.lock.acquire(blocking=False):
                pair.close(abort=False)
                pair.lock.release()

    def _transfer(
        self,
        endpoint: KVEndpoint,
        local: KVLayoutSpec,
        spec: TransferSpec,
        src: KVCache,
        deadline: Deadline,
        progress: LayerProgress | None,
    ) -> tuple[float, ...]:
        for attempt in range(2):
            with self._checkout(endpoint, local, deadline, src.flat.device) as (pair, is_reused):
                try:
                    return _push(pair, spec, src, deadline, progress)
                except _Refused:
                    raise
                except _StalePair as e:
                    self._drop(pair, abort=False)
                    if is_reused and attempt == 0:
                        continue  # the decode side closed it while idle: no byte moved, build a new one
                    raise TransferError(str(e)) from e
                except BaseException:
                    self._drop(pair, abort=True)
                    raise
        raise AssertionError("unreachable")

    @contextlib.contextmanager
    def _checkout(
        self, endpoint: KVEndpoint, local: KVLayoutSpec, deadline: Deadline, device: torch.device
    ) -> Iterator[tuple[_Pair, bool]]:
        """The pair to `endpoint`, held for one transfer, built if needed; yields (pair, whether it existed)."""
        pair = self._hold(endpoint, deadline)
        try:
            is_reused = pair.comm is not None
            if not is_reused:
                try:
                    self._connect(pair, endpoint, local, deadline, device)
                except BaseException:
                    self._retire(pair)  # not kept for a destination that may be gone for good
                    raise
            yield pair, is_reused
        finally:
            with self._lock:
                is_retired = pair.is_retired
            if is_retired:  # evicted, failed or the sender closed while it was held
                pair.close(abort=False)
            pair.lock.release()
        self._evict_beyond_bound(pair)

    def _hold(self, endpoint: KVEndpoint, deadline: Deadline) -> _Pair:
        """The pool's pair to `endpoint` (new if none), its lock held. A pair retired while we waited for its lock
        is left alone: we look again."""
        key = (str(endpoint.p2p_address), endpoint.cache_id)
        while True:
            with self._lock:
                if self._is_closed:
                    raise TransferError("the KV sender is closed")
                pair = self._pairs.setdefault(key, _Pair(key))
                self._pairs.move_to_end(key)
            if not pair.lock.acquire(timeout=deadline.remaining_s("the pair's previous transfer ended")):
                raise TransferError("the pair's previous transfer did not end before the deadline")
            with self._lock:
                if not pair.is_retired:
                    return pair
            pair.lock.release()

    def _retire(self, pair: _Pair) -> None:
        with self._lock:
            pair.is_retired = True
            if self._pairs.get(pair.key) is pair:
                del self._pairs[pair.key]

    def _connect(
        self, pair: _Pair, endpoint: KVEndpoint, local: KVLayoutSpec, deadline: Deadline, device: torch.device
    ) -> None:
        assert endpoint.p2p_address is not None
        conn = socket.create_connection(
            wire.split_address(endpoint.p2p_address), timeout=deadline.remaining_s("connecting")
        )
        try:
            wire.tune(conn)
            wire.handshake(conn, endpoint.cache_id, local, deadline, MAGIC, backend=self.backend.name)
            try:
                reply = wire.recv_json(conn, deadline.at)
                unique_id = reply["unique_id"] if reply is not None else None
            except (ValueError, TypeError, KeyError) as e:
                raise TransferError(f"malformed rendezvous reply: {e}") from e
            if not isinstance(unique_id, str):
                raise TransferError("the decode replica sent no communicator id")
            host, left_s = conn.getsockname()[0], deadline.remaining_s("joining the communicator")
            comm = self.backend.join(unique_id, host, device, left_s)
        except BaseException:
            conn.close()
            raise
        pair.conn, pair.comm = conn, comm
        with self._lock:
            self.counters.built += 1

    def _drop(self, pair: _Pair, abort: bool) -> None:
        """Close a held pair that failed and take it out of the pool."""
        self._retire(pair)
        pair.close(abort)
        with self._lock:
            if abort:
                self.counters.aborted += 1
            else:
                self.counters.closed_idle += 1

    def _evict_beyond_bound(self, keep: _Pair) -> None:
        """Close least recently used idle pairs (never `keep`, just used) while more than `max_pairs` are live."""
        victims = []
        with self._lock:
            live = [p for p in self._pairs.values() if p.comm is not None]
            excess = len(live) - self.max_pairs
            for pair in live:
                if excess <= 0:
                    break
                if pair is not keep and pair.lock.acquire(blocking=False):  # idle: nobody is transferring over it
                    pair.is_retired = True
                    del self._pairs[pair.key]
                    self.counters.closed_idle += 1
                    victims.append(pair)
                    excess -= 1
        for pair in victims:
            pair.close(abort=False)
            pair.lock.release()


def _push(
    pair: _Pair, spec: TransferSpec, src: KVCache, deadline: Deadline, progress: LayerProgress | None
) -> tuple[float, ...]:
    """One transfer over a held pair; returns how long each message took to be posted after its layers were
    ready. _StalePair if the peer had closed the pair before anything moved."""
    assert pair.conn is not None and pair.comm is not None
    conn, comm, layout = pair.conn, pair.comm, src.layout
    per_message = 1 if progress is not None else layout.num_layers
    try:
        remaining_s = deadline.remaining_s("the request")
    except TransferError as e:  # out of time before anything was sent: the pair stays as it is (it was aborted)
        raise _Refused(str(e)) from e
    request = {
        "epoch": spec.epoch,
        "transfer_id": spec.transfer_id,
        "remaining_s": remaining_s,
        "dst_block_ids": list(spec.dst_block_ids),
        "layers_per_message": per_message,
    }
    try:
        conn.settimeout(remaining_s)
        wire.send_json(conn, request)
        is_ok = wire.read_reply(conn, deadline, "the decode replica posted its receives")
    except (OSError, TransferError) as e:
        raise _StalePair(f"the control connection failed before any data moved: {e}") from e
    if is_ok is not True:
        raise _Refused(f"the decode replica refused it: {is_ok}")
    device = src.flat.device
    src_planes = planes(src)
    with comm.stream():
        index = torch.tensor(list(spec.src_block_ids), dtype=torch.long, device=device)
        buffer = torch.empty(
            (layout.num_layers, 2, len(index), src_planes.shape[-1]), dtype=layout.dtype, device=device
        )
    chunks, posted, layer_s = layer_chunks(layout.num_layers, per_message), [], []
    for a, b in chunks:
        if progress is not None:
            progress.wait_layer(b - 1, deadline)
            comm.wait_for(progress.event(b - 1))
        elif a == 0:
            comm.wait_for(None)  # the prefill's kernels first
        ready = time.perf_counter()
        with comm.stream():
            torch.index_select(src_planes[a:b], 2, index, out=buffer[a:b])
        posted.append(comm.send(buffer[a:b]))
        layer_s.append(time.perf_counter() - ready)
    for (a, b), pending in zip(chunks, posted, strict=True):
        pending.wait(deadline, f"layers {a}-{b - 1} were sent")
    wire.expect_ok(conn, deadline, "the acknowledgement")
    return tuple(layer_s)
