"""KV transfer throughput between two processes on this machine, per transport, next to the ceiling.

SmolLM2-135M's KV layout (30 layers, 3 KV heads, head_dim 64, blocks of 16 tokens). For prompts of 256 / 2048 /
8192 tokens, the prompt's blocks move from this process's cache into reserved blocks of a receiver process's cache:
over shared memory, over TCP on loopback, and over a gloo communicator pair (the NCCL transport's protocol and
code path, on CPU). The ceiling, measured in the same rounds, is an in-process copy of the
same blocks, per layer K then V, into a preallocated buffer. Rounds interleave them all so that noise from other
work on the machine hits them alike; the table shows the best round (and the median round in parentheses).
With --scattered the destination blocks are a random sample of a pool 4x larger, in random order (a pool after
churn): the transports then scatter with indexed copies, while the ceiling stays a contiguous copy.

    python benchmarks/kv_transfer.py [--dtype bfloat16|float32] [--repeats 20] [--scattered]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable

import torch

sys.path.insert(0, "tests")
from kv_peer import grant, kv_peer, open_peer
from pdserve.kvcache import KVCache, KVLayout
from pdserve.transfer import KVEndpoint, KVSender, SharedMemorySender, TcpSender, TransferSpec
from pdserve.transfer.gloo import GlooBackend
from pdserve.transfer.p2p import P2PSender

PROMPT_TOKENS = (256, 2048, 8192)
BLOCK_SIZE = 16


def cpu_description() -> str:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
    return f"CPU: {fields.get('Model name', '?').strip()} ({fields.get('CPU(s)', '?').strip()} CPUs)\n" + (
        f"Flags: {fields.get('Flags', '?').strip()}"
    )


def seconds_per_round(fns: dict[str, Callable[[], None]], repeats: int) -> dict[str, list[float]]:
    """Each function once to warm up (page tables, connections), then `repeats` interleaved rounds."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def ceiling_copy(src: KVCache, num_blocks: int) -> Callable[[], None]:
    buffers = [torch.empty_like(t[:num_blocks]) for t in src.k + src.v]
    pairs = [(buffers[i], t) for i, t in enumerate(src.k + src.v)]
    order = [pairs[i] for layer in range(src.layout.num_layers) for i in (layer, src.layout.num_layers + layer)]

    def copy() -> None:
        for buffer, t in order:
            buffer.copy_(t[:num_blocks])

    return copy


def transfer(sender: KVSender, endpoint: KVEndpoint, spec: TransferSpec, src: KVCache) -> Callable[[], None]:
    return lambda: sender.send(endpoint, spec, src, timeout_s=120)


Senders = dict[str, tuple[KVSender, KVEndpoint]]


def row(tokens: int, src: KVCache, senders: Senders, dsts: list[KVCache], args: argparse.Namespace) -> str:
    """One table row; `dsts`: the receivers' caches, mapped here to open the destination blocks to the transfer
    (the decode engine's reservation does that in production: transports write only blocks open to the epoch)."""
    num_blocks = tokens // BLOCK_SIZE
    dst_ids = list(range(num_blocks))
    if args.scattered:  # after churn, the free blocks are anywhere in the pool, in any order
        pool = torch.randperm(src.layout.num_blocks, generator=torch.Generator().manual_seed(tokens))
        dst_ids = pool[:num_blocks].tolist()
    spec = TransferSpec(1, list(range(num_blocks)), dst_ids, "bench")
    for dst in dsts:
        grant(dst, spec, seconds=3600)
    fns = {"ceiling": ceiling_copy(src, num_blocks)} | {n: transfer(s, e, spec, src) for n, (s, e) in senders.items()}
    times = seconds_per_round(fns, args.repeats)
    num_bytes = num_blocks * src.layout.bytes_per_block
    best = {name: num_bytes / min(t) / 1e9 for name, t in times.items()}
    median = {name: num_bytes / statistics.median(t) / 1e9 for name, t in times.items()}
    cells = [f"{tokens}", f"{num_blocks}", f"{num_bytes / 1e6:.1f}", f"{best['ceiling']:.2f} ({median['ceiling']:.2f})"]
    for name in senders:
        cells += [f"{best[name]:.2f} ({median[name]:.2f})", f"{best[name] / best['ceiling']:.0%}"]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument(
        "--scattered", action="store_true", help="destination blocks drawn at random from a pool 4x the largest prompt"
    )
    args = parser.parse_args()
    print(cpu_description())
    num_blocks = max(PROMPT_TOKENS) // BLOCK_SIZE * (4 if args.scattered else 1)
    layout = KVLayout(30, num_blocks, BLOCK_SIZE, 3, 64, getattr(torch, args.dtype))
    src = KVCache(layout)
    for t in src.k + src.v:
        t.normal_()
    order = "scattered (random, from a 4x pool)" if args.scattered else "consecutive"
    threads = torch.get_num_threads()
    print(f"\nSmolLM2-135M KV layout, {args.dtype}, {order} destination blocks, {threads} torch threads")
    print(f"GB/s of the best of {args.repeats} rounds (median round)\n")
    names = ("shm", "tcp", "gloo")
    print(
        "| prompt tokens | blocks | MB | memcpy ceiling GB/s | "
        + " | ".join(f"{n} GB/s | {n} / ceiling" for n in names)
    )
    print("|---" * (4 + 2 * len(names)) + "|")
    with (
        kv_peer(layout, f"/dev/shm/pdserve-bench-{uuid.uuid4().hex}") as endpoint,
        kv_peer(layout, f"/dev/shm/pdserve-bench-{uuid.uuid4().hex}", transport="gloo") as gloo,
    ):
        senders: Senders = {
            "shm": (SharedMemorySender("m"), endpoint),
            "tcp": (TcpSender("m"), endpoint),
            "gloo": (P2PSender("m", GlooBackend()), gloo),  # the NCCL transport's protocol, on CPU
        }
        dsts = [open_peer(endpoint), open_peer(gloo)]
        for tokens in PROMPT_TOKENS:
            print(row(tokens, src, senders, dsts, args), flush=True)
        for sender, _ in senders.values():
            sender.close()


if __name__ == "__main__":
    main()
