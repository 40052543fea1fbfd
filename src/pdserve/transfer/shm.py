"""Same-node transport: the decode replica's KV cache lives in shared memory; the prefill replica maps it once and
copies its blocks straight into the reserved ones (one memcpy per run of consecutive blocks)."""

from __future__ import annotations

import time

from pdserve.kvcache import KVCache, KVLayout
from pdserve.transfer.base import (
    KVEndpoint,
    KVReceiver,
    KVSender,
    TransferError,
    TransferSpec,
    TransferStats,
    check_compatible,
    layout_spec,
    runs,
)


class SharedMemorySender(KVSender):
    def __init__(self, model_id: str) -> None:
        self.model_id = model_id
        self._mapped: dict[str, KVCache] = {}

    def send(self, endpoint: KVEndpoint, spec: TransferSpec, src: KVCache, timeout_s: float) -> TransferStats:
        start = time.perf_counter()
        check_compatible(layout_spec(src.layout, self.model_id), endpoint.spec)
        dst = self._map(endpoint, src.layout)
        pieces = runs(spec.src_block_ids, spec.dst_block_ids)
        for layer in range(src.layout.num_layers):
            for s, d, n in pieces:
                dst.k[layer][d : d + n].copy_(src.k[layer][s : s + n])
                dst.v[layer][d : d + n].copy_(src.v[layer][s : s + n])
        dst.block_epochs[spec.dst_block_ids] = spec.epoch  # after every layer: the blocks are complete
        num = len(spec.src_block_ids)
        return TransferStats("shm", num, num * src.layout.bytes_per_block, time.perf_counter() - start)

    def _map(self, endpoint: KVEndpoint, layout: KVLayout) -> KVCache:
        if endpoint.shm_path is None:
            raise TransferError("the decode replica has no shared-memory KV cache")
        if endpoint.shm_path not in self._mapped:
            dst_layout = KVLayout(
                layout.num_layers,
                endpoint.num_blocks,
                layout.block_size,
                layout.num_kv_heads,
                layout.head_dim,
                layout.dtype,
            )
            try:
                self._mapped[endpoint.shm_path] = KVCache.open_shared(dst_layout, endpoint.shm_path)
            except (OSError, ValueError) as e:
                raise TransferError(f"cannot map {endpoint.shm_path}: {e}") from e
        return self._mapped[endpoint.shm_path]

    def close(self) -> None:
        self._mapped.clear()


class SharedMemoryReceiver(KVReceiver):
    """Passive: writers map the cache themselves; this only publishes where it is."""

    def __init__(self, kv: KVCache, endpoint: KVEndpoint) -> None:
        self.kv = kv
        self.endpoint = endpoint

    def close(self) -> None:
        self.kv.close()
