"""A decode-side KV receiver in its own process, for transfer tests and benchmarks."""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from multiprocessing.connection import Connection

from pdserve.kvcache import KVCache, KVLayout
from pdserve.transfer import KVEndpoint, KVSender, LayerProgress, TransferError, TransferSpec, make_receiver, wire


def _serve(
    conn: Connection, layout: KVLayout, path: str, model_id: str, transport: str, max_pairs: int, secret: bytes
) -> None:
    wire.set_cluster_secret(secret)  # the parent's: as replicas of one cluster share theirs
    kv = KVCache(layout, shared_path=path)
    receiver = make_receiver(transport, kv, model_id, node_id="node-a", max_pairs=max_pairs)
    conn.send(replace(receiver.endpoint, shm_path=kv.shared_address))
    conn.recv()  # "stop"
    receiver.close()
    kv.close()


@contextmanager
def kv_peer(
    layout: KVLayout, path: str, model_id: str = "m", transport: str = "auto", max_pairs: int = 8
) -> Iterator[KVEndpoint]:
    """A receiver process with a shared-memory KV cache at `path`, served over `transport` ("auto": shared memory
    and TCP); yields its endpoint (plus `shm_path`, so that a test can map the cache and check it)."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    args = (child, layout, path, model_id, transport, max_pairs, wire.cluster_secret())
    process = ctx.Process(target=_serve, args=args, daemon=True)
    process.start()
    try:
        yield parent.recv()
    finally:
        parent.send("stop")
        process.join(timeout=10)


def open_peer(endpoint: KVEndpoint) -> KVCache:
    """Map the shared-memory cache behind a `kv_peer` endpoint here: to read what arrived, and to grant writes
    (the write permits live in that shared memory too, so the receiver process and every sender see them)."""
    assert endpoint.shm_path is not None
    return KVCache.open_shared(endpoint.layout(), endpoint.shm_path)


def grant(kv: KVCache, spec: TransferSpec, seconds: float = 60.0) -> TransferSpec:
    """Open `spec`'s destination blocks of `kv` to its epoch for `seconds` from now, as the decode engine does at
    reserve (`KVCache.open_writes`): without it every transport refuses to write them. Returns `spec`."""
    kv.open_writes(list(spec.dst_block_ids), spec.epoch, time.monotonic_ns() + int(seconds * 1e9))
    return spec


def push_in_thread(
    sender: KVSender, endpoint: KVEndpoint, spec: TransferSpec, src: KVCache, progress: LayerProgress
) -> tuple[list[TransferError], threading.Event]:
    """A layer-pipelined send on a thread of its own, as a prefill replica's push: the TransferError it ended with
    (if any), and an event set when it ended."""
    errors: list[TransferError] = []
    done = threading.Event()

    def push() -> None:
        try:
            sender.send(endpoint, spec, src, 20, progress)
        except TransferError as e:
            errors.append(e)
        done.set()

    threading.Thread(target=push, daemon=True).start()
    return errors, done
