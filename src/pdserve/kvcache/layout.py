"""The KV tensors and their layout — the contract the KV transfer relies on.

Per layer, one K and one V tensor, each laid out

    [num_blocks, block_size, num_kv_heads, head_dim]   contiguous, row-major

so block b of layer l is the contiguous slab `k[l][b]` of `block_size * num_kv_heads * head_dim` elements, and
token slot s (= block_id * block_size + offset) is `k[l].view(-1, num_kv_heads, head_dim)[s]`. A transport moves
whole blocks: for each layer, K then V, the blocks in the order of the request's block ids. Two replicas can
exchange blocks only if every field of `KVLayout` matches (the transfer handshake compares them).
"""

from __future__ import annotations

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
    """The K and V tensors of every layer of one replica."""

    def __init__(self, layout: KVLayout, device: torch.device | str = "cpu") -> None:
        self.layout = layout
        shape = (layout.num_blocks, *layout.block_shape)
        self.k = [torch.zeros(shape, dtype=layout.dtype, device=device) for _ in range(layout.num_layers)]
        self.v = [torch.zeros(shape, dtype=layout.dtype, device=device) for _ in range(layout.num_layers)]

    def read_blocks(self, layer: int, block_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of layer `layer`'s K and V blocks, `[len(block_ids), block_size, num_kv_heads, head_dim]` each."""
        index = torch.tensor(block_ids, dtype=torch.long, device=self.k[layer].device)
        return self.k[layer].index_select(0, index), self.v[layer].index_select(0, index)

    def write_blocks(self, layer: int, block_ids: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """Write K and V blocks (shaped as `read_blocks` returns them) into `block_ids` of layer `layer`."""
        index = torch.tensor(block_ids, dtype=torch.long, device=self.k[layer].device)
        self.k[layer].index_copy_(0, index, k.to(self.k[layer].device))
        self.v[layer].index_copy_(0, index, v.to(self.v[layer].device))
