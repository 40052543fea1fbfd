"""NCCL communicators, through cupy (the `gpu` extra), for the point-to-point KV transport (p2p.py) between GPUs:
K/V go GPU to GPU (NVLink, PCIe peer-to-peer or the network, as NCCL finds) without touching host memory.

Each pair owns a CUDA stream: the gathers, the sends or receives, the scatters and the arrival stamps of a transfer
all run on it, ordered after the prefill's kernels (the current stream, or one CUDA event per layer when the push is
layer-pipelined). A pending operation is a CUDA event polled from the transfer's thread, which also polls the
communicator's asynchronous error, so a dead peer or a passed deadline ends in `abort` (ncclCommAbort) rather than a
hang. Building a communicator blocks in NCCL until both ranks joined; it runs in its own thread so that the
deadline bounds it (one abandoned at the deadline aborts itself if it ever completes).

The unique id is NCCL's own (its bootstrap root listens in the decode replica, on the interface NCCL picks:
`NCCL_SOCKET_IFNAME` where a node has several).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import torch

from pdserve.transfer.base import Deadline, TransferError
from pdserve.transfer.p2p import Backend, Communicator, Pending, Rendezvous

_POLL_S = (20e-6, 1e-3)  # first and longest pause between two polls of a pending operation


def _nccl() -> Any:
    try:
        from cupy.cuda import nccl
    except ImportError as e:
        raise ImportError("the NCCL KV transport needs cupy with NCCL: pip install 'pdserve[gpu]'") from e
    return nccl


class NcclBackend(Backend):
    name, device_type = "nccl", "cuda"

    def __init__(self) -> None:
        self.nccl = _nccl()

    def root(self, host: str, device: torch.device) -> Rendezvous:
        return _NcclRendezvous(self.nccl, device)

    def join(self, unique_id: str, host: str, device: torch.device, timeout_s: float) -> Communicator:
        try:
            uid = bytes.fromhex(unique_id)
        except ValueError as e:
            raise TransferError(f"malformed NCCL unique id: {e}") from e
        return NcclCommunicator.build(self.nccl, uid, 2, 1, device, timeout_s)


class _NcclRendezvous(Rendezvous):
    def __init__(self, nccl: Any, device: torch.device) -> None:
        self._nccl, self._device = nccl, device
        self._uid = unique_id_bytes(nccl.get_unique_id())
        self.unique_id = self._uid.hex()

    def connect(self, timeout_s: float) -> Communicator:
        return NcclCommunicator.build(self._nccl, self._uid, 2, 0, self._device, timeout_s)


class NcclCommunicator(Communicator):
    """One rank of an NCCL communicator with its own stream; `peer` is the rank it sends to and receives from (a
    single-rank communicator is its own peer)."""

    def __init__(self, nccl: Any, comm: Any, stream: _PairStream, peer: int) -> None:
        self._nccl, self._comm, self._peer = nccl, comm, peer
        self._pair_stream = stream  # keeps the cupy stream alive
        self._stream, self._device, self.stream_handle = stream.torch, stream.torch.device, stream.handle
        self._lock = threading.Lock()  # abort may come from another thread (P2PReceiver.close)
        self._is_closed = False

    @classmethod
    def build(
        cls, nccl: Any, uid: bytes, num_ranks: int, rank: int, device: torch.device, timeout_s: float
    ) -> NcclCommunicator:
        """Join communicator `uid` as `rank` of `num_ranks` on `device`; TransferError if it fails or every rank has
        not joined within `timeout_s`. A 2-rank communicator is warmed up before it is returned: NCCL connects a
        peer lazily inside the first send/recv, which blocks on the host until the peer makes its own — one grouped
        1-byte exchange here, while both ranks are building, keeps that out of the first transfer (where the decode
        side posts its receives before telling the sender to send: it would wait forever)."""
        index = torch.device(device).index or 0
        stream = _PairStream(index)
        done, result = threading.Event(), {}
        lock = threading.Lock()

        def init() -> None:
            import cupy

            try:
                with cupy.cuda.Device(index):
                    try:
                        comm = nccl.NcclCommunicator(num_ranks, uid, rank)
                    except TypeError:  # cupy < 14 takes the id as a tuple of 128 signed chars
                        comm = nccl.NcclCommunicator(num_ranks, tuple(b - 256 if b > 127 else b for b in uid), rank)
                    if num_ranks == 2:
                        _warm_up(nccl, comm, 1 - rank, stream)
            except Exception as e:
                result["error"] = e
            else:
                with lock:
                    if done.is_set():  # abandoned at the deadline: nobody will use it
                        comm.abort()
                        return
                    result["comm"] = comm
            done.set()

        threading.Thread(target=init, name="pdserve-nccl-init", daemon=True).start()
        done.wait(timeout_s)
        with lock:
            done.set()
            if "comm" in result:
                return cls(nccl, result["comm"], stream, 1 - rank if num_ranks == 2 else rank)
        why = result.get("error") or f"not every rank joined within {timeout_s:.1f} s"
        raise TransferError(f"the NCCL communicator (rank {rank}) did not form: {why}")

    def send(self, tensor: torch.Tensor) -> Pending:
        return self._post(self._comm.send, tensor)

    def recv(self, tensor: torch.Tensor) -> Pending:
        return self._post(self._comm.recv, tensor)

    def _post(self, op: Any, tensor: torch.Tensor) -> Pending:
        self.check()
        try:
            op(tensor.data_ptr(), _nbytes(tensor), self._nccl.NCCL_UINT8, self._peer, self.stream_handle)
        except self._nccl.NcclError as e:
            raise TransferError(f"NCCL: {e}") from e
        event = torch.cuda.Event()
        event.record(self._stream)
        return _NcclPending(self, event, tensor)

    def stream(self) -> torch.cuda.StreamContext:
        return torch.cuda.stream(self._stream)

    @property
    def is_stream_ordered(self) -> bool:
        return True

    def wait_for(self, event: torch.cuda.Event | None = None) -> None:
        if event is None:
            self._stream.wait_stream(torch.cuda.current_stream(self._device))
        else:
            self._stream.wait_event(event)

    def synchronize(self) -> None:
        self._stream.synchronize()

    def check(self) -> None:
        """TransferError if the communicator met an asynchronous error (a peer vanished, a network fault) or was
        aborted."""
        with self._lock:
            if self._is_closed:
                raise TransferError("the NCCL communicator was aborted")
            try:
                self._comm.check_async_error()
            except self._nccl.NcclError as e:
                raise TransferError(f"NCCL: {e}") from e

    def abort(self) -> None:
        """ncclCommAbort: pending operations end. Idempotent, and safe from another thread."""
        with self._lock:
            if self._is_closed:
                return
            self._is_closed = True
            self._comm.abort()

    def close(self) -> None:
        # Abort, not destroy: nothing is pending, and ncclCommDestroy's finalize can wait on a peer that is gone.
        self.abort()


class _NcclPending(Pending):
    def __init__(self, comm: NcclCommunicator, event: torch.cuda.Event, tensor: torch.Tensor) -> None:
        self._comm, self._event, self._tensor = comm, event, tensor  # the tensor lives until the operation ended

    def wait(self, deadline: Deadline, what: str) -> None:
        pause = _POLL_S[0]
        while not self._event.query():
            self._comm.check()
            if time.monotonic() >= deadline.at:
                raise TransferError(f"deadline passed before {what}")
            time.sleep(pause)
            pause = min(2 * pause, _POLL_S[1])
        self._comm.check()


class _PairStream:
    """A CUDA stream of the pair's own, not from torch's pool (which hands out a few dozen streams round-robin: two
    pairs sharing one would queue one's receives behind the other's slow, layer-by-layer transfer)."""

    def __init__(self, index: int) -> None:
        import cupy

        with cupy.cuda.Device(index):
            self.cupy = cupy.cuda.Stream(non_blocking=True)
        self.handle: int = self.cupy.ptr
        self.torch = torch.cuda.ExternalStream(self.handle, device=torch.device("cuda", index))


def _warm_up(nccl: Any, comm: Any, peer: int, stream: _PairStream) -> None:
    """One grouped 1-byte send and receive with the peer (both ranks at once): NCCL connects the pair."""
    out = torch.zeros(1, dtype=torch.uint8, device=stream.torch.device)
    into = torch.empty_like(out)
    nccl.groupStart()
    comm.send(out.data_ptr(), 1, nccl.NCCL_UINT8, peer, stream.handle)
    comm.recv(into.data_ptr(), 1, nccl.NCCL_UINT8, peer, stream.handle)
    nccl.groupEnd()
    stream.cupy.synchronize()


def unique_id_bytes(uid: bytes | tuple[int, ...]) -> bytes:
    """NCCL's 128-byte unique id as bytes (cupy 14 returns bytes, older versions a tuple of signed chars)."""
    return uid if isinstance(uid, bytes) else bytes(c & 0xFF for c in uid)


def _nbytes(tensor: torch.Tensor) -> int:
    assert tensor.is_contiguous() and tensor.is_cuda
    return tensor.numel() * tensor.element_size()
