"""CUDA IPC: prefill and decode replicas on the same GPU. The decode replica exports IPC handles of its KV tensor
and arrival stamps once, and moves its write permits into shared host memory; the prefill replica opens them once
and copies the blocks GPU to GPU on its own stream (every layer in one gather and one scatter), then stamps the
epoch on the same stream — the stamps can never land before the blocks.

The write fence (kvcache/layout.py) binds this writer as it binds a shm one: before each copy it checks that the
reservation is still open to its epoch and has time left, and each copy is launched only once the prefill's KV it
reads is computed (the host waits for it), then waited for, so no copy lands long after its check — well inside
the grace the decode replica keeps a revoked reservation's blocks from reuse (`fence_grace_s`).

Handles come from torch's own CUDA IPC (`torch.multiprocessing.reductions`); the exporting replica keeps the
tensors alive for as long as it serves them.
"""

from __future__ import annotations

import pickle
import threading
import time
import uuid
from typing import Any

import torch
from torch.multiprocessing.reductions import reduce_tensor

from pdserve.kvcache import KVCache
from pdserve.transfer.base import (
    CudaIpcHandle,
    Deadline,
    KVEndpoint,
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


def device_uuid(device: torch.device) -> str:
    return str(torch.cuda.get_device_properties(device).uuid)


class CudaIpcReceiver(KVReceiver):
    def __init__(self, kv: KVCache, node_id: str, model_id: str) -> None:
        device = kv.flat.device
        if device.type != "cuda":
            raise ValueError(f"CUDA IPC serves a KV cache on a GPU, not on {device}")
        self.kv = kv  # kept alive: peers map its memory
        permits = kv.share_permits()
        handle = CudaIpcHandle(device_uuid(device), _export(kv.flat), _export(kv.block_epochs), permits)
        self.endpoint = KVEndpoint(
            node_id, layout_spec(kv.layout, model_id), kv.layout.num_blocks, uuid.uuid4().hex, cuda_ipc=handle
        )

    def close(self) -> None:
        pass  # the memory is the cache's: freed with it


class CudaIpcSender(KVSender):
    """Maps each destination cache once (per cache id) and copies on a dedicated stream per device."""

    def __init__(self, model_id: str) -> None:
        self.model_id = model_id
        self._mapped: dict[str, KVCache] = {}
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._lock = threading.Lock()

    def send(
        self,
        endpoint: KVEndpoint,
        spec: TransferSpec,
        src: KVCache,
        timeout_s: float,
        progress: LayerProgress | None = None,
    ) -> TransferStats:
        start, deadline = time.perf_counter(), Deadline(timeout_s)
        check_compatible(layout_spec(src.layout, self.model_id), endpoint.spec)
        spec.check_ranges(src.layout.num_blocks, endpoint.num_blocks)
        dst = self.map(endpoint, src.flat.device)
        stream = self._stream(src.flat.device)
        src_index = torch.tensor(list(spec.src_block_ids), dtype=torch.long, device=src.flat.device)
        dst_index = torch.tensor(list(spec.dst_block_ids), dtype=torch.long, device=src.flat.device)
        src_planes, dst_planes = planes(src), planes(dst)
        # Without layer pipelining every layer's K and V move at once: one gather and one scatter (per-layer copies
        # are 120 small kernels for SmolLM2: launch-bound at ~20 GB/s on an H100). With it, a layer per copy, each
        # after that layer's CUDA event on the engine's stream.
        per_copy = 1 if progress is not None else src.layout.num_layers
        layer_s = []
        for a, b in layer_chunks(src.layout.num_layers, per_copy):
            if progress is not None:
                progress.wait_layer(b - 1, deadline)
                computed = progress.event(b - 1)
            else:
                computed = torch.cuda.current_stream(src.flat.device).record_event()  # the prefill's kernels
            if computed is not None:
                computed.synchronize()  # here, not on the copy stream: the fence is checked just before the copy
            ready = time.perf_counter()
            deadline.remaining_s(f"the copy of layers {a}-{b - 1} of {spec.transfer_id}")
            fence_deadline(dst, spec.dst_block_ids, spec.epoch, f"layers {a}-{b - 1}")  # never into blocks maybe freed
            with torch.cuda.stream(stream):
                dst_planes[a:b].index_copy_(2, dst_index, src_planes[a:b].index_select(2, src_index))
            stream.synchronize()  # landed before the next check
            layer_s.append(time.perf_counter() - ready)
        fence_deadline(dst, spec.dst_block_ids, spec.epoch, "the arrival stamps")
        with torch.cuda.stream(stream):
            dst.block_epochs.index_fill_(0, dst_index, spec.epoch)  # after the blocks, in stream order
        stream.synchronize()  # in place on return: the caller then tells the decode replica to commit
        num = len(spec.dst_block_ids)
        seconds = time.perf_counter() - start
        return TransferStats(num, num * src.layout.bytes_per_block, seconds, "cuda_ipc", tuple(layer_s))

    def map(self, endpoint: KVEndpoint, device: torch.device) -> KVCache:
        """The destination cache, mapped here once. TransferError if it lives on another GPU or node."""
        handle = endpoint.cuda_ipc
        if handle is None:
            raise TransferError("the decode replica does not serve its KV over CUDA IPC")
        if handle.device_uuid != device_uuid(device):
            raise TransferError(f"CUDA IPC needs the same GPU: the decode replica's KV is on {handle.device_uuid}")
        with self._lock:
            if endpoint.cache_id not in self._mapped:
                flat, epochs = _open(handle.kv), _open(handle.epochs)  # first: a dead peer's handles fail to open
                try:
                    permits = KVCache.open_permits(handle.permits, endpoint.num_blocks)
                except (OSError, ValueError) as e:
                    raise TransferError(f"cannot map the decode replica's KV write permits: {e}") from e
                self._mapped[endpoint.cache_id] = KVCache.from_tensors(endpoint.layout(), flat, epochs, permits)
            return self._mapped[endpoint.cache_id]

    def close(self) -> None:
        with self._lock:
            self._mapped.clear()

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        with self._lock:
            if device not in self._streams:
                self._streams[device] = torch.cuda.Stream(device)
            return self._streams[device]


def _export(tensor: torch.Tensor) -> bytes:
    rebuild, args = reduce_tensor(tensor)
    return pickle.dumps((rebuild, args))


def _open(exported: bytes) -> torch.Tensor:
    rebuild, args = pickle.loads(exported)
    tensor: Any = rebuild(*args)
    return tensor
