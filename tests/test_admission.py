"""Admission control: a budget of prompt tokens waiting for their first token, decided before any work — unit
rules, and a burst far above capacity through real HTTP in colocated and 1P1D modes: only 200 (exact) or 429 with
Retry-After, never a 500 or a hang, both modes alike, and nothing left held afterwards."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from oracle import HTTP_MAX_TOKENS, random_prompts
from pdserve.router.admission import Admission
from serving import Served, deploy, shared_serve
from test_storm import _assert_idle, _mixed_prompts

pytestmark = pytest.mark.serve_cluster


def test_the_budget_counts_prompts_until_their_first_token() -> None:
    admission = Admission(max_queued_tokens=100)
    assert admission.admit("a", 60) and admission.admit("b", 40)
    assert not admission.admit("c", 1)  # refused: nothing changes
    assert (admission.num_queued_tokens, admission.num_queued, admission.counters.num_refused) == (100, 2, 1)
    admission.started("a")  # its first token: its prompt no longer waits
    assert admission.admit("c", 60) and admission.num_queued_tokens == 100
    for request_id in ("a", "b", "c", "c"):  # finish is idempotent, started-then-finished counts once
        admission.finish(request_id)
    assert (admission.num_queued_tokens, admission.num_queued) == (0, 0)
    assert admission.admit("huge", 10_000)  # alone, a prompt over the whole budget still gets in (never starves)
    assert not admission.admit("next", 1)
    # A further choice of an admitted request (n > 1) is counted, never refused; refused ones changed nothing.
    assert admission.admit("huge-1", 5, is_part_of_admitted=True) and admission.num_queued_tokens == 10_005
    assert admission.counters.num_refused == 2


def test_further_choices_share_the_first_ones_prompt() -> None:
    from pdserve.api.backend import GenerationRequest
    from pdserve.api.choices import choice_requests

    request = GenerationRequest("cmpl-1", [5, 6], 4, 0.0, 1.0, 0, 7, [], False, 0, False)
    requests = choice_requests(request, 3)
    assert [r.shares_prompt_of for r in requests] == [None, "cmpl-1-0", "cmpl-1-0"]
    assert [r.request_id for r in requests] == ["cmpl-1-0", "cmpl-1-1", "cmpl-1-2"]
    assert [r.seed for r in requests] == [7, 8, 9]
    assert choice_requests(request, 1)[0].shares_prompt_of is None


def test_a_batch_of_prompts_is_admitted_whole_with_its_first() -> None:
    """A batch's first prompt is admitted with room for every prompt (or refused, changing nothing); the further
    prompts join as parts of it, counted and never refused: a batch is never cut in two by the budget."""
    from pdserve.api.backend import GenerationRequest
    from pdserve.api.choices import batch_requests

    prompts = [
        GenerationRequest(f"cmpl-1-{p}", [5] * (p + 1), 4, 0.0, 1.0, 0, 7, [], False, 0, False) for p in range(3)
    ]
    requests = batch_requests(prompts, 2)
    assert [r.request_id for r in requests] == [f"cmpl-1-{p}-{j}" for p in range(3) for j in range(2)]
    assert [r.shares_prompt_of for r in requests] == [None, "cmpl-1-0-0", None, "cmpl-1-1-0", None, "cmpl-1-2-0"]
    assert [r.batched_with for r in requests] == [None, None, "cmpl-1-0-0", None, "cmpl-1-0-0", None]
    assert [r.batch_prompt_tokens for r in requests] == [6, None, None, None, None, None]
    assert [r.seed for r in requests] == [7, 8] * 3  # each prompt's choices seeded as the prompt alone
    assert batch_requests(prompts[:1], 1) == prompts[:1]

    admission = Admission(max_queued_tokens=100)
    assert admission.admit("other", 30)
    assert not admission.admit("b-0", 40, room_for=80)  # the batch's 80 tokens do not fit beside 30
    assert (admission.num_queued_tokens, admission.num_queued) == (30, 1)
    assert admission.admit("b-0", 40, room_for=70)  # they fit, and the room is held until its first token
    assert admission.num_queued_tokens == 100 and not admission.admit("late", 1)  # (found in review: it was not)
    admission.started("b-0")  # its first token: the further prompts join as parts
    assert admission.admit("b-1", 30, is_part_of_admitted=True) and admission.num_queued_tokens == 60
    for request_id in ("other", "b-0", "b-1"):
        admission.finish(request_id)
    # Alone, a batch over the whole budget still gets in, holding the whole budget: as a prompt over it would
    assert admission.admit("c-0", 10, room_for=500) and admission.num_queued_tokens == 100
    admission.finish("c-0")
    assert admission.admit("d-0", 150, room_for=160) and admission.num_queued_tokens == 150  # its own count at least


def test_the_ingress_replicas_split_the_pools_budget() -> None:
    """Each ingress replica admits on its own: with the whole pool's budget each, 2 ingress replicas let twice the
    configured prompt tokens queue (found in review). Each admits its share, rounded up."""
    from pdserve.serve.config import ServeConfig

    config = ServeConfig(max_queued_prefill_tokens=1000, ingress={"num_replicas": 3})
    assert config.admission_budget(2) == 667  # 2 prefill replicas' 2000 tokens over 3 ingress replicas
    assert config.admission_budget(0) == 334  # a pool scaled to 0 still admits (its requests prefill on decode)
    assert ServeConfig(max_queued_prefill_tokens=1000).admission_budget(2) == 2000


@pytest.fixture(scope="module")
def apps(tiny_models: dict[str, Path]) -> Iterator[dict[str, Served]]:

    from pdserve.serve.config import ServeConfig

    common: dict[str, Any] = {
        "model": str(tiny_models["llama"]), "dtype": "float32", "served_model_name": "tiny", "num_kv_blocks": 48,
        "max_queued_prefill_tokens": 400, "router": {"local_prefill_max_tokens": 0},
    }  # fmt: skip
    configs = {"colocated": ServeConfig(**common, colocated=True), "1p1d": ServeConfig(**common)}
    with shared_serve() as port:
        deploy({name: (config, f"/{name}") for name, config in configs.items()})
        engines = {"colocated": 1, "1p1d": 2}
        yield {
            name: Served(f"http://127.0.0.1:{port}/{name}/v1", num_engine_replicas=engines[name]) for name in configs
        }


async def _burst(served: Served, prompts: list[list[int]]) -> list[httpx.Response]:
    body = {"model": "tiny", "max_tokens": HTTP_MAX_TOKENS, "temperature": 0, "ignore_eos": True}
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=500)) as client:
        return list(
            await asyncio.gather(
                *(client.post(f"{served.base_url}/completions", json=body | {"prompt": p}) for p in prompts)
            )
        )


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["colocated", "1p1d"])
def test_a_burst_far_above_capacity_gets_200_or_429(apps: dict[str, Served], oracle, mode: str) -> None:  # type: ignore[no-untyped-def]
    served = apps[mode]
    prompts = _mixed_prompts(seed=60, n=150)
    responses = asyncio.run(asyncio.wait_for(_burst(served, prompts), 180))  # no hang
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429}, sorted(set(statuses))
    refused = [r for r in responses if r.status_code == 429]
    assert refused and all(r.headers.get("Retry-After") == "1" for r in refused)
    assert all(r.json()["error"]["type"] == "rate_limit_error" for r in refused), refused[0].json()
    served_ok = [(p, r.json()) for p, r in zip(prompts, responses, strict=True) if r.status_code == 200]
    assert served_ok and all(body["choices"][0]["text"] == oracle(p) for p, body in served_ok)
    assert all(body["usage"]["completion_tokens"] == HTTP_MAX_TOKENS for _, body in served_ok)
    print(f"{mode}: {len(served_ok)} served exactly, {len(refused)} refused with 429 out of {len(prompts)}")
    _assert_idle(served, f"{mode} after the burst", timeout_s=10)


@pytest.mark.parametrize("mode", ["colocated", "1p1d"])
@pytest.mark.parametrize("stream", [False, True])
def test_n_choices_of_a_prompt_the_budget_holds_once_are_served(
    apps: dict[str, Served],
    oracle,
    mode: str,
    stream: bool,  # type: ignore[no-untyped-def]
) -> None:
    """n = 4 on a 150-token prompt against a 400-token budget on an idle server: the further 3 choices start at
    choice 0's first token, and were each charged the whole prompt (450 > 400): the third refused, a 429 (or, streamed,
    an error event after choice 0's tokens) for a request the server had taken. They share choice 0's cached
    prompt: part of the admitted request, never refused."""
    served = apps[mode]
    prompt = random_prompts([150], 512, seed=61)[0]
    body = {"model": "tiny", "prompt": prompt, "n": 4, "max_tokens": HTTP_MAX_TOKENS, "temperature": 0,
            "ignore_eos": True, "stream": stream}  # fmt: skip
    response = httpx.post(f"{served.base_url}/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    if stream:
        events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and not any('"error"' in e for e in events), events[-3:]
        texts = [""] * 4
        for event in events[:-1]:
            for choice in json.loads(event)["choices"]:
                texts[choice["index"]] += choice["text"]
    else:
        texts = [choice["text"] for choice in sorted(response.json()["choices"], key=lambda c: c["index"])]
    assert texts == [oracle(prompt)] * 4  # greedy: every choice the same exact text
    _assert_idle(served, f"{mode} after n = 4", timeout_s=10)
