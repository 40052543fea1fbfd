"""Cache-aware routing vs Serve's power-of-two choices on a real local Ray cluster (2 prefill + 2 decode), same run,
same trace — and the replay simulator on that trace next to it.

The trace: multi-turn conversations that share system prompts and grow turn by turn (`sim.trace.multiturn_trace`),
replayed open-loop at its arrival times as streaming completions over HTTP (official openai client). Per policy: a
fresh app (cold caches), realized prefix-cache hit rate (the computing replica's cached tokens from each response's
usage / prompt tokens), mean and p90 TTFT, KV blocks moved P -> D (from /metrics), decisions by mode.

    python load_tests/router_compare.py                       # SmolLM2-135M, dtype auto, 16 conversations x 4 turns
    python load_tests/router_compare.py --conversations 24 --threads 1
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import httpx
import openai
import torch

sys.path.insert(0, "tests")  # reuse the test harness's cluster helpers
from pdserve.engine.weights import resolve_dtype
from pdserve.hub import resolve_model
from pdserve.router import CostConfig
from pdserve.sim import ReplicaModel, SimConfig, TraceRequest, ideal_hit_rate, multiturn_trace, simulate
from serving import Served, free_port, ray_serve

POLICIES: dict[str, dict[str, object]] = {  # name -> router settings
    "cache_aware": {"policy": "cache_aware"},
    "cache_aware_no_local": {"policy": "cache_aware", "local_prefill_max_tokens": 0},
    "pow2": {"policy": "pow2"},
}


@dataclass(frozen=True)
class Outcome:
    ttft_s: float
    tpot_s: float
    num_prompt_tokens: int
    num_cached_tokens: int


@dataclass(frozen=True)
class Row:
    policy: str
    source: str  # "real" | "sim"
    hit_rate: float
    mean_ttft_s: float
    p90_ttft_s: float
    mean_tpot_s: float | None  # not modeled per token by the simulator
    num_blocks_moved: float
    local: float
    disaggregated: float


async def one(client: openai.AsyncOpenAI, request: TraceRequest) -> Outcome:
    start = time.perf_counter()
    first = last = 0.0
    count = cached = 0
    stream = await client.completions.create(
        model="m", prompt=list(request.prompt_token_ids), max_tokens=request.output_len, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )  # fmt: skip
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            last = time.perf_counter()
            first = first or last
            count += 1
        if chunk.usage is not None and chunk.usage.prompt_tokens_details is not None:
            cached = chunk.usage.prompt_tokens_details.cached_tokens or 0
    return Outcome(first - start, (last - first) / max(count - 1, 1), len(request.prompt_token_ids), cached)


async def replay(base_url: str, trace: list[TraceRequest]) -> list[Outcome]:
    """Send each request at its arrival time (open loop) and wait for all."""
    async with openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600) as client:
        await one(client, TraceRequest("warmup", 0.0, tuple(range(100, 120)), 2))
        start = time.perf_counter()

        async def at_arrival(request: TraceRequest) -> Outcome:
            await asyncio.sleep(max(0.0, request.arrival_s - (time.perf_counter() - start)))
            return await one(client, request)

        return list(await asyncio.gather(*[at_arrival(r) for r in trace]))


def counter(served: Served, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for k, v in served.metrics().get(name, {}).items() if want <= set(k))


def run_real(args: argparse.Namespace, path: str, dtype: str, trace: list[TraceRequest]) -> list[Row]:
    from ray import serve

    from pdserve.serve.app import build_app
    from pdserve.serve.config import ServeConfig

    rows = []
    port = free_port()
    with ray_serve(port):
        pool = {"num_replicas": 2, "num_threads": args.threads}
        for name in args.policies:
            config = ServeConfig(
                model=path, dtype=dtype, served_model_name="m", prefill=pool, decode=pool, router=POLICIES[name]
            )
            serve.run(build_app(config), name="bench", route_prefix="/")
            served = Served(f"http://127.0.0.1:{port}/v1")
            outcomes = asyncio.run(replay(served.base_url, trace))
            time.sleep(2.5)  # the ingress refreshes replica counters every second
            local = counter(served, "pdserve_router_decisions_total", mode="local")
            disagg = counter(served, "pdserve_router_decisions_total", mode="disaggregated") or len(trace) - local
            ttft = sorted(o.ttft_s for o in outcomes)
            rows.append(
                Row(
                    policy=name,
                    source="real",
                    hit_rate=sum(o.num_cached_tokens for o in outcomes) / sum(o.num_prompt_tokens for o in outcomes),
                    mean_ttft_s=statistics.mean(ttft),
                    p90_ttft_s=ttft[int(0.9 * (len(ttft) - 1))],
                    mean_tpot_s=statistics.mean(o.tpot_s for o in outcomes),
                    num_blocks_moved=counter(served, "pdserve_kv_transfer_blocks_total", role="prefill"),
                    local=local,
                    disaggregated=disagg,
                )
            )
            httpx.get(f"{served.root}/health", timeout=5)
            serve.delete("bench")
    return rows


def run_sim(args: argparse.Namespace, trace: list[TraceRequest]) -> list[Row]:
    rows = []
    """The same trace through the simulator: replicas modeled at this box's shared speed, the router with the
    weights the real run used; "oracle" is cache_aware with a perfect, instant index."""
    model = ReplicaModel(
        args.sim_decode_step_s, 1 / args.sim_prefill_tokens_per_s, args.sim_decode_step_per_seq_s
    )  # the old model's prefill had no step base: a 512-token prompt takes 30 ms more here
    for name in [*args.policies, "oracle"]:
        settings = POLICIES["cache_aware" if name == "oracle" else name]
        threshold = settings.get("local_prefill_max_tokens", CostConfig.local_prefill_max_tokens)
        cost = CostConfig(local_prefill_max_tokens=int(threshold))  # type: ignore[call-overload]
        policy = "oracle" if name == "oracle" else str(settings["policy"])
        overhead_s = args.sim_hop_overhead_s
        config = SimConfig(2, 2, model, hop_overhead_s=overhead_s, policy=policy, cost=cost, seed=args.seed)
        result = simulate(trace, config)
        d = {mode.value: n for mode, n in result.decisions.items()}
        rows.append(
            Row(
                policy=name,
                source="sim",
                hit_rate=result.hit_rate,
                mean_ttft_s=result.mean_ttft_s,
                p90_ttft_s=result.p90_ttft_s,
                mean_tpot_s=None,
                num_blocks_moved=result.num_transferred_blocks,
                local=d["local"],
                disaggregated=d["disaggregated"],
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per engine replica")
    parser.add_argument("--policies", nargs="+", choices=list(POLICIES), default=list(POLICIES))
    parser.add_argument("--conversations", type=int, default=16)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--system-prompts", type=int, default=2)
    parser.add_argument("--system-tokens", type=int, default=512)
    parser.add_argument("--user-tokens", type=int, default=64)
    parser.add_argument("--reply-tokens", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--turn-interval-s", type=float, default=6.0)
    parser.add_argument("--stagger-s", type=float, default=0.4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--local-prefill-max-tokens", type=int, default=CostConfig.local_prefill_max_tokens)
    sim = parser.add_argument_group("simulator (modeled replicas: 4 engines sharing this box's cores)")
    sim.add_argument("--sim-prefill-tokens-per-s", type=float, default=1450.0)
    sim.add_argument("--sim-decode-step-s", type=float, default=0.03)
    sim.add_argument("--sim-decode-step-per-seq-s", type=float, default=0.002)
    sim.add_argument("--sim-hop-overhead-s", type=float, default=0.02)
    args = parser.parse_args()
    POLICIES["cache_aware"]["local_prefill_max_tokens"] = args.local_prefill_max_tokens

    dtype = str(resolve_dtype(args.dtype, torch.device("cpu"))).removeprefix("torch.")
    path = str(resolve_model(args.model, "bfloat16" if dtype == "bfloat16" else "float32"))
    trace = multiturn_trace(
        args.conversations, args.turns, args.system_prompts, args.system_tokens, args.user_tokens, args.reply_tokens,
        args.output_len, args.turn_interval_s, args.stagger_s, vocab_size=49152, seed=args.seed,
    )  # fmt: skip
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    model_line = next((line for line in lscpu.splitlines() if line.startswith("Model name")), "?")
    flags = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in lscpu]
    num_tokens = sum(len(r.prompt_token_ids) for r in trace)
    print(f"# {model_line.strip()}; flags: {' '.join(flags)}; dtype {dtype}; {args.threads} thread(s) per engine")
    shape = f"{args.conversations} conversations x {args.turns} turns"
    print(f"# {len(trace)} requests ({shape}), {num_tokens} prompt tokens")
    rows = run_real(args, path, dtype, trace) + run_sim(args, trace)
    ideal = ideal_hit_rate(trace, 16)
    print(f"\nideal hit rate (infinite cache, every earlier prompt): {ideal:.3f}\n")
    print("| policy | source | hit rate | mean TTFT ms | p90 TTFT ms | mean TPOT ms | KV blocks moved | local/disagg |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        tpot = "-" if r.mean_tpot_s is None else f"{1e3 * r.mean_tpot_s:.1f}"
        print(
            f"| {r.policy} | {r.source} | {r.hit_rate:.3f} | {1e3 * r.mean_ttft_s:.0f} | {1e3 * r.p90_ttft_s:.0f} "
            f"| {tpot} | {r.num_blocks_moved:.0f} | {r.local:.0f} / {r.disaggregated:.0f} |"
        )
    real = {r.policy: r for r in rows if r.source == "real"}
    oracle = next(r for r in rows if r.policy == "oracle")
    if "cache_aware" in real and "pow2" in real:
        aware, pow2 = real["cache_aware"], real["pow2"]
        print(
            f"\nreal: cache_aware hit rate = {aware.hit_rate / oracle.hit_rate:.0%} of the simulated oracle's; "
            f"TTFT pow2 / cache_aware: mean {pow2.mean_ttft_s / aware.mean_ttft_s:.2f}x, "
            f"p90 {pow2.p90_ttft_s / aware.p90_ttft_s:.2f}x"
        )


if __name__ == "__main__":
    main()
