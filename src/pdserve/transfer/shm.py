"""Same-node transport: the decode replica's KV cache lives in shared memory; the prefill replica maps it once and
copies its blocks straight into the reserved ones (one memcpy per run of blocks consecutive on both sides, or one
gather and scatter per layer's K and V when the runs are short)."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pdserve.kvcache import KVCache
from pdserve.transfer.base import (
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
    is_scattered,
    layout_spec,
    paired_runs,
    require_host_memory,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Mapping:
    cache: KVCache
    inode: tuple[int, int]  # (device, inode) of the shared file: a recycled /proc/<pid>/fd path names another


class SharedMemorySender(KVSender):
    """Maps each destination cache once (page tables populated up front) and keeps the mapping while its owner
    lives; a mapping whose owner is gone is dropped when the next one is made, so its memory is freed."""

    def __init__(self, model_id: str) -> None:
        self.model_id = model_id
        self._mapped: dict[str, _Mapping] = {}  # by shm path
        self._lock = threading.Lock()  # sends run in worker threads; only the mapping table is shared

    def send(
        self,
        endpoint: KVEndpoint,
        spec: TransferSpec,
        src: KVCache,
        timeout_s: float,
        progress: LayerProgress | None = None,
    ) -> TransferStats:
        start, deadline = time.perf_counter(), Deadline(timeout_s)
        require_host_memory(src)
        check_compatible(layout_spec(src.layout, self.model_id), endpoint.spec)
        spec.check_ranges(src.layout.num_blocks, endpoint.num_blocks)
        dst = self.map(endpoint)
        copy = _block_copier(spec, src)
        layer_s = []
        for layer in range(src.layout.num_layers):
            if progress is not None:
                progress.wait_layer(layer, deadline)
            layer_start = time.perf_counter()
            deadline.remaining_s(f"layer {layer} of {spec.transfer_id}")
            fence_deadline(dst, spec.dst_block_ids, spec.epoch, f"layer {layer}")  # never into blocks maybe freed
            copy(src.k[layer], dst.k[layer])
            copy(src.v[layer], dst.v[layer])
            layer_s.append(time.perf_counter() - layer_start)
        fence_deadline(dst, spec.dst_block_ids, spec.epoch, "the arrival stamps")
        dst.block_epochs[list(spec.dst_block_ids)] = spec.epoch  # after every layer: the blocks are complete
        num = len(spec.dst_block_ids)
        seconds = time.perf_counter() - start
        return TransferStats(num, num * src.layout.bytes_per_block, seconds, "shm", tuple(layer_s))

    def map(self, endpoint: KVEndpoint) -> KVCache:
        """The endpoint's cache, mapped here (once). TransferError if it cannot be mapped or is another cache."""
        path = endpoint.shm_path
        if path is None:
            raise TransferError("the decode replica has no shared-memory KV cache")
        with self._lock:
            # A decode replica that left (its file unlinked or replaced): unmapped here at the next push to anyone,
            # so its memory goes back to the node (a stat per mapped cache).
            self._forget_dead()
            mapping = self._mapped.get(path)
            if mapping is not None and mapping.cache.shared_id != endpoint.cache_id:
                # the path was recycled for another cache (mapped for its own endpoint): the stale endpoint's ids
                # would index a cache of another size (an IndexError, not a TransferError; found in review)
                raise TransferError(f"{path} is no longer the KV cache of that endpoint (its owner restarted?)")
            if mapping is not None:
                return mapping.cache
            mapping = self._mapped[path] = _open(endpoint)
            return mapping.cache

    def can_map(self, endpoint: KVEndpoint) -> bool:
        """Whether this process can map the endpoint's cache (e.g. not across containers); logs why not."""
        try:
            self.map(endpoint)
        except TransferError as e:
            logger.warning("cannot use shared memory to reach node %s: %s", endpoint.node_id, e)
            return False
        return True

    def _forget_dead(self) -> None:
        for path, mapping in list(self._mapped.items()):
            if _inode(path) != mapping.inode:
                del self._mapped[path]

    def close(self) -> None:
        with self._lock:
            self._mapped.clear()


class SharedMemoryReceiver(KVReceiver):
    """Passive: senders on the same node map the cache and write into it themselves; this only publishes where it
    is. `close()` closes the cache's shared descriptor (no new sender can map it)."""

    def __init__(self, kv: KVCache, node_id: str, model_id: str) -> None:
        if kv.shared_address is None or kv.shared_id is None:
            raise ValueError("the shm KV transport needs a KV cache in shared memory (CacheConfig.shared_path)")
        self.kv = kv
        spec = layout_spec(kv.layout, model_id)
        self.endpoint = KVEndpoint(node_id, spec, kv.layout.num_blocks, kv.shared_id, shm_path=kv.shared_address)

    def close(self) -> None:
        self.kv.close()


def _block_copier(spec: TransferSpec, src: KVCache) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """copy(src_kv, dst_kv) of the spec's blocks of one layer's K or V: one memcpy per run of blocks consecutive on
    both sides, or, for many short runs, one gather and one scatter."""
    pieces = paired_runs(spec.src_block_ids, spec.dst_block_ids)
    if not is_scattered(len(pieces), len(spec.dst_block_ids)):

        def copy_runs(src_kv: torch.Tensor, dst_kv: torch.Tensor) -> None:
            for s, d, n in pieces:
                dst_kv[d : d + n].copy_(src_kv[s : s + n])

        return copy_runs
    src_index = torch.tensor(spec.src_block_ids, dtype=torch.long)
    dst_index = torch.tensor(spec.dst_block_ids, dtype=torch.long)
    rows = torch.empty((len(spec.src_block_ids), *src.layout.block_shape), dtype=src.layout.dtype)

    def copy_indexed(src_kv: torch.Tensor, dst_kv: torch.Tensor) -> None:
        dst_kv.index_copy_(0, dst_index, torch.index_select(src_kv, 0, src_index, out=rows))

    return copy_indexed


def _inode(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _open(endpoint: KVEndpoint) -> _Mapping:
    assert endpoint.shm_path is not None
    try:
        cache = KVCache.open_shared(endpoint.layout(), endpoint.shm_path)
        inode = _inode(endpoint.shm_path)
    except (OSError, ValueError) as e:
        raise TransferError(f"cannot map the decode replica's KV cache {endpoint.shm_path}: {e}") from e
    if cache.shared_id != endpoint.cache_id or inode is None:
        raise TransferError(f"{endpoint.shm_path} is no longer the KV cache of that endpoint (its owner restarted?)")
    return _Mapping(cache, inode)
