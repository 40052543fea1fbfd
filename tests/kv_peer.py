"""A decode-side KV receiver in its own process, for transfer tests and benchmarks."""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from multiprocessing.connection import Connection

from pdserve.kvcache import KVCache, KVLayout
from pdserve.transfer import KVEndpoint, make_receiver


def _serve(conn: Connection, layout: KVLayout, path: str, model_id: str, transport: str, max_pairs: int) -> None:
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
    args = (child, layout, path, model_id, transport, max_pairs)
    process = ctx.Process(target=_serve, args=args, daemon=True)
    process.start()
    try:
        yield parent.recv()
    finally:
        parent.send("stop")
        process.join(timeout=10)
