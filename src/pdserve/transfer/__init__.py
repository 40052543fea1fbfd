"""KV transports: push a request's KV blocks from a prefill replica into a decode replica's reserved blocks
(host memory: shared memory on one node, TCP across nodes; GPU: CUDA IPC on one GPU, NCCL between GPUs; see base.py
for the contract and docs/TRANSFER.md)."""

from pdserve.transfer.auto import AutoSender, make_receiver, make_sender
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
from pdserve.transfer.cuda_ipc import CudaIpcReceiver, CudaIpcSender
from pdserve.transfer.gloo import GlooBackend
from pdserve.transfer.p2p import P2PReceiver, P2PSender
from pdserve.transfer.shm import SharedMemoryReceiver, SharedMemorySender
from pdserve.transfer.tcp import TcpReceiver, TcpSender

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
