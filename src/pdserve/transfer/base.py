"""The KV transport interface: push a request's blocks, layer by layer, into blocks reserved on a decode replica.

Shaped for NCCL (two-sided, per-layer block sets into preallocated destination blocks): the decode side publishes a
`KVEndpoint` with its reservation; the prefill side `send`s. Every transport stamps the reservation's epoch on each
destination block after all its layers arrived (`KVCache.block_epochs`), which is what the decode side's commit
checks. Calls block: run them in a worker thread, never on an event loop.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, fields

from pdserve.kvcache import KVCache, KVLayout


class TransferError(RuntimeError):
    """The blocks did not (all) arrive: incompatible peers, a dead peer, or a deadline passed."""


@dataclass(frozen=True)
class KVLayoutSpec:
    """What two replicas must agree on before any byte moves (the compatibility handshake)."""

    model_id: str
    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str


def layout_spec(layout: KVLayout, model_id: str) -> KVLayoutSpec:
    dtype = str(layout.dtype).removeprefix("torch.")
    return KVLayoutSpec(model_id, layout.num_layers, layout.block_size, layout.num_kv_heads, layout.head_dim, dtype)


def check_compatible(local: KVLayoutSpec, remote: KVLayoutSpec) -> None:
    """Raise TransferError naming every field on which the two replicas differ."""
    diffs = [
        f"{f.name}: {getattr(local, f.name)} != {getattr(remote, f.name)}"
        for f in fields(KVLayoutSpec)
        if getattr(local, f.name) != getattr(remote, f.name)
    ]
    if diffs:
        raise TransferError("incompatible KV layouts (" + "; ".join(diffs) + ")")


@dataclass(frozen=True)
class KVEndpoint:
    """How to reach a decode replica's KV cache; travels inside its reservations."""

    node_id: str
    spec: KVLayoutSpec
    num_blocks: int  # of the destination pool (to map it)
    shm_path: str | None  # shared-memory KV cache, for peers on the same node
    tcp_address: str | None  # "host:port" of its TCP receiver, for peers anywhere


@dataclass(frozen=True)
class TransferSpec:
    transfer_id: str  # the request id
    epoch: int  # the reservation's epoch, stamped on each completed destination block
    src_block_ids: list[int]
    dst_block_ids: list[int]


@dataclass(frozen=True)
class TransferStats:
    transport: str
    num_blocks: int
    num_bytes: int
    seconds: float


class KVSender(ABC):
    """Prefill side."""

    @abstractmethod
    def send(self, endpoint: KVEndpoint, spec: TransferSpec, src: KVCache, timeout_s: float) -> TransferStats:
        """Write `src`'s blocks into the endpoint's blocks, every layer, then stamp them. Raises TransferError."""

    @abstractmethod
    def close(self) -> None:
        """Drop connections and mappings."""


class KVReceiver(ABC):
    """Decode side."""

    endpoint: KVEndpoint

    @abstractmethod
    def close(self) -> None:
        """Stop receiving."""


def runs(src_ids: list[int], dst_ids: list[int]) -> list[tuple[int, int, int]]:
    """(src_start, dst_start, length) of maximal runs consecutive on both sides: one copy per run."""
    out: list[tuple[int, int, int]] = []
    for s, d in zip(src_ids, dst_ids, strict=True):
        if out and out[-1][0] + out[-1][2] == s and out[-1][1] + out[-1][2] == d:
            out[-1] = (out[-1][0], out[-1][1], out[-1][2] + 1)
        else:
            out.append((s, d, 1))
    return out
