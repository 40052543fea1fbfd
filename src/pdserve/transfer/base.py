"""The KV transport interface: push a request's blocks, layer by layer, into blocks reserved on a decode replica.

Two-sided, shaped for NCCL as much as for the CPU transports: the decode replica reserves destination blocks and
publishes a `KVEndpoint` (inside its reservation); the prefill replica `send`s per layer K then V of the given block
set into exactly those blocks, then stamps the reservation's epoch on each of them (`KVCache.block_epochs`), which
is what the decode side's commit checks. Nothing is written before the compatibility check passes, and no layer is
written after the send's deadline, so a sender that gave up never overwrites blocks the decode replica has since
freed and handed to another request (as long as the deadline is before the reservation's lease ends).

Every call blocks: run it in a worker thread, never on an event loop. Senders are safe to share between threads.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch and the KV tensors are imported where used: the ingress imports this module, not them
    import torch

    from pdserve.kvcache import KVCache, KVLayout

TRANSPORTS = ("shm", "tcp", "gloo", "nccl", "cuda_ipc")
GPU_TRANSPORTS = ("nccl", "cuda_ipc")  # the others move host memory
_MIN_RUN_BLOCKS = 8  # shorter runs on average: one indexed copy beats a copy per run (see is_scattered)


class TransferError(RuntimeError):
    """The blocks did not (all) arrive: incompatible peers, an unreachable or dead peer, or the deadline passed.
    The destination blocks are then not stamped with the epoch (some may hold partial data)."""


class FencedError(TransferError):
    """The destination blocks are not (any more) open to this transfer's epoch — its reservation was committed,
    aborted or expired, or its write deadline passed — so nothing more is written (see `KVCache.open_writes`)."""


def fence_deadline(dst: KVCache, block_ids: Sequence[int], epoch: int, what: str) -> float:
    """The `time.monotonic()` until which the writes of `epoch` into `block_ids` of `dst` may go on; FencedError if
    they may not go on now. Call it before every layer written, and bound the write by what it returns."""
    until_ns = dst.writable_until_ns(list(block_ids), epoch)
    if until_ns is None or time.monotonic_ns() >= until_ns:
        raise FencedError(f"epoch {epoch}: {what} refused: its reservation is no longer open to it")
    return until_ns / 1e9


@dataclass(frozen=True)
class KVLayoutSpec:
    """What two replicas must agree on before any byte moves (the compatibility handshake)."""

    model_id: str  # same weights: KV from another model is garbage with the right shape
    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str  # torch dtype name without "torch.", e.g. "bfloat16"


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
class CudaIpcHandle:
    """What a same-GPU peer needs to map a decode replica's cache (`KVEndpoint.cuda_ipc`; see cuda_ipc.py)."""

    device_uuid: str  # the GPU's UUID: the handles open only on that very device
    kv: bytes  # pickled torch CUDA IPC rebuild arguments of the flat KV tensor
    epochs: bytes  # ... and of the arrival stamps
    permits: str  # where the cache's write permits live in host memory (`KVCache.share_permits`): the writer checks


@dataclass(frozen=True)
class KVEndpoint:
    """How to reach one decode replica's KV cache; small and picklable, it travels inside every reservation.
    A replica does not know who will send to it, so it lists every transport it serves (at least one)."""

    node_id: str  # Ray node id: shared memory only between replicas on the same node
    spec: KVLayoutSpec
    num_blocks: int  # of the destination pool: to map it, and to refuse out-of-range block ids up front
    cache_id: str  # random id of the destination cache: a recycled pid or port never gets another cache's blocks
    shm_path: str | None = None  # the cache's `shared_address` (/proc/<pid>/fd/<fd>), for peers on the same node
    tcp_address: str | None = None  # "host:port" of its TCP receiver, for peers anywhere
    cuda_ipc: CudaIpcHandle | None = None  # a KV cache on a GPU, for peers on that GPU
    p2p_address: str | None = None  # "host:port" of its control listener for communicator pairs (p2p.py) ...
    p2p_backend: str | None = None  # ... over "nccl" (a GPU cache) or "gloo" (host memory)

    def layout(self) -> KVLayout:
        """The destination cache's layout."""
        import torch

        from pdserve.kvcache import KVLayout

        s = self.spec
        return KVLayout(
            s.num_layers, self.num_blocks, s.block_size, s.num_kv_heads, s.head_dim, getattr(torch, s.dtype)
        )

    @property
    def transports(self) -> tuple[str, ...]:
        served = {"shm": self.shm_path, "tcp": self.tcp_address, "cuda_ipc": self.cuda_ipc}
        if self.p2p_backend is not None:
            served[self.p2p_backend] = self.p2p_address
        return tuple(t for t in TRANSPORTS if served.get(t) is not None)


@dataclass(frozen=True)
class TransferSpec:
    """One request's blocks: `src_block_ids[i]` of the sender lands in `dst_block_ids[i]` of the receiver."""

    epoch: int  # the reservation's epoch, stamped on each destination block once all its layers arrived
    src_block_ids: Sequence[int]
    dst_block_ids: Sequence[int]
    transfer_id: str  # the request id: logs, and the rendezvous key of two-sided transports

    def __post_init__(self) -> None:
        if len(self.src_block_ids) != len(self.dst_block_ids):
            raise ValueError(f"{len(self.src_block_ids)} source blocks for {len(self.dst_block_ids)} destinations")
        if len(set(self.dst_block_ids)) != len(self.dst_block_ids):
            raise ValueError("destination block ids repeat: one of the writes would be lost")

    def check_ranges(self, num_src_blocks: int, num_dst_blocks: int) -> None:
        """TransferError unless every id lies in its pool (checked before any byte moves)."""
        for name, ids, num in (
            ("source", self.src_block_ids, num_src_blocks),
            ("destination", self.dst_block_ids, num_dst_blocks),
        ):
            if any(not 0 <= b < num for b in ids):
                raise TransferError(f"{name} block ids must lie in [0, {num})")


@dataclass(frozen=True)
class TransferStats:
    num_blocks: int
    num_bytes: int
    seconds: float
    transport: str  # "shm" | "tcp" | "cuda_ipc"
    layer_seconds: tuple[float, ...] = ()  # time each layer took to go out, in order

    @property
    def sending_s(self) -> float:
        """Time spent moving bytes: the layers' own times. `seconds` also counts, in a layer-pipelined push, the
        waits for each layer's compute — the prefill's pace, not the transport's."""
        return sum(self.layer_seconds) if self.layer_seconds else self.seconds


class KVSender(ABC):
    """Prefill side: writes blocks into reserved blocks of a decode replica."""

    @abstractmethod
    def send(
        self,
        endpoint: KVEndpoint,
        spec: TransferSpec,
        src: KVCache,
        timeout_s: float,
        progress: LayerProgress | None = None,
    ) -> TransferStats:
        """Write `src`'s blocks `spec.src_block_ids` into the endpoint's `spec.dst_block_ids`, per layer K then V,
        then stamp `spec.epoch` on the destination blocks; return once they are in place. Checks compatibility
        before any byte moves. Writes nothing after `timeout_s` from now. Raises TransferError.
        With `progress`, layer i is sent as soon as the engine reports it computed (layer-pipelined push)."""

    @abstractmethod
    def close(self) -> None:
        """Drop connections and mappings."""


class KVReceiver(ABC):
    """Decode side: makes a KV cache reachable and publishes how (`endpoint`)."""

    endpoint: KVEndpoint

    @abstractmethod
    def close(self) -> None:
        """Stop accepting new transfers."""

    @property
    def num_fenced(self) -> int:
        """Transfers refused at the write fence since start (receivers that write; 0 where the sender writes)."""
        return 0


def choose_transport(
    endpoint: KVEndpoint, local_node_id: str, prefer: str = "auto", local_gpu: str | None = None
) -> str:
    """The transport to reach `endpoint` from node `local_node_id`, whose KV is on the GPU `local_gpu` (its UUID;
    None: host memory). "auto" picks, by topology: on GPU, CUDA IPC to the same GPU, else NCCL; on CPU, shared
    memory on the same node, else TCP. Any other name forces that transport. TransferError if the endpoint does
    not serve it or it cannot work between the two (shared memory across nodes, a host transport for GPU KV...)."""
    if prefer not in ("auto", *TRANSPORTS):
        raise ValueError(f"KV transport must be one of auto, {', '.join(TRANSPORTS)}, not {prefer!r}")
    is_local = endpoint.node_id == local_node_id
    if prefer != "auto":
        name = prefer
    elif local_gpu is not None:
        is_same_gpu = endpoint.cuda_ipc is not None and endpoint.cuda_ipc.device_uuid == local_gpu
        name = "cuda_ipc" if is_same_gpu else "nccl"
    else:
        name = "shm" if is_local and endpoint.shm_path else "tcp"
    if name not in endpoint.transports:
        raise TransferError(f"the decode replica serves KV over {endpoint.transports or 'nothing'}, not {name}")
    if (name in GPU_TRANSPORTS) != (local_gpu is not None):
        where = "a GPU" if local_gpu is not None else "host memory"
        raise TransferError(f"the {name} KV transport cannot move KV held in {where}")
    if name == "shm" and not is_local:
        raise TransferError(f"shared-memory KV transport to node {endpoint.node_id} from node {local_node_id}")
    if name == "cuda_ipc" and (not is_local or endpoint.cuda_ipc is None or endpoint.cuda_ipc.device_uuid != local_gpu):
        raise TransferError("CUDA IPC needs the prefill and decode replicas on the same GPU")
    return name


def require_host_memory(kv: KVCache) -> None:
    """ValueError unless `kv` is in host memory: the shm and TCP transports move bytes the CPU can address."""
    if kv.k[0].device.type != "cpu":
        raise ValueError(f"the KV cache is on {kv.k[0].device}: the shm and tcp KV transports move host memory only")


class Deadline:
    """A send's time budget, on the monotonic clock."""

    def __init__(self, timeout_s: float) -> None:
        self.at = time.monotonic() + timeout_s

    def remaining_s(self, what: str) -> float:
        """Seconds left; TransferError naming `what` was not done when none are."""
        left = self.at - time.monotonic()
        if left <= 0:
            raise TransferError(f"deadline passed before {what}")
        return left


class LayerProgress:
    """How far the prompt's KV is computed, layer by layer: written by the engine thread (it is the `LayerSink` of
    a prefill-only request), waited on by the sender thread, so that layer i moves while layer i+1 computes.

    On a GPU "computed" means queued: with `device` a CUDA device, each layer also records a CUDA event on the
    engine's stream, which the sender waits for before it reads that layer (`event`)."""

    def __init__(self, device: torch.device | None = None) -> None:
        self._changed = threading.Condition()
        self._num_layers_done = 0
        self._block_ids: tuple[int, ...] | None = None
        self._error: BaseException | None = None
        self._device = device if device is not None and device.type == "cuda" else None
        self._events: list[torch.cuda.Event] = []

    def layer_done(self, layer: int, block_ids: Sequence[int]) -> None:
        if self._device is not None:
            import torch  # loaded: a CUDA device was given

            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self._device))
            self._events.append(event)  # before the layer counts as done: a waiter finds it
        with self._changed:
            self._block_ids = tuple(block_ids)
            self._num_layers_done = layer + 1
            self._changed.notify_all()

    def fail(self, error: BaseException) -> None:
        """The prompt will not complete (aborted, failed): waiters raise TransferError."""
        with self._changed:
            self._error = error
            self._changed.notify_all()

    def wait_blocks(self, deadline: Deadline) -> tuple[int, ...]:
        """The prompt's block ids, once its last chunk's first layer is written."""
        self.wait_layer(0, deadline)
        assert self._block_ids is not None
        return self._block_ids

    def event(self, layer: int) -> torch.cuda.Event | None:
        """The CUDA event after layer `layer`'s KV writes (None on CPU); valid once `wait_layer(layer)` returned."""
        return self._events[layer] if self._device is not None else None

    def wait_layer(self, layer: int, deadline: Deadline) -> None:
        with self._changed:
            while self._num_layers_done <= layer:
                if self._error is not None:
                    raise TransferError(f"the prompt's KV will not be complete: {self._error}")
                self._changed.wait(deadline.remaining_s(f"layer {layer} was computed"))


def layer_chunks(num_layers: int, per_chunk: int) -> list[tuple[int, int]]:
    """[start, end) of consecutive groups of `per_chunk` layers (the last may be shorter)."""
    return [(i, min(i + per_chunk, num_layers)) for i in range(0, num_layers, per_chunk)]


def planes(kv: KVCache) -> torch.Tensor:
    """Every layer's K and V as one `[layers, 2, blocks, block elements]` view: block sets of any layers move with
    one gather (index_select on dim 2) and one scatter."""
    layout = kv.layout
    return kv.flat.view(layout.num_layers, 2, layout.num_blocks, -1)


def paired_runs(src_ids: Sequence[int], dst_ids: Sequence[int]) -> list[tuple[int, int, int]]:
    """(src_start, dst_start, length) of maximal runs consecutive on both sides: one copy per run."""
    out: list[tuple[int, int, int]] = []
    for s, d in zip(src_ids, dst_ids, strict=True):
        if out and out[-1][0] + out[-1][2] == s and out[-1][1] + out[-1][2] == d:
            out[-1] = (out[-1][0], out[-1][1], out[-1][2] + 1)
        else:
            out.append((s, d, 1))
    return out


def runs(ids: Sequence[int]) -> list[tuple[int, int]]:
    """(start, length) of maximal runs of consecutive ids."""
    return [(start, n) for start, _, n in paired_runs(ids, ids)]


def is_scattered(num_runs: int, num_blocks: int) -> bool:
    """Whether to move blocks with one indexed copy instead of one copy per run. A copy call costs microseconds and
    a block of one layer's K is a few KB, so many short runs are far cheaper as one indexed copy (itself about half
    as fast as memcpy per byte: measured 1.7 vs 6 GB/s for 512 scattered SmolLM2 blocks)."""
    return num_runs > 1 and num_runs * _MIN_RUN_BLOCKS > num_blocks
