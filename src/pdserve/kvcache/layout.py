"""The KV tensors and their layout — the contract the KV transfer relies on.

Per layer, one K and one V tensor, each laid out

    [num_blocks, block_size, num_kv_heads, head_dim]   contiguous, row-major

so block b of layer l is the contiguous slab `k[l][b]` of `block_size * num_kv_heads * head_dim` elements, and
token slot s (= block_id * block_size + offset) is `k[l].view(-1, num_kv_heads, head_dim)[s]`. A transport moves
whole blocks: for each layer, K then V, the blocks in the order of the request's block ids. Two replicas can
exchange blocks only if every field of `KVLayout` matches (the transfer handshake compares them).

Arrival stamps: `block_epochs[b]` holds the epoch of the last transfer that completed block b (all layers, K and
V). A writer stamps a block only after every layer of it is written; the decode side commits a reservation only
if every block it did not already hold carries the reservation's epoch, so it never decodes from partial KV.

Shared memory: with `shared_path`, all K/V tensors live in one file-backed mapping (`/dev/shm`) and the stamps in
a second one, so a prefill replica on the same node can map them (`KVCache.open_shared`) and write blocks
directly. The owner unlinks both files on `close()`; peers keep their mapping until they drop it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVLayout:
    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def block_shape(self) -> tuple[int, int, int]:
        return (self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def bytes_per_block(self) -> int:
        """Bytes of one block across all layers, K and V."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * elem

    @property
    def bytes_per_token(self) -> int:
        return self.bytes_per_block // self.block_size


class KVCache:
    """The K and V tensors of every layer of one replica, and the blocks' arrival stamps."""

    def __init__(self, layout: KVLayout, device: torch.device | str = "cpu", shared_path: str | None = None) -> None:
        self.layout = layout
        self.shared_path = shared_path
        self._is_owner = shared_path is not None
        if shared_path is None:
            flat = torch.zeros(self._num_elements(layout), dtype=layout.dtype, device=device)
            self.block_epochs = torch.zeros(layout.num_blocks, dtype=torch.int64)
        else:
            assert torch.device(device).type == "cpu", "shared-memory KV lives in host memory"
            for path in (shared_path, shared_path + ".epochs"):
                if os.path.exists(path):
                    os.unlink(path)  # a previous owner's leftover: never map stale KV
            flat, self.block_epochs = _map(layout, shared_path)
        self._split(flat)

    @classmethod
    def open_shared(cls, layout: KVLayout, path: str) -> KVCache:
        """Map another process's shared cache (same node) without owning it."""
        if not os.path.exists(path) or os.path.getsize(path) != cls._num_elements(layout) * _elem_size(layout):
            raise ValueError(f"{path} is not a shared KV cache of this layout")
        cache = cls.__new__(cls)
        cache.layout, cache.shared_path, cache._is_owner = layout, path, False
        flat, cache.block_epochs = _map(layout, path)
        cache._split(flat)
        return cache

    def close(self) -> None:
        """Owner: remove the shared files (mappings already open stay valid)."""
        if self._is_owner and self.shared_path is not None:
            for path in (self.shared_path, self.shared_path + ".epochs"):
                if os.path.exists(path):
                    os.unlink(path)
            self._is_owner = False

    @staticmethod
    def _num_elements(layout: KVLayout) -> int:
        return 2 * layout.num_layers * layout.num_blocks * layout.block_size * layout.num_kv_heads * layout.head_dim

    def _split(self, flat: torch.Tensor) -> None:
        shape = (self.layout.num_blocks, *self.layout.block_shape)
        views = flat.view(self.layout.num_layers, 2, *shape)  # per layer: K then V, each contiguous
        self.k = [views[i, 0] for i in range(self.layout.num_layers)]
        self.v = [views[i, 1] for i in range(self.layout.num_layers)]

    def read_blocks(self, layer: int, block_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of layer `layer`'s K and V blocks, `[len(block_ids), block_size, num_kv_heads, head_dim]` each."""
        index = torch.tensor(block_ids, dtype=torch.long, device=self.k[layer].device)
        return self.k[layer].index_select(0, index), self.v[layer].index_select(0, index)

    def write_blocks(self, layer: int, block_ids: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """Write K and V blocks (shaped as `read_blocks` returns them) into `block_ids` of layer `layer`."""
        index = torch.tensor(block_ids, dtype=torch.long, device=self.k[layer].device)
        self.k[layer].index_copy_(0, index, k.to(self.k[layer].device))
        self.v[layer].index_copy_(0, index, v.to(self.v[layer].device))


def _elem_size(layout: KVLayout) -> int:
    return torch.empty((), dtype=layout.dtype).element_size()


def _map(layout: KVLayout, path: str) -> tuple[torch.Tensor, torch.Tensor]:
    flat = torch.from_file(path, shared=True, size=KVCache._num_elements(layout), dtype=layout.dtype)
    epochs = torch.from_file(path + ".epochs", shared=True, size=layout.num_blocks, dtype=torch.int64)
    return flat, epochs
