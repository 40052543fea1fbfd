"""KV transports: push a request's KV blocks from a prefill replica into a decode replica's reserved blocks
(host memory: shared memory on one node, TCP across nodes; GPU: CUDA IPC on one GPU, NCCL between GPUs; see base.py
for the contract and docs/TRANSFER.md). The transports (torch) are imported on first use."""

from typing import TYPE_CHECKING

from pdserve.lazy import lazy_exports
from pdserve.transfer.base import (
    CudaIpcHandle,
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
    choose_transport,
    layout_spec,
)

if TYPE_CHECKING:
    from pdserve.transfer.auto import AutoSender, make_receiver, make_sender
    from pdserve.transfer.cuda_ipc import CudaIpcReceiver, CudaIpcSender
    from pdserve.transfer.gloo import GlooBackend
    from pdserve.transfer.p2p import P2PReceiver, P2PSender
    from pdserve.transfer.shm import SharedMemoryReceiver, SharedMemorySender
    from pdserve.transfer.tcp import TcpReceiver, TcpSender

_TRANSPORTS = {
    "auto": ("AutoSender", "make_receiver", "make_sender"),
    "cuda_ipc": ("CudaIpcReceiver", "CudaIpcSender"),
    "gloo": ("GlooBackend",),
    "p2p": ("P2PReceiver", "P2PSender"),
    "shm": ("SharedMemoryReceiver", "SharedMemorySender"),
    "tcp": ("TcpReceiver", "TcpSender"),
}
__getattr__ = lazy_exports(
    __name__, {name: f"pdserve.transfer.{module}" for module, names in _TRANSPORTS.items() for name in names}
)

__all__ = [
    "AutoSender",
    "CudaIpcHandle",
    "CudaIpcReceiver",
    "CudaIpcSender",
    "Deadline",
    "FencedError",
    "GlooBackend",
    "KVEndpoint",
    "KVLayoutSpec",
    "KVReceiver",
    "KVSender",
    "LayerProgress",
    "P2PReceiver",
    "P2PSender",
    "SharedMemoryReceiver",
    "SharedMemorySender",
    "TcpReceiver",
    "TcpSender",
    "TransferError",
    "TransferSpec",
    "TransferStats",
    "check_compatible",
    "choose_transport",
    "layout_spec",
    "make_receiver",
    "make_sender",
]
