"""Graceful drain on a real local Ray cluster (tiny Llama): the decode pool scales 2 -> 1 under a steady load of
greedy streams. Redeploying with only the pool size changed scales in place (the surviving replicas keep running:
no rolling restart); the router stops choosing the leaving replica at once, Serve lets its streams finish within the
grace period, and every request completes token-exact — 0 errors — with nothing left held anywhere."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from pathlib import Path
from typing import Any

import openai
import pytest

from oracle import HTTP_MAX_TOKENS
from serving import Served, greedy_text, shared_serve
from test_storm import _assert_idle, _mixed_prompts

pytestmark = [pytest.mark.slow, pytest.mark.serve_cluster]
NUM_CLIENTS = 16


def test_scaling_decode_down_under_load_loses_no_stream(tiny_models: dict[str, Path], oracle) -> None:  # type: ignore[no-untyped-def]
    from ray.serve.context import _get_global_client

    from pdserve.serve.config import ServeConfig

    faults = {"env_vars": {"PDSERVE_FAULTS": "engine.step=slow:0.02"}}  # streams last long enough to drain
    slow_decode = {"ray_actor_options": {"num_cpus": 0, "runtime_env": faults}}
    config = ServeConfig(
        model=str(tiny_models["llama"]), dtype="float32", served_model_name="tiny", num_kv_blocks=400,
        router={"local_prefill_max_tokens": 0}, drain_grace_s=20.0, decode=slow_decode | {"num_replicas": 2},
    )  # fmt: skip
    with shared_serve() as port:
        client = _get_global_client()
        client.deploy_apps(_serve_deploy_config(config, num_decode=2), _blocking=True)
        served = Served(f"http://127.0.0.1:{port}/drain/v1")
        before = _wait_for_replicas(served, "decode", 2, timeout_s=30)
        scaled = threading.Event()

        def scale_down() -> None:
            time.sleep(3.0)  # under load by then
            client.deploy_apps(_serve_deploy_config(config, num_decode=1), _blocking=True)
            scaled.set()

        scaler = threading.Thread(target=scale_down, daemon=True)
        scaler.start()
        prompts = _mixed_prompts(seed=95, n=64)
        results = asyncio.run(_steady_load(served, prompts, until=scaled, tail_s=3.0))
        scaler.join(timeout=60)
        after = _wait_for_replicas(served, "decode", 1, timeout_s=60)
        # Every engine replica's stats in the idle snapshot (a replica whose stats call failed would pass for idle).
        counted = dataclasses.replace(served, num_engine_replicas=config.prefill.num_replicas + 1)
        _assert_idle(counted, "after the drain", timeout_s=10)
        metrics = served.metrics()
        migrations = sum(metrics.get("pdserve_stream_migrations_total", {}).values())
        retries = sum(metrics.get("pdserve_handoff_retries_total", {}).values())

    errors = [r for _, r in results if r is None]
    wrong = [(p, r) for p, r in results if r is not None and r != oracle(p)]
    print(
        f"decode 2 -> 1 under load: {len(results)} requests, {len(errors)} errors, {len(wrong)} wrong, "
        f"{retries:.0f} handed off again, {migrations:.0f} migrated"
    )
    assert not errors and not wrong
    # The clients are closed-loop until 3 s after the scale-down returned, so streams were in flight through it; how
    # many completed meanwhile is the machine's speed (54 in a CI run beside other work, against 4 x 16 asked before)
    assert len(results) >= 2 * NUM_CLIENTS
    assert after["decode"] < before["decode"], "the survivor is one of the two: scaled in place, not restarted"
    assert after["prefill"] == before["prefill"], "the prefill pool was not restarted"


async def _steady_load(
    served: Served, prompts: list[list[int]], until: threading.Event, tail_s: float
) -> list[tuple[list[int], str | None]]:
    """NUM_CLIENTS closed-loop clients send greedy requests until `until` is set and `tail_s` more have passed."""
    client = openai.AsyncOpenAI(base_url=served.base_url, api_key="unused", max_retries=0, timeout=120)
    results: list[tuple[list[int], str | None]] = []
    stop_at: list[float] = []

    async def one_client(i: int) -> None:
        n = i
        while not stop_at or time.monotonic() < stop_at[0]:
            prompt = prompts[n % len(prompts)]
            n += NUM_CLIENTS
            try:
                results.append((prompt, await greedy_text(client, "tiny", prompt, HTTP_MAX_TOKENS, stream=True)))
            except openai.APIError as e:
                print(f"request failed during the drain: {e!r}")
                results.append((prompt, None))

    async def watch() -> None:
        while not until.is_set():
            await asyncio.sleep(0.1)
        stop_at.append(time.monotonic() + tail_s)

    try:
        await asyncio.wait_for(asyncio.gather(watch(), *(one_client(i) for i in range(NUM_CLIENTS))), 180)
    finally:
        await client.close()
    return results


def _replica_ids(served: Served) -> dict[str, set[str]]:
    """The engine replicas reporting KV stats, by role (the ingress refreshes them every second)."""
    ids: dict[str, set[str]] = {"prefill": set(), "decode": set()}
    for labels in served.metrics().get("pdserve_kv_blocks_used", {}):
        label = dict(labels)
        ids.setdefault(label["role"], set()).add(label["replica"])
    return ids


def _serve_deploy_config(config: Any, num_decode: int) -> Any:
    """What `serve deploy` sends for this app: pdserve's config as the builder's args, and the decode pool's size as
    Serve's own per-deployment override — the change Serve applies in place (args changes restart every replica)."""
    from ray.serve.schema import ServeDeploySchema

    app = {
        "name": "drain", "route_prefix": "/drain", "import_path": "pdserve.serve.app:app_builder",
        "args": config.model_dump(mode="json"), "deployments": [{"name": "DecodeServer", "num_replicas": num_decode}],
    }  # fmt: skip
    return ServeDeploySchema(applications=[app])


def _wait_for_replicas(served: Served, role: str, want: int, timeout_s: float) -> dict[str, set[str]]:
    start = time.monotonic()
    ids = _replica_ids(served)
    while len(ids[role]) != want and time.monotonic() - start < timeout_s:
        time.sleep(0.5)
        ids = _replica_ids(served)
    assert len(ids[role]) == want, ids
    return ids
