"""NCCL communicators, through cupy (the `gpu` extra), for the point-to-point KV transport (p2p.py) between GPUs:
K/V go GPU to GPU (NVLink, PCIe peer-to-peer or the network, as NCCL finds) without touching host memory.

Each pair owns a CUDA stream: the gathers, the sends or receives, the scatters and the arrival stamps of a transfer
all run on it, ordered after the prefill's kernels (the current stream, or one CUDA event per layer when the push is
layer-pipelined). A pending operation is a CUDA event polled from the transfer's thread, which also polls the
communicator's asynchronous error, so a dead peer or a passed deadline ends in `abort` (ncclCommAbort) rather than a
hang. Building a communicator blocks in NCCL until both ranks joined; it runs in its own thread so that the
deadline bounds it (one abandoned at the deadline destroys itself if it ever completes).

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

    def __init__(self, nccl: Any, comm: Any, device: torch.device, peer: int) -> None:
        self._nccl, self._comm, self._device, self._peer = nccl, comm, device, peer
        self._stream = torch.cuda.Stream(device)
        self.stream_handle: int = self._stream.cuda_stream

    @classmethod
    def build(
        cls, nccl: Any, uid: bytes, num_ranks: int, rank: int, device: torch.device, timeout_s: float
    ) -> NcclCommunicator:
        """Join communicator `uid` as `rank` of `num_ranks` on `device`; TransferError if it fails or every rank has
        not joined within `timeout_s`."""
        index = torch.device(device).index or 0
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
            except Exception as e:
                result["error"] = e
            else:
                with lock:
                    if done.is_set():  # abandoned at the deadline: nobody will use it
                        comm.destroy()
                        return
                    result["comm"] = comm
            done.set()

        threading.Thread(target=init, name="pdserve-nccl-init", daemon=True).start()
        done.wait(timeout_s)
        with lock:
            done.set()
            if "comm" in result:
                return cls(nccl, result["comm"], torch.device("cuda", index), 1 - rank if num_ranks == 2 else rank)
        error = result.get("error")
        raise TransferError(
            f"the NCCL communicator (rank {rank}) did not form: {error or f'timed out ({timeout_s:.1f} s)'}"
        )

    def send(self, tensor: torch.Tensor) -> Pending:
        return self._post(self._comm.send, tensor)

    def recv(self, tensor: torch.Tensor) -> Pending:
        return self._post(self._comm.recv, tensor)

    def _post(self, op: Any, tensor: torch.Tensor) -> Pending:
        try:
            op(tensor.data_ptr(), _nbytes(tensor), self._nccl.NCCL_UINT8, self._peer, self.stream_handle)
        except self._nccl.NcclError as e:
            raise TransferError(f"NCCL: {e}") from e
        event = torch.cuda.Event()
        event.record(self._stream)
        return _NcclPending(self, event, tensor)

    def stream(self) -> torch.cuda.StreamContext:
        return torch.cuda.stream(self._stream)

    def wait_for(self, event: torch.cuda.Event | None = None) -> None:
        if event is None:
            self._stream.wait_stream(torch.cuda.current_stream(self._device))
        else:
            self._stream.wait_event(event)

    def synchronize(self) -> None:
        self._stream.synchronize()

    def check(self) -> None:
        """TransferError if the communicator met an asynchronous error (a peer vanished, a network fault)."""
        try:
            self._comm.check_async_error()
        except self._nccl.NcclError as e:
            raise TransferError(f"NCCL: {e}") from e

    def abort(self) -> None:
        self._comm.abort()

    def close(self) -> None:
        # Abort, not destroy: nothing is pending, and ncclCommDestroy's finalize can wait on a peer that is gone.
        self._comm.abort()


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


def unique_id_bytes(uid: bytes | tuple[int, ...]) -> bytes:
    """NCCL's 128-byte unique id as bytes (cupy 14 returns bytes, older versions a tuple of signed chars)."""
    return uid if isinstance(uid, bytes) else bytes(c & 0xFF for c in uid)


def _nbytes(tensor: torch.Tensor) -> int:
    assert tensor.is_contiguous() and tensor.is_cuda
    return tensor.numel() * tensor.element_size()
