"""Picking the transport per destination (prefill side), and serving every transport a cache allows (decode side)."""

from __future__ import annotations

import logging
import threading
from dataclasses import replace

from pdserve.kvcache import KVCache
from pdserve.transfer.base import (
    GPU_TRANSPORTS,
    TRANSPORTS,
    KVEndpoint,
    KVReceiver,
    KVSender,
    LayerProgress,
    TransferSpec,
    TransferStats,
    choose_transport,
)
from pdserve.transfer.cuda_ipc import CudaIpcReceiver, CudaIpcSender, device_uuid
from pdserve.transfer.gloo import GlooBackend
from pdserve.transfer.p2p import DEFAULT_MAX_PAIRS, P2PReceiver, P2PSender
from pdserve.transfer.shm import SharedMemoryReceiver, SharedMemorySender
from pdserve.transfer.tcp import TcpReceiver, TcpSender

logger = logging.getLogger(__name__)


class AutoSender(KVSender):
    """Sends over the transport `choose_transport` picks for each destination (by topology, or the one forced by
    `prefer`). With "auto", a same-node destination whose shared memory this process cannot map (another
    container, say) is reached over TCP. Each transport's sender is made on first use."""

    def __init__(self, model_id: str, node_id: str, prefer: str = "auto", max_pairs: int = DEFAULT_MAX_PAIRS) -> None:
        if prefer not in ("auto", *TRANSPORTS):
            raise ValueError(f"KV transport must be one of auto, {', '.join(TRANSPORTS)}, not {prefer!r}")
        self.model_id, self.node_id, self.prefer, self.max_pairs = model_id, node_id, prefer, max_pairs
        self.senders: dict[str, KVSender] = {}
        self._lock = threading.Lock()
        self._unmappable: set[str] = set()  # cache ids whose shared memory failed to map here: not retried

    def send(
        self,
        endpoint: KVEndpoint,
        spec: TransferSpec,
        src: KVCache,
        timeout_s: float,
        progress: LayerProgress | None = None,
    ) -> TransferStats:
        is_gpu = src.flat.device.type == "cuda"
        name = choose_transport(endpoint, self.node_id, self.prefer, device_uuid(src.flat.device) if is_gpu else None)
        if name == "shm" and self.prefer == "auto" and endpoint.tcp_address and not self._can_map(endpoint):
            name = "tcp"
        return self.sender(name).send(endpoint, spec, src, timeout_s, progress)

    def sender(self, name: str) -> KVSender:
        with self._lock:
            if name not in self.senders:
                self.senders[name] = _new_sender(name, self.model_id, self.max_pairs)
            return self.senders[name]

    def close(self) -> None:
        with self._lock:
            senders = list(self.senders.values())
        for sender in senders:
            sender.close()

    def _can_map(self, endpoint: KVEndpoint) -> bool:
        if endpoint.cache_id in self._unmappable:
            return False
        shm = self.sender("shm")
        assert isinstance(shm, SharedMemorySender)
        if shm.can_map(endpoint):
            return True
        self._unmappable.add(endpoint.cache_id)
        return False


def _new_sender(name: str, model_id: str, max_pairs: int) -> KVSender:
    if name == "shm":
        return SharedMemorySender(model_id)
    if name == "tcp":
        return TcpSender(model_id)
    if name == "cuda_ipc":
        return CudaIpcSender(model_id)
    if name == "gloo":
        return P2PSender(model_id, GlooBackend(), max_pairs)
    assert name == "nccl", name
    from pdserve.transfer.nccl import NcclBackend

    return P2PSender(model_id, NcclBackend(), max_pairs)


def make_sender(transport: str, model_id: str, node_id: str, max_pairs: int = DEFAULT_MAX_PAIRS) -> KVSender:
    """The prefill side's sender: "auto" picks per destination (same GPU: CUDA IPC, other GPUs: NCCL; same
    node: shared memory, other nodes: TCP); any transport name forces that one."""
    return AutoSender(model_id, node_id, transport, max_pairs)


class _Receivers(KVReceiver):
    """One cache served over several transports: one endpoint listing them all (they share its cache id)."""

    def __init__(self, *receivers: KVReceiver) -> None:
        self.receivers = receivers
        served = {
            name: getattr(r.endpoint, name)
            for r in receivers
            for name in _ADDRESSES
            if getattr(r.endpoint, name) is not None
        }
        self.endpoint = replace(receivers[0].endpoint, **served)

    def close(self) -> None:
        for receiver in self.receivers:
            receiver.close()

    @property
    def num_fenced(self) -> int:
        return sum(r.num_fenced for r in self.receivers)


_ADDRESSES = ("shm_path", "tcp_address", "cuda_ipc", "p2p_address", "p2p_backend")


def make_receiver(
    transport: str,
    kv: KVCache,
    model_id: str,
    node_id: str,
    host: str = "127.0.0.1",
    port: int = 0,
    advertise_host: str | None = None,
    max_pairs: int = DEFAULT_MAX_PAIRS,
) -> KVReceiver:
    """The decode side's receiver. A cache on a GPU: "auto" serves CUDA IPC (same-GPU peers) and NCCL (the rest;
    when cupy is installed), "cuda_ipc" or "nccl" only that one. In host memory: "auto" serves shared memory (when
    `kv` is shared) and TCP, "shm", "tcp" or "gloo" only that one. Listeners bind `host:port`; peers on other
    nodes reach them at `advertise_host` (needed when `host` binds every interface). ValueError on a
    configuration that cannot work."""
    if transport not in ("auto", *TRANSPORTS):
        raise ValueError(f"KV transport must be one of auto, {', '.join(TRANSPORTS)}, not {transport!r}")
    is_gpu = kv.flat.device.type == "cuda"
    if (transport in GPU_TRANSPORTS) != is_gpu and transport != "auto":
        where = "a GPU" if is_gpu else "host memory"
        raise ValueError(f"the {transport} KV transport cannot serve a KV cache in {where}")
    listen = {"host": host, "port": port, "node_id": node_id, "model_id": model_id, "advertise_host": advertise_host}
    if is_gpu:
        ipc = CudaIpcReceiver(kv, node_id, model_id) if transport in ("auto", "cuda_ipc") else None
        if transport == "cuda_ipc" or (transport == "auto" and not _has_nccl()):
            assert ipc is not None
            return ipc
        from pdserve.transfer.nccl import NcclBackend

        cache_id = ipc.endpoint.cache_id if ipc is not None else None
        nccl = P2PReceiver(kv, NcclBackend(), **listen, max_pairs=max_pairs, cache_id=cache_id)  # type: ignore[arg-type]
        return nccl if ipc is None else _Receivers(ipc, nccl)
    if transport == "shm":
        return SharedMemoryReceiver(kv, node_id, model_id)
    if transport == "gloo":
        return P2PReceiver(kv, GlooBackend(), **listen, max_pairs=max_pairs)  # type: ignore[arg-type]
    tcp = TcpReceiver(kv, **listen)  # type: ignore[arg-type]
    if transport == "auto" and kv.is_shared:
        return _Receivers(SharedMemoryReceiver(kv, node_id, model_id), tcp)
    return tcp


def _has_nccl() -> bool:
    try:
        from pdserve.transfer.nccl import NcclBackend

        NcclBackend()
    except ImportError:
        logger.warning("cupy with NCCL is not installed: this GPU KV cache is reachable over CUDA IPC only")
        return False
    return True
