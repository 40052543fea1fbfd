"""gloo (torch.distributed) communicators for the point-to-point KV transport (p2p.py) between hosts: the CPU twin
of NCCL, so the protocol, pooling, deadlines and aborts run for real without a GPU. Each pair is a stateless
2-rank `ProcessGroupGloo` (no global process group): rank 0 (the decode side) hosts the pair's `TCPStore`, whose
address is the unique id."""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from pdserve.transfer.base import Deadline, TransferError
from pdserve.transfer.p2p import Backend, Communicator, Pending, Rendezvous


class GlooBackend(Backend):
    name, device_type = "gloo", "cpu"

    def root(self, host: str, device: torch.device) -> Rendezvous:
        return _GlooRendezvous(host)

    def join(self, unique_id: str, host: str, device: torch.device, timeout_s: float) -> Communicator:
        try:
            info = json.loads(unique_id)
            store = dist.TCPStore(info["host"], int(info["port"]), 2, is_master=False, timeout=_seconds(timeout_s))
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            raise TransferError(f"could not reach the gloo rendezvous {unique_id!r}: {e}") from e
        return _GlooCommunicator.build(store, info["prefix"], 1, host, timeout_s)


class _GlooRendezvous(Rendezvous):
    def __init__(self, host: str) -> None:
        self._host = host
        # The store listens on the control link's interface only (`kv_host`): given its own port, TCPStore binds
        # every interface, an open door to the pair's rendezvous keys. It takes over the socket (and closes it).
        listener = socket.create_server((host, 0), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
        port, fd = listener.getsockname()[1], listener.detach()
        try:
            self._store = dist.TCPStore(
                host, port, 2, is_master=True, wait_for_workers=False, timeout=_seconds(60), master_listen_fd=fd
            )
        except BaseException:
            os.close(fd)
            raise
        self._prefix = secrets.token_hex(8)
        self.unique_id = json.dumps({"host": host, "port": self._store.port, "prefix": self._prefix})

    def connect(self, timeout_s: float) -> Communicator:
        self._store.set_timeout(_seconds(timeout_s))
        return _GlooCommunicator.build(self._store, self._prefix, 0, self._host, timeout_s)


class _GlooCommunicator(Communicator):
    def __init__(self, group: Any, store: dist.TCPStore, rank: int) -> None:  # a ProcessGroupGloo (untyped)
        self._group, self._store, self._peer = group, store, 1 - rank
        self._lock = threading.Lock()
        self._is_closed = False

    @classmethod
    def build(cls, store: dist.TCPStore, prefix: str, rank: int, host: str, timeout_s: float) -> _GlooCommunicator:
        gloo: Any = dist.ProcessGroupGloo
        options = gloo._Options()
        options._devices = [gloo.create_device(hostname=host)]  # the control link's interface
        options._timeout = _seconds(timeout_s)
        try:
            group = gloo(dist.PrefixStore(prefix, store), rank, 2, options)
        except RuntimeError as e:
            raise TransferError(f"the gloo pair (rank {rank}) did not connect: {e}") from e
        return cls(group, store, rank)

    def send(self, tensor: torch.Tensor) -> Pending:
        return self._post("send", tensor)

    def recv(self, tensor: torch.Tensor) -> Pending:
        return self._post("recv", tensor)

    def _post(self, op: str, tensor: torch.Tensor) -> Pending:
        try:
            work = getattr(self._group, op)([tensor], self._peer, 0)
        except RuntimeError as e:  # the pair is already broken (the peer closed it)
            raise TransferError(f"gloo {op}: {e}") from e
        return _GlooWork(work, tensor)

    def abort(self) -> None:
        """Close its connections: the peer's pending operations fail at once (a wait here runs to its timeout:
        gloo does not wake it). Idempotent; safe from another thread."""
        with self._lock:
            if self._is_closed:
                return
            self._is_closed = True
            self._group.abort()

    def close(self) -> None:
        self.abort()  # nothing is pending: this just closes the pair's sockets


class _GlooWork(Pending):
    def __init__(self, work: dist.Work, tensor: torch.Tensor) -> None:
        self._work, self._tensor = work, tensor  # the tensor stays alive until the operation completed

    def wait(self, deadline: Deadline, what: str) -> None:
        try:
            is_done = self._work.wait(_seconds(deadline.remaining_s(what)))
        except RuntimeError as e:
            raise TransferError(f"not done before {what}: {e}") from e
        if is_done is False:  # an aborted operation may end without raising: its buffer is not filled
            raise TransferError(f"the operation failed before {what}")


def _seconds(s: float) -> timedelta:
    return timedelta(seconds=max(s, 0.001))
