"""The planner on a real local Ray cluster, through HTTP: a step to 4x the prompt load one P+D pair sustains grows
the prefill pool (Serve applies the planner's target; new replicas start and take traffic), and the drop after it
shrinks the pool again — with every answer token-exact and nothing failed or left held on any replica (a 429 while
replicas start is retried after its Retry-After, as clients do).

Replicas run a tiny Llama with `emulated_step` (a modeled device's step time, mostly sleep): on a 2-core box that is
what makes another replica add capacity (docs/AUTOSCALING.md). `load_tests/autoscale_step.py` is the longer run."""

from __future__ import annotations

import asyncio
import random
import sys
import time
from pathlib import Path
from typing import Any

import openai
import pytest

from oracle import HTTP_MAX_TOKENS
from serving import Served, greedy_text, shared_serve
from test_storm import _assert_idle

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "load_tests"))
from autoscale_step import Phase, config_for, sample

pytestmark = [pytest.mark.slow, pytest.mark.serve_cluster]

PHASES = [Phase("base", 10, 1.5, 600, HTTP_MAX_TOKENS), Phase("4x", 40, 6.0, 600, HTTP_MAX_TOKENS),
          Phase("low", 15, 0.3, 32, HTTP_MAX_TOKENS)]  # fmt: skip


# After the last answer: the planner's downscale delay (5 s) and a replica's drain, with room for a backlog left on a
# slow machine (a CI run's 4x step ran ~30 s past its end).
SHRINK_WAIT_S = 90.0


class _Args:
    ttft_slo_s, tpot_slo_s, max_prefill, max_decode, downscale_s = 1.5, 0.1, 3, 2, 5.0
    fake_nodes = False  # one local Ray instance, no autoscaler (autoscale_step.py --fake-nodes adds one)


def test_prefill_pool_grows_under_a_prompt_step_and_shrinks_after(tiny_models: dict[str, Path], oracle) -> None:  # type: ignore[no-untyped-def]
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    from pdserve.serve.app import deploy_application

    config = config_for(str(tiny_models["llama"]), _Args())
    config = config.model_copy(update={"autoscaling": config.autoscaling.model_copy(update={"interval_s": 1.0})})
    rng = random.Random(7)
    arrivals: list[tuple[float, str, list[int]]] = []
    start = 0.0
    for phase in PHASES:
        t = start + rng.expovariate(phase.rate)
        while t < start + phase.duration_s:
            arrivals.append((t, phase.name, [rng.randrange(3, 500) for _ in range(phase.prompt_tokens)]))
            t += rng.expovariate(phase.rate)
        start += phase.duration_s
    with shared_serve() as port:
        client = _get_global_client()
        app = deploy_application(config, name="planned", route_prefix="/planned")
        client.deploy_apps(ServeDeploySchema(applications=[app]), _blocking=True)
        served = Served(f"http://127.0.0.1:{port}/planned/v1")
        _wait_ready(served)
        answers, samples = asyncio.run(_drive(served, arrivals))
        _assert_idle(served, "after the load", timeout_s=10)
        metrics = served.metrics()

    failed = [(kind, a) for (_, kind, _), a in zip(arrivals, answers, strict=True) if isinstance(a, Exception)]
    wrong = [kind for (_, kind, p), a in zip(arrivals, answers, strict=True) if isinstance(a, str) and a != oracle(p)]
    live = [(row["t"], row.get("prefill_live", 0), row.get("prefill_target")) for row in samples]
    print(f"{len(answers)} requests, {len(failed)} failed, {len(wrong)} wrong; prefill (t, live, target): {live}")
    assert not failed and not wrong
    # The planner asks for more prefill replicas within the step; they start and report (how soon is Serve's and the
    # machine's: a replica process imports torch, ~8 s alone and much longer on a loaded 2-core box).
    targeted_at = next((t for t, _, target in live if (target or 0) >= 2), None)
    assert targeted_at is not None and targeted_at < PHASES[0].duration_s + PHASES[1].duration_s, "within the step"
    peak = max(n for _, n, _ in live)
    assert peak >= 2, "the 4x step grew the prefill pool"
    end_live = live[-1][1]
    assert end_live < peak, f"the pool shrank after the load dropped (watched {SHRINK_WAIT_S:.0f} s after the load)"
    targets = {dict(labels)["pool"] for labels in metrics.get("pdserve_planner_target_replicas", {})}
    assert targets == {"prefill", "decode"}


async def _drive(
    served: Served, arrivals: list[tuple[float, str, list[int]]]
) -> tuple[list[str | Exception], list[dict[str, Any]]]:
    client = openai.AsyncOpenAI(base_url=served.base_url, api_key="unused", max_retries=0, timeout=120)
    done = asyncio.Event()
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    sampler = asyncio.create_task(sample(served.root, done, 1.0, start, out=rows))

    refused = 0

    async def one(at: float, prompt: list[int]) -> str | Exception:
        nonlocal refused
        await asyncio.sleep(max(0.0, at - (time.perf_counter() - start)))
        for _ in range(30):
            try:
                return await greedy_text(client, "m", prompt, HTTP_MAX_TOKENS, stream=True)
            except openai.RateLimitError as e:
                # Admission's 429 before any work while new replicas start (slow on a slower CPU): a client
                # retries after Retry-After. Anything else is a failure.
                refused += 1
                await asyncio.sleep(float(e.response.headers.get("retry-after", 1.0)))
            except openai.APIError as e:
                return e
        return TimeoutError("refused 30 times")

    try:
        answers = await asyncio.gather(*(one(at, prompt) for at, _, prompt in arrivals))
        # Keep watching until the prefill pool is below its peak: the planner shrinks it once the backlog is served,
        # and how long a backlog the step left is the machine's (a slower CPU serves the 4x step past its end).
        deadline = time.perf_counter() + SHRINK_WAIT_S
        await asyncio.sleep(3.0)
        while time.perf_counter() < deadline and not _shrunk(rows):
            await asyncio.sleep(1.0)
    finally:
        done.set()
        await client.close()
    print(f"{refused} answers of 429 (retried)")
    return list(answers), await sampler


def _shrunk(rows: list[dict[str, Any]]) -> bool:
    live = [row.get("prefill_live", 0) for row in rows]
    return bool(live) and live[-1] < max(live)


def _wait_ready(served: Served, timeout_s: float = 60.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{served.root}/ready", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError("not ready")
