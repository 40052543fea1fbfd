"""KV transports: push a request's KV blocks from a prefill replica into a decode replica's reserved blocks."""

from __future__ import annotations

from pdserve.kvcache import KVCache
from pdserve.transfer.base import (
    KVEndpoint,
    KVLayoutSpec,
    KVReceiver,
    KVSender,
    TransferError,
    TransferSpec,
    TransferStats,
    check_compatible,
    layout_spec,
)
from pdserve.transfer.shm import SharedMemoryReceiver, SharedMemorySender
from pdserve.transfer.tcp import TcpReceiver, TcpSender

__all__ = [
    "KVEndpoint",
    "KVLayoutSpec",
    "KVReceiver",
    "KVSender",
    "SharedMemoryReceiver",
    "SharedMemorySender",
    "TcpReceiver",
    "TcpSender",
    "TransferError",
    "TransferSpec",
    "TransferStats",
    "check_compatible",
    "layout_spec",
    "make_receiver",
    "make_sender",
]


class AutoSender(KVSender):
    """Picks per destination: shared memory on the same node when the endpoint offers it, else TCP."""

    def __init__(self, model_id: str, node_id: str, transport: str = "auto") -> None:
        self.node_id, self.transport = node_id, transport
        self.shm, self.tcp = SharedMemorySender(model_id), TcpSender(model_id)

    def send(self, endpoint: KVEndpoint, spec: TransferSpec, src: KVCache, timeout_s: float) -> TransferStats:
        same_node = endpoint.node_id == self.node_id and endpoint.shm_path is not None
        if self.transport == "shm" or (self.transport == "auto" and same_node):
            return self.shm.send(endpoint, spec, src, timeout_s)
        return self.tcp.send(endpoint, spec, src, timeout_s)

    def close(self) -> None:
        self.shm.close()
        self.tcp.close()


def make_sender(transport: str, model_id: str, node_id: str) -> KVSender:
    return AutoSender(model_id, node_id, transport)


def make_receiver(transport: str, kv: KVCache, model_id: str, node_id: str, host: str = "127.0.0.1") -> KVReceiver:
    """'shm': publish the shared cache only; 'tcp' or 'auto': also listen on TCP (auto serves both)."""
    if transport == "shm":
        assert kv.shared_path is not None, "the shm transport needs a shared-memory KV cache"
        spec = layout_spec(kv.layout, model_id)
        return SharedMemoryReceiver(kv, KVEndpoint(node_id, spec, kv.layout.num_blocks, kv.shared_path, None))
    return TcpReceiver(kv, node_id, model_id, host=host)
