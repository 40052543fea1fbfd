"""Picking the transport per destination (prefill side), and serving every transport a cache allows (decode side)."""

from __future__ import annotations

from dataclasses import replace

from pdserve.kvcache import KVCache
from pdserve.transfer.base import (
    TRANSPORTS,
    KVEndpoint,
    KVReceiver,
    KVSender,
    LayerProgress,
    TransferSpec,
    TransferStats,
    choose_transport,
)
from pdserve.transfer.cuda_ipc import CudaIpcReceiver, CudaIpcSender
from pdserve.transfer.shm import SharedMemoryReceiver, SharedMemorySender
from pdserve.transfer.tcp import TcpReceiver, TcpSender


class AutoSender(KVSender):
    """Sends over the transport `choose_transport` picks for each destination. With "auto", a same-node
    destination whose shared memory this process cannot map (another container, say) is reached over TCP."""

    def __init__(self, model_id: str, node_id: str, prefer: str = "auto") -> None:
        if prefer not in ("auto", *TRANSPORTS):
            raise ValueError(f"KV transport must be one of auto, shm, tcp, not {prefer!r}")
        self.node_id, self.prefer = node_id, prefer
        self.shm, self.tcp = SharedMemorySender(model_id), TcpSender(model_id)
        self.cuda_ipc: CudaIpcSender | None = None  # made on first use: it needs CUDA
        self._unmappable: set[str] = set()  # cache ids whose shared memory failed to map here: not retried

    def send(
        self,
        endpoint: KVEndpoint,
        spec: TransferSpec,
        src: KVCache,
        timeout_s: float,
        progress: LayerProgress | None = None,
    ) -> TransferStats:
        if src.flat.device.type == "cuda":  # GPU KV moves GPU to GPU (same GPU: IPC; NCCL across is its own issue)
            self.cuda_ipc = self.cuda_ipc or CudaIpcSender(self.shm.model_id)
            return self.cuda_ipc.send(endpoint, spec, src, timeout_s, progress)
        name = choose_transport(endpoint, self.node_id, self.prefer)
        if name == "shm" and self.prefer == "auto" and endpoint.tcp_address and not self._can_map(endpoint):
            name = "tcp"
        return (self.shm if name == "shm" else self.tcp).send(endpoint, spec, src, timeout_s, progress)

    def close(self) -> None:
        self.shm.close()
        self.tcp.close()
        if self.cuda_ipc is not None:
            self.cuda_ipc.close()

    def _can_map(self, endpoint: KVEndpoint) -> bool:
        if endpoint.cache_id in self._unmappable:
            return False
        if self.shm.can_map(endpoint):
            return True
        self._unmappable.add(endpoint.cache_id)
        return False


def make_sender(transport: str, model_id: str, node_id: str) -> KVSender:
    """The prefill side's sender: `transport` "auto" (shm on the same node, else tcp), "shm" or "tcp"."""
    return AutoSender(model_id, node_id, transport)


class _Receivers(KVReceiver):
    """One cache served over shared memory and TCP: one endpoint listing both."""

    def __init__(self, shm: SharedMemoryReceiver, tcp: TcpReceiver) -> None:
        self.shm, self.tcp = shm, tcp
        self.endpoint = replace(tcp.endpoint, shm_path=shm.endpoint.shm_path)

    def close(self) -> None:
        self.tcp.close()
        self.shm.close()


def make_receiver(
    transport: str,
    kv: KVCache,
    model_id: str,
    node_id: str,
    host: str = "127.0.0.1",
    port: int = 0,
    advertise_host: str | None = None,
) -> KVReceiver:
    """The decode side's receiver: "shm" publishes the shared cache only; "tcp" listens on `host:port`; "auto"
    does both when `kv` is in shared memory, else TCP only. Peers on other nodes reach the listener at
    `advertise_host` (needed when `host` binds every interface). ValueError on a configuration that cannot work."""
    if kv.flat.device.type == "cuda":
        if transport != "auto":
            raise ValueError(f"a KV cache on a GPU is served over CUDA IPC (transport auto), not {transport}")
        return CudaIpcReceiver(kv, node_id, model_id)
    if transport == "shm":
        return SharedMemoryReceiver(kv, node_id, model_id)
    if transport not in ("auto", "tcp"):
        raise ValueError(f"KV transport must be one of auto, shm, tcp, not {transport!r}")
    tcp = TcpReceiver(kv, host, port, node_id=node_id, model_id=model_id, advertise_host=advertise_host)
    if transport == "auto" and kv.is_shared:
        return _Receivers(SharedMemoryReceiver(kv, node_id, model_id), tcp)
    return tcp
