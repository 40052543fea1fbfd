"""Where the serving tax comes from on a small CPU: how much other work on the same cores slows the engine's steps.

The same 16 x (256 -> 64) greedy streams as load_tests/serving_tax.py, on an `AsyncEngine` with one torch thread per
core, under each condition below (interleaved over --rounds; each row the median round). The figure is the mean
pure-decode step (the engine's own `LoadCounters`: decode-step seconds / decode steps), beside output tok/s:

  alone           the engine in this process, nothing else running
  ray actor       the same inside a Ray actor (num_cpus=0, niceness 0, as pdserve's replicas): the worker's
                  environment (OMP_NUM_THREADS=1 from Ray, its threads) without any serving traffic
  python thread   alone + a thread of this process doing --work-ms of pure Python every --period-ms (it takes the
                  GIL, as a replica's event loop does when it streams a step's tokens)
  other process   alone + another process doing the same (CPU only, no GIL: as an ingress, HAProxy or a client)

    python benchmarks/step_interference.py                 # SmolLM2-135M-Instruct, dtype auto
    python benchmarks/step_interference.py --work-ms 1.2 --rounds 5

Reading: `load_tests/serving_tax.py` measures the whole tax through HTTP; this isolates its mechanism. A condition
whose decode step is x% slower than alone costs about x% of throughput, and the ratio of that to the burner's share
of one core says how much a unit of serving CPU costs the engine (2 torch threads wait for each other at every op,
so a preempted thread stalls both).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pdserve.engine.weights import resolve_dtype
from pdserve.hub import resolve_model

WARMUP_PROMPT = list(range(100, 116))


@dataclass(frozen=True)
class Round:
    tokens_per_s: float
    decode_step_s: float
    decode_batch: float


def run_engine(path: str, dtype: str, num_requests: int, prompt_len: int, output_len: int, seed: int) -> Round:
    """The workload on a fresh AsyncEngine in the calling process; its decode steps from the engine's counters."""
    from pdserve.config import CacheConfig, EngineConfig, ModelConfig
    from pdserve.engine import EngineRequest, LLMEngine, SamplingParams
    from pdserve.engine.async_engine import AsyncEngine

    threads = len(os.sched_getaffinity(0))
    engine = AsyncEngine(lambda: LLMEngine(EngineConfig(ModelConfig(path, dtype), CacheConfig())), threads)
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(200, 49000, (prompt_len,), generator=g).tolist() for _ in range(num_requests)]

    async def one(request_id: str, prompt: list[int], max_tokens: int) -> None:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        async for _ in engine.generate(EngineRequest(request_id, tuple(prompt), params)):
            pass

    async def run() -> Round:
        await one("warmup", WARMUP_PROMPT, 8)
        before = (await engine.stats()).load
        start = time.perf_counter()
        await asyncio.gather(*[one(f"r{i}", p, output_len) for i, p in enumerate(prompts)])
        wall = time.perf_counter() - start
        after = (await engine.stats()).load
        assert before is not None and after is not None
        steps = after.decode_steps - before.decode_steps
        return Round(
            num_requests * output_len / wall,
            (after.decode_step_s - before.decode_step_s) / max(steps, 1),
            (after.decode_step_seqs - before.decode_step_seqs) / max(steps, 1),
        )

    try:
        return asyncio.run(run())
    finally:
        engine.shutdown()


def burn(stop: threading.Event | multiprocessing.synchronize.Event, work_s: float, period_s: float) -> None:
    """Pure Python work of `work_s`, then a sleep of `period_s`, until stopped."""
    while not stop.is_set():
        start = time.perf_counter()
        while time.perf_counter() - start < work_s:
            sum(i * i for i in range(200))
        time.sleep(period_s)


def cpu_description() -> str:
    import subprocess

    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    model = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if "Model name" in line), "?")
    flags = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in lscpu]
    return f"{model}; flags: {' '.join(flags)}; {len(os.sched_getaffinity(0))} cores"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a local HF checkpoint (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--num-requests", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--work-ms", type=float, default=0.6, help="the burner's work per period")
    parser.add_argument("--period-ms", type=float, default=4.0, help="the burner's sleep between works")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray actor condition")
    args = parser.parse_args()
    dtype = str(resolve_dtype(args.dtype, torch.device("cpu"))).removeprefix("torch.")
    path = str(resolve_model(args.model, "bfloat16" if dtype == "bfloat16" else "float32"))
    work_s, period_s = args.work_ms / 1e3, args.period_ms / 1e3
    workload = (path, dtype, args.num_requests, args.prompt_len, args.output_len)

    actor = None
    if not args.no_ray:
        import ray

        ray.init(include_dashboard=False, log_to_driver=False)

        @ray.remote(num_cpus=0)
        class EngineActor:
            def run(self, *a: object) -> Round:
                from pdserve.serve.process import set_niceness

                set_niceness(0)  # as pdserve's replicas (Ray starts workers at 15)
                return run_engine(*a)  # type: ignore[arg-type]

        actor = EngineActor.remote()  # type: ignore[attr-defined]

    def beside(kind: str) -> Callable[[int], Round]:
        """The workload while a burner runs in a thread of this process or in another process."""

        def run(seed: int) -> Round:
            fork = multiprocessing.get_context("fork")
            stop = threading.Event() if kind == "thread" else fork.Event()
            args = (stop, work_s, period_s)
            burner = (
                threading.Thread(target=burn, args=args) if kind == "thread" else fork.Process(target=burn, args=args)
            )
            burner.start()
            try:
                return run_engine(*workload, seed)
            finally:
                stop.set()
                burner.join()

        return run

    conditions = {
        "alone": lambda seed: run_engine(*workload, seed),
        "ray actor": (lambda seed: ray.get(actor.run.remote(*workload, seed))) if actor is not None else None,
        "python thread": beside("thread"),
        "other process": beside("process"),
    }
    rounds: dict[str, list[Round]] = {name: [] for name, run in conditions.items() if run is not None}
    for i in range(args.rounds):
        for name in rounds:
            rounds[name].append(conditions[name](1000 * i))  # type: ignore[misc]
            print(f"round {i + 1} {name}: {rounds[name][-1]}", flush=True)
    share = work_s / (work_s + period_s)
    print(
        f"\n# {cpu_description()}; dtype {dtype}; {args.num_requests} x ({args.prompt_len} -> {args.output_len}); "
        f"burner: {args.work_ms} ms of Python every {args.work_ms + args.period_ms} ms (~{100 * share:.0f}% of one "
        f"core); medians of {args.rounds} interleaved rounds\n"
    )
    print("| condition | decode step ms | vs alone | output tok/s | vs alone | mean decode batch |")
    print("|---|---|---|---|---|---|")
    base = None
    for name, rs in rounds.items():
        step = statistics.median(r.decode_step_s for r in rs)
        tps = statistics.median(r.tokens_per_s for r in rs)
        batch = statistics.median(r.decode_batch for r in rs)
        base = base or (step, tps)
        print(f"| {name} | {1e3 * step:.1f} | {step / base[0]:.2f}x | {tps:.0f} | {tps / base[1]:.2f}x | {batch:.1f} |")


if __name__ == "__main__":
    main()
