"""The KV tensors and their layout — the contract the KV transfer relies on.

Per layer, one K and one V tensor, each laid out

    [num_blocks, block_size, num_kv_heads, head_dim]   contiguous, row-major

so block b of layer l is the contiguous slab `k[l][b]` of `block_size * num_kv_heads * head_dim` elements, and
token slot s (= block_id * block_size + offset) is `k[l].view(-1, num_kv_heads, head_dim)[s]`. A transport moves
whole blocks: for each layer, K then V, the blocks in the order of the request's block ids. Two replicas can
exchange blocks only if every field of `KVLayout` but `num_blocks` matches (the transfer handshake compares them).

Arrival stamps: `block_epochs[b]` (int64, `[num_blocks]`) holds the epoch of the last transfer that completed block
b. A writer stamps a block only after every layer of it, K and V, is written; the decode side commits a reservation
only if every block it did not already hold carries the reservation's epoch, so it never decodes from partial KV
(a transfer that dies midway leaves its blocks unstamped, and a stale epoch never matches a newer reservation).

Write permits (the fence): `block_owners[b]` holds the epoch of the live reservation allowed to write block b (0:
none) and `block_write_until_ns[b]` the `time.monotonic_ns()` after which even that one may not. The owner grants
them at reserve (`open_writes`) and revokes them at commit or abort (`close_writes`); every writer checks them before
each layer it writes (`writable_until`) and never writes past the deadline, so a late or stray writer cannot touch
blocks that were freed and reused. In shared memory the permits are shared too: a same-node writer checks them
against the same monotonic clock (CLOCK_MONOTONIC is per machine).

Shared memory: with `shared_path` (on a tmpfs, e.g. /dev/shm), one file holds a small header, the stamps and every
layer's K and V, mapped once; `k[l]` and `v[l]` are views into it. The owner unlinks the file right after creating
it and keeps only an open descriptor, so nothing is left in /dev/shm even if it is SIGKILLed or OOM-killed: the
memory goes back to the system when the last process mapping it unmaps. A peer on the same node (same user) maps it
through `shared_address` (`/proc/<owner pid>/fd/<fd>`) with `KVCache.open_shared`; `close()` (owner) closes that
descriptor, after which no new peer can map the cache, while mappings already open stay valid.
"""

from __future__ import annotations

import mmap
import os
import secrets
import struct
from dataclasses import dataclass

import numpy as np
import torch

_MAGIC = b"PDKVSHM2"
# magic, then num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype name, owner pid, cache id
_HEADER = struct.Struct("<8s5q16sq16s")
_PAGE = 4096  # the stamps and the K/V tensors start on page boundaries


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
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * _elem_size(self.dtype)

    @property
    def bytes_per_token(self) -> int:
        return self.bytes_per_block // self.block_size


class KVCache:
    """The K and V tensors of every layer of one replica, and the blocks' arrival stamps."""

    def __init__(self, layout: KVLayout, device: torch.device | str = "cpu", shared_path: str | None = None) -> None:
        """`shared_path`: put the cache in shared memory, in a file created there and unlinked at once (see the
        module docstring); ValueError if the file system lacks room for it."""
        self.layout = layout
        self.shared_path = shared_path
        self.shared_address: str | None = None  # what a same-node peer passes to `open_shared`
        self.shared_id: str | None = None  # random id of a shared cache, so a peer can tell it maps the right one
        self._fd: int | None = None  # owner only: keeps `shared_address` open
        self.permits_address: str | None = None  # where a same-node writer opens the permits (`share_permits`)
        self._permits_fd: int | None = None  # owner only: keeps `permits_address` open
        if shared_path is None:
            flat = torch.zeros(_num_elements(layout), dtype=layout.dtype, device=device)
            # Beside the KV: a same-GPU peer (CUDA IPC) writes the stamps after the blocks, on the same stream.
            self.block_epochs = torch.zeros(layout.num_blocks, dtype=torch.int64, device=device)
            permits: torch.Tensor | None = torch.zeros(2, layout.num_blocks, dtype=torch.int64)  # host: checked there
        else:
            assert torch.device(device).type == "cpu", "shared-memory KV lives in host memory"
            self._fd, self.shared_id = _create(layout, shared_path)
            self.shared_address = f"/proc/{os.getpid()}/fd/{self._fd}"
            flat, self.block_epochs, permits = _map(layout, self._fd)
        self._set_permits(permits)
        self._split(flat)

    @classmethod
    def open_shared(cls, layout: KVLayout, address: str) -> KVCache:
        """Map another process's shared cache (same node, same user) without owning it. `address` is the owner's
        `shared_address`. Raises OSError if it cannot be opened, ValueError if it holds another layout."""
        fd = os.open(address, os.O_RDWR)
        try:
            shared_id = _check_header(os.pread(fd, _HEADER.size, 0), layout, address)
            flat, epochs, permits = _map(layout, fd)
        finally:
            os.close(fd)  # the mapping holds the memory; the descriptor is not needed any more
        cache = cls.from_tensors(layout, flat, epochs, permits)
        cache.shared_address, cache.shared_id = address, shared_id
        return cache

    @classmethod
    def from_tensors(
        cls, layout: KVLayout, flat: torch.Tensor, block_epochs: torch.Tensor, permits: torch.Tensor | None = None
    ) -> KVCache:
        """A view of another process's cache over tensors already mapped here (shared memory, CUDA IPC); owns
        nothing. `permits` (`[2, num_blocks]`: owners, deadlines): None where the writer cannot see them (CUDA IPC)."""
        cache = cls.__new__(cls)
        cache.layout, cache.shared_path, cache.shared_address, cache.shared_id = layout, None, None, None
        cache._fd, cache.block_epochs = None, block_epochs
        cache.permits_address, cache._permits_fd = None, None
        cache._set_permits(permits)
        cache._split(flat)
        return cache

    # ---- the write fence (see the module docstring) ----------------------------------------------------------

    def open_writes(self, block_ids: list[int], epoch: int, until_ns: int) -> None:
        """Owner: let the writer of `epoch` write `block_ids` until `time.monotonic_ns()` reaches `until_ns`."""
        if self.block_owners is not None and block_ids:
            self.block_write_until_ns[block_ids] = until_ns  # deadline first: a writer never sees a stale one
            self.block_owners[block_ids] = epoch

    def close_writes(self, block_ids: list[int]) -> None:
        """Owner: revoke every write permit on `block_ids` (commit, abort, lease expiry)."""
        if self.block_owners is not None and block_ids:
            self.block_owners[block_ids] = 0
            self.block_write_until_ns[block_ids] = 0

    def writable_until_ns(self, block_ids: list[int], epoch: int) -> int | None:
        """Writer: the monotonic deadline (ns) of the writes of `epoch` into `block_ids`, or None when some block is
        not (any more) open to that epoch — the writer must then write nothing. Always open where the permits are
        not visible (`has_fence` False)."""
        if self._owners is None or not block_ids:  # nothing to guard: the decode side held every block
            return 1 << 62
        index = np.asarray(block_ids)  # numpy views of the same memory: ~15x faster than torch's indexing here
        if not bool((self._owners[index] == epoch).all()):
            return None
        return int(self._until_ns[index].min())

    def share_permits(self) -> str:
        """Owner of a cache outside shared memory (on a GPU): move the write permits into a small shared host file,
        so that a writer in another process of this node (CUDA IPC) checks them as a shm writer does; returns where
        that writer opens them (`open_permits`). Call it before any permit is granted. Idempotent."""
        if self.permits_address is not None:
            return self.permits_address
        assert self.block_owners is not None and self.shared_id is None, "a shared cache shares its permits already"
        fd = os.memfd_create("pdserve-kv-permits", os.MFD_CLOEXEC)
        os.ftruncate(fd, _permit_bytes(self.layout.num_blocks))
        permits = _map_permits(fd, self.layout.num_blocks)
        permits[0].copy_(self.block_owners)
        permits[1].copy_(self.block_write_until_ns)
        self._set_permits(permits)
        self._permits_fd = fd  # kept open: peers open it by its /proc path
        self.permits_address = f"/proc/{os.getpid()}/fd/{fd}"
        return self.permits_address

    @staticmethod
    def open_permits(address: str, num_blocks: int) -> torch.Tensor:
        """A peer's mapping of another process's shared write permits (`share_permits`), `[2, num_blocks]`.
        OSError if it cannot be opened, ValueError if it holds another number of blocks."""
        fd = os.open(address, os.O_RDWR)
        try:
            if os.fstat(fd).st_size != _permit_bytes(num_blocks):
                raise ValueError(f"{address} holds the write permits of another number of blocks than {num_blocks}")
            return _map_permits(fd, num_blocks)
        finally:
            os.close(fd)  # the mapping keeps the memory

    @property
    def has_fence(self) -> bool:
        return self.block_owners is not None

    def _set_permits(self, permits: torch.Tensor | None) -> None:
        self.block_owners: torch.Tensor | None = None if permits is None else permits[0]
        self.block_write_until_ns: torch.Tensor = torch.zeros(0, dtype=torch.int64) if permits is None else permits[1]
        # What a writer reads before every layer, as numpy views of the same memory.
        self._owners = None if permits is None else self.block_owners.numpy()  # type: ignore[union-attr]
        self._until_ns = self.block_write_until_ns.numpy()

    @property
    def is_shared(self) -> bool:
        return self.shared_id is not None

    def close(self) -> None:
        """Owner of a shared cache: stop new peers from mapping it (its file was unlinked at creation already).
        The tensors stay valid here and in peers that mapped it; the memory is freed when the last one unmaps."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._permits_fd is not None:
            os.close(self._permits_fd)
            self._permits_fd = None

    def _split(self, flat: torch.Tensor) -> None:
        self.flat = flat  # every layer's K and V, one tensor (what a same-GPU peer maps)
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


def _elem_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _num_elements(layout: KVLayout) -> int:
    return 2 * layout.num_layers * layout.num_blocks * layout.block_size * layout.num_kv_heads * layout.head_dim


def _round_up(num_bytes: int) -> int:
    return -(-num_bytes // _PAGE) * _PAGE


def _file_bytes(layout: KVLayout) -> int:
    """Header page, stamps (epochs, owners, write deadlines; page-padded), then K/V:
    [num_layers, 2, num_blocks, block_size, heads, head_dim]."""
    return _PAGE + _stamp_bytes(layout) + _num_elements(layout) * _elem_size(layout.dtype)


def _stamp_bytes(layout: KVLayout) -> int:
    return _round_up(3 * 8 * layout.num_blocks)


def _describe(layout: KVLayout) -> dict[str, int | str]:
    """What the header records of a layout, and what a peer's layout must match."""
    names = ("num_layers", "num_blocks", "block_size", "num_kv_heads", "head_dim")
    return {n: getattr(layout, n) for n in names} | {"dtype": str(layout.dtype).removeprefix("torch.")}


def _create(layout: KVLayout, path: str) -> tuple[int, str]:
    """Create, size and unlink the shared file; returns its descriptor and a fresh cache id."""
    if os.path.exists(path):
        os.unlink(path)  # a leftover of an older version that kept the name: never map stale KV
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.unlink(path)  # from here on only descriptors and mappings keep the memory alive
    try:
        # Reserve every page now: a full tmpfs fails here with ENOSPC instead of SIGBUS at some later write.
        os.posix_fallocate(fd, 0, _file_bytes(layout))
    except OSError as e:
        os.close(fd)
        raise ValueError(
            f"no room for a {_file_bytes(layout) / 2**30:.2f} GiB shared KV cache in {os.path.dirname(path)} ({e}); "
            "enlarge it (docker --shm-size, a memory-backed emptyDir on Kubernetes), shrink the KV cache, "
            "or use the tcp KV transport"
        ) from e
    shared_id = secrets.token_hex(8)
    *sizes, dtype = _describe(layout).values()
    header = _HEADER.pack(_MAGIC, *sizes, str(dtype).encode(), os.getpid(), shared_id.encode())
    os.pwrite(fd, header, 0)
    return fd, shared_id


def _check_header(header: bytes, layout: KVLayout, address: str) -> str:
    """The cache id in a shared file's header; ValueError naming each field that differs from `layout`."""
    if len(header) < _HEADER.size or not header.startswith(_MAGIC):
        raise ValueError(f"{address} is not a pdserve shared KV cache")
    _, *sizes, dtype, _pid, shared_id = _HEADER.unpack(header)
    want = _describe(layout)
    got = dict(zip(want, [*sizes, dtype.rstrip(b"\0").decode()], strict=True))
    diffs = [f"{name}: {got[name]} != {want[name]}" for name in want if got[name] != want[name]]
    if diffs:
        raise ValueError(f"shared KV cache at {address} has another layout ({'; '.join(diffs)})")
    return str(shared_id.decode())


def _map(layout: KVLayout, fd: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The K/V elements, the arrival stamps and the write permits (`[2, num_blocks]`) of the shared file behind
    `fd`, as tensors over one shared mapping."""
    size = _file_bytes(layout)
    if os.fstat(fd).st_size != size:
        raise ValueError(f"shared KV file is {os.fstat(fd).st_size} bytes, its layout needs {size}")
    # MAP_POPULATE: fault the page tables in once now rather than on the first transfer into each page.
    memory = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
    raw = torch.frombuffer(memory, dtype=torch.uint8)  # keeps `memory` alive as long as any view of it lives
    stamps = raw[_PAGE : _PAGE + 3 * 8 * layout.num_blocks].view(torch.int64).view(3, layout.num_blocks)
    flat = raw[_PAGE + _stamp_bytes(layout) :].view(layout.dtype)
    return flat, stamps[0], stamps[1:]


def _permit_bytes(num_blocks: int) -> int:
    return 2 * 8 * num_blocks  # exactly: a peer's size check tells another number of blocks


def _map_permits(fd: int, num_blocks: int) -> torch.Tensor:
    """Owners and write deadlines, `[2, num_blocks]` int64, over a shared mapping of `fd`."""
    memory = mmap.mmap(fd, _permit_bytes(num_blocks), flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
    raw = torch.frombuffer(memory, dtype=torch.uint8)  # keeps `memory` alive as long as any view of it lives
    return raw.view(torch.int64).view(2, num_blocks)
