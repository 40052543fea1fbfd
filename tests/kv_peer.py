"""A decode-side KV receiver in its own process, for transfer tests and benchmarks."""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing.connection import Connection

from pdserve.kvcache import KVCache, KVLayout
from pdserve.transfer import KVEndpoint, make_receiver


def _serve(conn: Connection, layout: KVLayout, path: str, model_id: str) -> None:
    kv = KVCache(layout, shared_path=path)
    receiver = make_receiver("auto", kv, model_id, node_id="node-a")
    conn.send(receiver.endpoint)
    conn.recv()  # "stop"
    receiver.close()
    kv.close()


@contextmanager
def kv_peer(layout: KVLayout, path: str, model_id: str = "m") -> Iterator[KVEndpoint]:
    """A receiver process with a shared-memory KV cache at `path` and a TCP listener; yields its endpoint."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=_serve, args=(child, layout, path, model_id), daemon=True)
    process.start()
    try:
        yield parent.recv()
    finally:
        parent.send("stop")
        process.join(timeout=10)
