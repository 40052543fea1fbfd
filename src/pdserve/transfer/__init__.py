"""KV transports: push a request's KV blocks from a prefill replica into a decode replica's reserved blocks
(shared memory on one node, TCP across nodes; see base.py for the contract)."""

from pdserve.transfer.auto import AutoSender, make_receiver, make_sender
from pdserve.transfer.base import (
    CudaIpcHandle,
    Deadline,
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
from pdserve.transfer.cuda_ipc import CudaIpcReceiver, CudaIpcSender
from pdserve.transfer.shm import SharedMemoryReceiver, SharedMemorySender
from pdserve.transfer.tcp import TcpReceiver, TcpSender

__all__ = [
    "AutoSender",
    "CudaIpcHandle",
    "CudaIpcReceiver",
    "CudaIpcSender",
    "Deadline",
    "KVEndpoint",
    "KVLayoutSpec",
    "KVReceiver",
    "KVSender",
    "LayerProgress",
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
