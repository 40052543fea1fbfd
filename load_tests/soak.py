"""Soak: steady Poisson load with client aborts and a decode replica SIGKILLed every minute, sampling what must stay
flat — KV blocks (used, held, reserved, fenced), the router's in-flight count, the replicas' RSS, open files and
threads — every --sample-s, printed as a table; then the answers by outcome.

    python load_tests/soak.py                          # SmolLM2-135M, 2 prefill + 2 decode, 5 minutes
    python load_tests/soak.py --tiny --duration-s 60   # a short run with a tiny test model

The client runs at the replicas' niceness (15). Killed replicas come back under new pids, so RSS/files/threads are
sums over the live replica processes at each sample.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, "tests")
from serving import Served, free_port, ray_serve

_BLOCK_GAUGES = ("pdserve_kv_blocks_used", "pdserve_kv_blocks_held", "pdserve_kv_blocks_reserved",
                 "pdserve_kv_blocks_fenced")  # fmt: skip


async def request(client: httpx.AsyncClient, url: str, body: dict[str, object], abort_after_s: float | None) -> str:
    async def run() -> str:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                return str(response.status_code)
            text = ""
            async for line in response.aiter_lines():
                text += line
            return "error-event" if '"error"' in text else "200"

    try:
        if abort_after_s is not None:
            return await asyncio.wait_for(run(), abort_after_s)
        return await run()
    except (TimeoutError, httpx.TimeoutException):
        return "aborted" if abort_after_s is not None else "hung"
    except httpx.HTTPError:
        return "connection-error"


def replica_processes(kind: str = "") -> list[int]:
    """The Serve replica processes whose command line has `kind` in it (e.g. "Ingress")."""
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True, check=True).stdout
    rows = [line.strip().split(None, 1) for line in out.splitlines()[1:]]
    return [int(pid) for pid, cmd in rows if "ray::ServeReplica" in cmd and kind in cmd]


def process_totals(pids: list[int]) -> tuple[float, int, int]:
    """(RSS MB, open files, threads) summed over `pids` (gone ones skipped)."""
    rss_kb = files = threads = 0
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            files += len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        rss_kb += int(fields["VmRSS"].split()[0])
        threads += int(fields["Threads"])
    return rss_kb / 1024, files, threads


def sample(served: Served, start: float) -> tuple[object, ...]:
    metrics = served.metrics()
    blocks = [sum(metrics.get(name, {}).values()) for name in _BLOCK_GAUGES]
    in_flight = sum(metrics.get("pdserve_router_in_flight", {}).values())
    rss, files, threads = process_totals(replica_processes())
    ingress_rss = process_totals(replica_processes("Ingress"))[0]
    return (round(time.monotonic() - start), *(int(b) for b in blocks), int(in_flight), round(rss), round(ingress_rss),
            files, threads)  # fmt: skip


def kill_a_decode_replica() -> None:
    import ray

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["namespace"] == "serve" and "#DecodeServer#" in a["name"]]  # fmt: skip
    if names:
        actor = ray.get_actor(random.choice(names), namespace="serve")
        os.kill(ray.get(actor.__ray_call__.remote(lambda _: os.getpid()), timeout=30), signal.SIGKILL)


async def soak(served: Served, args: argparse.Namespace) -> None:
    rng = random.Random(7)
    prompts = [[rng.randrange(100, 400) for _ in range(rng.randint(16, args.prompt_tokens))] for _ in range(64)]
    url = f"{served.base_url}/completions"
    outcomes: dict[str, int] = {}
    samples = [("t s", "used", "held", "reserved", "fenced", "in flight", "RSS MB", "ingress MB", "files", "threads")]
    start = time.monotonic()
    next_sample, next_kill, tasks = start, start + args.kill_every_s, []

    def count(task: asyncio.Task[str]) -> None:
        outcomes[task.result()] = outcomes.get(task.result(), 0) + 1

    async with httpx.AsyncClient(timeout=args.hang_s, limits=httpx.Limits(max_connections=1000)) as client:
        while time.monotonic() - start < args.duration_s:
            body = {"model": "m", "prompt": rng.choice(prompts), "max_tokens": args.max_tokens, "temperature": 0,
                    "ignore_eos": True, "stream": True}  # fmt: skip
            abort = rng.uniform(0.05, 3.0) if rng.random() < args.abort_share else None
            task = asyncio.ensure_future(request(client, url, body, abort))
            task.add_done_callback(count)
            tasks.append(task)
            now = time.monotonic()
            if now >= next_sample:
                samples.append(await asyncio.to_thread(sample, served, start))
                next_sample += args.sample_s
            if now >= next_kill:
                await asyncio.to_thread(kill_a_decode_replica)
                next_kill += args.kill_every_s
            await asyncio.sleep(rng.expovariate(args.rate))
        await asyncio.gather(*tasks)
    await asyncio.sleep(3)  # let the ingress refresh replica stats once more
    samples.append(sample(served, start))
    for row in samples:
        print("| " + " | ".join(str(v) for v in row) + " |")
        if row is samples[0]:
            print("|" + "---|" * len(row))
    print(f"\nanswers: {dict(sorted(outcomes.items()))} ({sum(outcomes.values())} requests, {args.rate} req/s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--rate", type=float, default=1.3, help="requests per second (about half of capacity)")
    parser.add_argument("--duration-s", type=float, default=300.0)
    parser.add_argument("--kill-every-s", type=float, default=60.0)
    parser.add_argument("--sample-s", type=float, default=10.0)
    parser.add_argument("--abort-share", type=float, default=0.1)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--hang-s", type=float, default=120.0)
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for the engine replicas' environment")
    args = parser.parse_args()
    os.nice(15 - os.nice(0))
    from ray import serve

    from pdserve.hub import resolve_model
    from pdserve.serve.app import build_app
    from pdserve.serve.config import ServeConfig

    if args.tiny:
        from tiny_models import build_all

        model_path = str(build_all(Path("/tmp/pdserve-soak-models"))["llama"])
    else:
        model_path = str(resolve_model(None))
    env = dict(item.split("=", 1) for item in args.env)
    two = {"num_replicas": 2, "ray_actor_options": {"num_cpus": 0, "runtime_env": {"env_vars": env}}}
    config = ServeConfig(model=model_path, served_model_name="m", prefill=two, decode=two, num_kv_blocks=1024)
    port = free_port()
    with ray_serve(port):
        serve.run(build_app(config), name="soak", route_prefix="/")
        asyncio.run(soak(Served(f"http://127.0.0.1:{port}/v1"), args))


if __name__ == "__main__":
    main()
