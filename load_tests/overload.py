"""Overload: open-loop Poisson arrivals at a multiple of the measured capacity, through real HTTP.

Phases, one run: (1) capacity — closed loop at --concurrency for --capacity-s, completed requests per second;
(2) baseline — Poisson arrivals at --baseline-x × capacity; (3) overload at --overload-x × capacity for --duration-s;
(4) recovery — the baseline rate again. Every request streams (TTFT measured at the first content chunk). Prints
per phase: answers by status (only 200, 429 and 503 are acceptable: never a 500, never a hang), TTFT p50/p90 of the
accepted ones, the share of accepted requests within --ttft-slo-s, and the RSS of the engine replicas before and
after; and how long after the overload the rolling TTFT p90 was back within 1.5× of the baseline's.

    python load_tests/overload.py                     # SmolLM2-135M, 1 prefill + 1 decode, dtype auto
    python load_tests/overload.py --colocated         # the colocated baseline under the same load
    python load_tests/overload.py --tiny --duration-s 10   # seconds-long smoke run with a tiny test model

The load client lowers its own priority to the replicas' (Ray starts workers at niceness 15), so on a small box it
does not preempt the server it measures; the table says so.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, "tests")  # reuse the test harness's cluster helpers
from serving import free_port, ray_serve


@dataclass
class Answer:
    phase: str
    sent_at: float  # seconds since the run started
    status: int  # 0: the client gave up (a hang)
    ttft_s: float | None = None


@dataclass
class Run:
    start: float = field(default_factory=time.monotonic)
    answers: list[Answer] = field(default_factory=list)


async def one(client: httpx.AsyncClient, url: str, body: dict[str, object], run: Run, phase: str) -> Answer:
    sent = time.monotonic()
    answer = Answer(phase, sent - run.start, 0)
    run.answers.append(answer)
    try:
        async with client.stream("POST", url, json=body) as response:
            answer.status = response.status_code
            async for line in response.aiter_lines():
                if answer.ttft_s is None and line.startswith("data: {") and '"text":"' in line.replace(" ", ""):
                    answer.ttft_s = time.monotonic() - sent
    except httpx.HTTPError:
        answer.status = 0
    return answer


async def closed_loop(client: httpx.AsyncClient, url: str, body: dict[str, object], args: argparse.Namespace) -> float:
    run, done = Run(), 0
    end = time.monotonic() + args.capacity_s

    async def worker() -> None:
        nonlocal done
        while time.monotonic() < end:
            if (await one(client, url, body, run, "capacity")).status == 200:  # a refusal is not capacity
                done += 1
            else:
                await asyncio.sleep(0.05)

    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    return done / (time.monotonic() - run.start)


async def poisson(
    client: httpx.AsyncClient, url: str, body: dict[str, object], run: Run, phase: str, rate: float, seconds: float
) -> None:
    rng, tasks = random.Random(phase), []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        tasks.append(asyncio.ensure_future(one(client, url, body, run, phase)))
        await asyncio.sleep(rng.expovariate(rate))
    await asyncio.gather(*tasks)


def replica_rss_mb() -> float:
    """Resident memory of the engine replicas (Ray workers named after the pdserve deployments), in MB."""
    out = subprocess.run(["ps", "-eo", "rss,args"], capture_output=True, text=True, check=True).stdout
    rows = [line.split(None, 1) for line in out.splitlines()[1:]]
    return sum(int(rss) for rss, cmd in rows if "Server" in cmd and "ray::" in cmd) / 1024


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else (values[0] if values else float("nan"))


def recovery_s(run: Run, baseline_p90: float, overload_end: float) -> float | None:
    """Seconds after the overload until a 5 s window of accepted requests has TTFT p90 within 1.5× the baseline's."""
    after = sorted((a.sent_at, a.ttft_s) for a in run.answers if a.phase == "recovery" and a.ttft_s is not None)
    for i, (at, _) in enumerate(after):
        window = [t for s, t in after[i:] if s < at + 5]
        if len(window) >= 3 and percentile(window, 90) <= 1.5 * baseline_p90:
            return at - overload_end
    return None


def report(run: Run, capacity: float, args: argparse.Namespace, rss: tuple[float, float]) -> None:
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("Model name")), "?")
    flags = next((line for line in cpu.splitlines() if line.startswith("Flags")), "")
    native = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in flags]
    print(f"\nCPU: {model} ({' '.join(native)}); mode: {'colocated' if args.colocated else '1P1D'}; "
          f"client at niceness {os.nice(0)} like the replicas; capacity {capacity:.2f} req/s (closed loop, "
          f"{args.concurrency} streams)\n")  # fmt: skip
    print("| phase | rate req/s | sent | 200 | 429 | 503 | other | hung | TTFT p50 s | TTFT p90 s | within SLO |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    rates = {"baseline": args.baseline_x, "overload": args.overload_x, "recovery": args.baseline_x}
    baseline_p90 = float("nan")
    for phase, x in rates.items():
        answers = [a for a in run.answers if a.phase == phase]
        ttfts = [a.ttft_s for a in answers if a.status == 200 and a.ttft_s is not None]
        counts = {s: sum(a.status == s for a in answers) for s in (200, 429, 503, 0)}
        other = len(answers) - sum(counts.values())
        within = sum(t <= args.ttft_slo_s for t in ttfts) / len(ttfts) if ttfts else float("nan")
        p50, p90 = percentile(ttfts, 50), percentile(ttfts, 90)
        baseline_p90 = p90 if phase == "baseline" else baseline_p90
        print(f"| {phase} | {x * capacity:.2f} | {len(answers)} | {counts[200]} | {counts[429]} | {counts[503]} | "
              f"{other} | {counts[0]} | {p50:.2f} | {p90:.2f} | {within:.0%} |")  # fmt: skip
    back = recovery_s(run, baseline_p90, args.baseline_s + args.duration_s)
    when = f"{back:.1f} s" if back is not None else "never"
    print(f"\nTTFT p90 back within 1.5x of the baseline {when} after the "
          f"overload; engine replicas' RSS {rss[0]:.0f} MB before, {rss[1]:.0f} MB after")  # fmt: skip


async def drive(base_url: str, model: str, args: argparse.Namespace) -> None:
    prompt = [random.Random(0).randrange(100, 400) for _ in range(args.prompt_tokens)]
    body = {"model": model, "prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}  # fmt: skip
    url = f"{base_url}/v1/completions"
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=100)
    async with httpx.AsyncClient(timeout=args.hang_s, limits=limits) as client:
        capacity = await closed_loop(client, url, body, args)
        rss_before = replica_rss_mb()
        run = Run()  # its clock starts with the baseline phase
        for phase, x, seconds in (
            ("baseline", args.baseline_x, args.baseline_s),
            ("overload", args.overload_x, args.duration_s),
            ("recovery", args.baseline_x, args.recovery_s),
        ):
            await poisson(client, url, body, run, phase, x * capacity, seconds)
        report(run, capacity, args, (rss_before, replica_rss_mb()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--colocated", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="a tiny random test model instead of SmolLM2")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--capacity-s", type=float, default=20.0)
    parser.add_argument("--baseline-x", type=float, default=0.5)
    parser.add_argument("--baseline-s", type=float, default=20.0)
    parser.add_argument("--overload-x", type=float, default=3.0)
    parser.add_argument("--duration-s", type=float, default=60.0)
    parser.add_argument("--recovery-s", type=float, default=30.0)
    parser.add_argument("--ttft-slo-s", type=float, default=2.0)
    parser.add_argument("--max-queued-prefill-tokens", type=int, default=2048)
    parser.add_argument("--hang-s", type=float, default=180.0, help="a request unanswered this long counts as hung")
    args = parser.parse_args()
    os.nice(15 - os.nice(0))  # the replicas' niceness: the client must not preempt the server it measures
    from ray import serve

    from pdserve.hub import resolve_model
    from pdserve.serve.app import build_app
    from pdserve.serve.config import ServeConfig

    if args.tiny:
        from tiny_models import build_all

        model_path = str(build_all(Path("/tmp/pdserve-overload-models"))["llama"])
    else:
        model_path = str(resolve_model(None))
    config = ServeConfig(
        model=model_path, served_model_name="m", colocated=args.colocated, num_kv_blocks=2048,
        max_queued_prefill_tokens=args.max_queued_prefill_tokens,
    )  # fmt: skip
    port = free_port()
    with ray_serve(port):
        serve.run(build_app(config), name="overload", route_prefix="/")
        asyncio.run(drive(f"http://127.0.0.1:{port}", "m", args))


if __name__ == "__main__":
    main()
