"""KV transfer throughput between two processes on this machine, per transport, next to the ceiling.

SmolLM2-135M's KV layout (30 layers, 3 KV heads, head_dim 64, blocks of 16). For prompts of 256 / 2048 / 8192
tokens, the prompt's blocks move from this process's cache into a receiver process's reserved blocks (shared memory,
then TCP over loopback); the ceiling is an in-process memcpy of the same bytes into a preallocated buffer.

    python benchmarks/kv_transfer.py [--dtype bfloat16|float32] [--repeats 5]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import uuid

import torch

sys.path.insert(0, "tests")
from kv_peer import kv_peer
from pdserve.kvcache import KVCache, KVLayout
from pdserve.transfer import SharedMemorySender, TcpSender, TransferSpec

TOKENS = (256, 2048, 8192)


def best_seconds(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def row(tokens: int, layout: KVLayout, src: KVCache, endpoint, shm, tcp, repeats: int) -> str:  # type: ignore[no-untyped-def]
    n = tokens // 16
    spec = TransferSpec("bench", 1, list(range(n)), list(range(4, 4 + n)))
    nbytes = n * layout.bytes_per_block
    buffers = [torch.empty_like(t[:n]) for t in src.k + src.v]

    def ceiling() -> None:
        for buf, t in zip(buffers, src.k + src.v, strict=True):
            buf.copy_(t[:n])

    c, s, t = (
        nbytes / best_seconds(fn, repeats) / 1e9
        for fn in (ceiling, lambda: shm.send(endpoint, spec, src, 60), lambda: tcp.send(endpoint, spec, src, 60))
    )
    return f"| {tokens} | {nbytes / 1e6:.1f} | {c:.2f} | {s:.2f} | {s / c:.0%} | {t:.2f} | {t / c:.0%} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    num_blocks = max(TOKENS) // 16 + 8
    layout = KVLayout(30, num_blocks, 16, 3, 64, dtype)
    src = KVCache(layout)
    for t in src.k + src.v:
        t.normal_()
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    model = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")), "?")
    flags = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in lscpu]
    print(f"# {model}; flags: {' '.join(flags)}; SmolLM2 KV layout, {args.dtype}, best of {args.repeats}")
    print("\n| prompt tokens | MB | memcpy ceiling GB/s | shm GB/s | shm / ceiling | tcp GB/s | tcp / ceiling |")
    print("|---|---|---|---|---|---|---|")
    with kv_peer(layout, f"/dev/shm/pdserve-bench-{uuid.uuid4().hex}") as endpoint:
        shm, tcp = SharedMemorySender("m"), TcpSender("m")
        for tokens in TOKENS:
            print(row(tokens, layout, src, endpoint, shm, tcp, args.repeats))
        tcp.close()


if __name__ == "__main__":
    main()
