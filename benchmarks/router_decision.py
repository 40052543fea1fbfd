"""Decision latency of the router: p50/p99 per `Router.route` with a large prefix index.

Default: 1,000,000 indexed blocks over 32 replicas (16 prefill + 16 decode), 2k-token prompts (128 blocks of 16),
each prompt sharing a random-length prefix with chains some replicas hold. Goal (issue 4): p99 <= 200 us.

    python benchmarks/router_decision.py [--blocks 1000000] [--replicas 32] [--prompt-tokens 2048]
"""

from __future__ import annotations

import argparse
import gc
import platform
import random
import statistics
import subprocess
import time

from pdserve.kvcache import KVEventBatch, hash_block_chain
from pdserve.router import CostConfig, ReplicaReport, Router


def cpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    lines = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    flags = [f for f in lines.get("Flags", "").split() if f in {"avx2", "avx512f", "avx512_bf16", "amx_bf16"}]
    return f"{lines.get('Model name', platform.processor()).strip()} ({' '.join(flags)})"


def build_router(
    num_blocks: int, num_replicas: int, prompt_tokens: int, rng: random.Random
) -> tuple[Router, list[list[int]]]:
    """Index `num_blocks` blocks: each replica holds chains of prompt length; returns the router and the chains'
    token lists (prompts are built from their prefixes)."""
    config = CostConfig()
    router = Router(config, rng=random.Random(0))
    per_replica = num_blocks // num_replicas
    prompts: list[list[int]] = []
    for r in range(num_replicas):
        role = "prefill" if r % 2 == 0 else "decode"
        hashes: set[int] = set()
        while len(hashes) < per_replica:
            tokens = [rng.randrange(50_000) for _ in range(prompt_tokens)]
            if len(prompts) < 1000:
                prompts.append(tokens)
            hashes.update(hash_block_chain(tokens, config.block_size)[: per_replica - len(hashes)])
        report = ReplicaReport(f"replica-{r}", role, f"node-{r % 4}", 100_000, 50_000, 0, 0)
        router.apply_report(report, KVEventBatch(f"inc-{r}", 1, (), frozenset(hashes)))
    return router, prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=1_000_000)
    parser.add_argument("--replicas", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=2048)
    parser.add_argument("--decisions", type=int, default=5000)
    args = parser.parse_args()
    rng = random.Random(1)
    start = time.perf_counter()
    router, chains = build_router(args.blocks, args.replicas, args.prompt_tokens, rng)
    print(f"indexed {args.blocks} blocks over {args.replicas} replicas in {time.perf_counter() - start:.1f} s")
    prompts = []
    for i in range(args.decisions):  # a shared prefix of random length, then fresh tokens
        base = chains[i % len(chains)]
        keep = rng.randrange(0, args.prompt_tokens)
        prompts.append(base[:keep] + [rng.randrange(50_000) for _ in range(args.prompt_tokens - keep)])
    hash_us, route_us = [], []
    gc.collect()
    gc.disable()  # measure the router, not a collection that happens to land in one sample
    for i, prompt in enumerate(prompts):
        t0 = time.perf_counter()
        chain = hash_block_chain(prompt, router.config.block_size)
        t1 = time.perf_counter()
        decision = router.route(f"r{i}", chain, len(prompt), 128)
        t2 = time.perf_counter()
        router.finish(decision.request_id)
        hash_us.append((t1 - t0) * 1e6)
        route_us.append((t2 - t1) * 1e6)
    gc.enable()
    print(f"CPU: {cpu_model()}; {args.decisions} decisions, {args.prompt_tokens}-token prompts\n")
    print("| step | p50 us | p99 us | max us |\n|---|---|---|---|")
    rows = [("hash chain (ingress, once per request)", hash_us), ("route (match + cost + accounting)", route_us)]
    for name, xs in rows:
        q = statistics.quantiles(xs, n=100)
        print(f"| {name} | {q[49]:.0f} | {q[98]:.0f} | {max(xs):.0f} |")
    total = [a + b for a, b in zip(hash_us, route_us, strict=True)]
    q = statistics.quantiles(total, n=100)
    print(f"| total | {q[49]:.0f} | {q[98]:.0f} | {max(total):.0f} |")


if __name__ == "__main__":
    main()
