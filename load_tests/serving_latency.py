"""Serving latency, same run: pdserve disaggregated (1 prefill + 1 decode) vs colocated, and optionally a peer.

N concurrent streaming completions of P random prompt tokens -> O output tokens (ignore_eos), through real HTTP
with the official openai client; prints TTFT and TPOT medians (and p90) per system.

    python load_tests/serving_latency.py                                  # SmolLM2, dtype auto
    python load_tests/serving_latency.py --peer vllm=http://127.0.0.1:8100/v1 \
        --peer-model SmolLM2-135M-Instruct-bfloat16
(start the peer first: ../shared/peers/vllm-cpu.sh "$(python -m pdserve.hub --dtype bfloat16)" 8100)
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import openai
import torch

sys.path.insert(0, "tests")  # reuse the test harness's cluster helpers
from otlp_receiver import otlp_receiver
from pdserve.engine.weights import resolve_dtype
from pdserve.hub import resolve_model
from serving import free_port, ray_serve


@dataclass(frozen=True)
class Sample:
    ttft_s: float
    tpot_s: float
    num_tokens: int


async def one(client: openai.AsyncOpenAI, model: str, prompt: list[int], max_tokens: int) -> Sample:
    start = time.perf_counter()
    first = last = 0.0
    count = 0
    stream = await client.completions.create(
        model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True, extra_body={"ignore_eos": True}
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            last = time.perf_counter()
            first = first or last
            count += 1
    return Sample(first - start, (last - first) / max(count - 1, 1), count)


async def load(base_url: str, model: str, prompts: list[list[int]], max_tokens: int) -> tuple[list[Sample], float]:
    async with openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600) as client:
        await one(client, model, prompts[0][:16], 4)  # warm-up
        start = time.perf_counter()
        samples = await asyncio.gather(*[one(client, model, p, max_tokens) for p in prompts])
        return list(samples), time.perf_counter() - start


def row(name: str, samples: list[Sample], wall_s: float) -> str:
    ttft = sorted(s.ttft_s for s in samples)
    tpot = sorted(s.tpot_s for s in samples)
    p90 = lambda xs: xs[int(0.9 * (len(xs) - 1))]  # noqa: E731
    tokens = sum(s.num_tokens for s in samples)
    return (
        f"| {name} | {statistics.median(ttft):.2f} | {p90(ttft):.2f} | {1000 * statistics.median(tpot):.1f} | "
        f"{1000 * p90(tpot):.1f} | {tokens / wall_s:.1f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--num-requests", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--peer", action="append", default=[], help="NAME=BASE_URL of an OpenAI server to compare")
    parser.add_argument("--peer-model", default=None, help="model name the peer serves")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per engine replica")
    parser.add_argument(
        "--compare-tracing", type=int, default=0, metavar="ROUNDS",
        help="instead: disaggregated with tracing off vs on (OTLP/HTTP to a local receiver), alternating ROUNDS times",
    )  # fmt: skip
    args = parser.parse_args()

    from ray import serve

    from pdserve.serve.app import build_app
    from pdserve.serve.config import ServeConfig

    dtype = str(resolve_dtype(args.dtype, torch.device("cpu"))).removeprefix("torch.")
    path = str(resolve_model(args.model, "bfloat16" if dtype == "bfloat16" else "float32"))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, 49000, (args.prompt_len,), generator=g).tolist() for _ in range(args.num_requests)]
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    model_line = next((line for line in lscpu.splitlines() if line.startswith("Model name")), "?")
    flags = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in lscpu]
    print(
        f"# {model_line.strip()}; flags: {' '.join(flags)}; dtype {dtype}; {args.num_requests} x "
        f"({args.prompt_len} -> {args.output_len}) concurrent, streaming"
    )
    results = []
    port = free_port()
    with ray_serve(port), otlp_receiver() as (receiver, endpoint):
        pool = {"num_threads": args.threads}
        common = {
            "model": path,
            "dtype": dtype,
            "served_model_name": "m",
            "prefill": pool,
            "decode": pool,
            "engine": pool,
            "tracing_env": {},
            "router": {"local_prefill_max_tokens": 0},  # "disaggregated" means every prompt goes through P
        }
        traced = {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_SERVICE_NAME": "pdserve-bench"}
        systems: list[tuple[str, dict[str, object]]] = [
            ("pdserve disaggregated 1P1D", {}),
            ("pdserve colocated", {"colocated": True}),
        ]
        if args.compare_tracing:
            systems = [("disaggregated, tracing off", {}), ("disaggregated, tracing on", {"tracing_env": traced})]
            systems *= args.compare_tracing
        for name, options in systems:
            serve.run(build_app(ServeConfig(**{**common, **options})), name="bench", route_prefix="/")
            samples, wall = asyncio.run(load(f"http://127.0.0.1:{port}/v1", "m", prompts, args.output_len))
            results.append(row(name, samples, wall))
            serve.delete("bench")
        if args.compare_tracing:
            print(f"# spans received by the OTLP receiver: {len(receiver.spans)}")
    for peer in args.peer:
        name, url = peer.split("=", 1)
        samples, wall = asyncio.run(load(url, args.peer_model or path, prompts, args.output_len))
        results.append(row(name, samples, wall))
    print("\n| system | TTFT median s | TTFT p90 s | TPOT median ms | TPOT p90 ms | output tok/s |")
    print("|---|---|---|---|---|---|")
    print("\n".join(results))


if __name__ == "__main__":
    main()
