"""The global router on a real local Ray cluster: 2 prefill + 2 decode replicas (SmolLM2-135M, float32), multi-turn
conversations that share a system prompt and grow turn by turn. Outputs must stay token-exact against transformers
through every routing mode (disaggregated, local prefill on the decode replica, and Serve's power-of-two choices),
and the router's expectations must match what the replicas report."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from transformers import AutoTokenizer

from oracle import load_reference_model, random_prompts, reference_greedy
from serving import Served, deploy, shared_serve

pytestmark = [pytest.mark.slow, pytest.mark.serve_cluster]
MAX_TOKENS = 20
SYSTEM = "You are a helpful assistant who answers briefly and precisely. " * 12  # ~130 tokens: 8 shared blocks


@pytest.fixture(scope="module")
def apps(smollm2_dir: Path) -> Iterator[tuple[Served, Served]]:
    """Cache-aware 2P+2D at /, Serve's pow2 (1P+1D) at /pow2, on one Ray cluster."""

    from pdserve.serve.config import ServeConfig

    common = {"model": str(smollm2_dir), "dtype": "float32", "served_model_name": "smollm2", "num_kv_blocks": 256}
    two = {"num_replicas": 2}
    with shared_serve() as port:
        # local prefill when D lacks <= 64 tokens: a new user turn after cached history, not a fresh conversation
        aware = ServeConfig(**common, prefill=two, decode=two, router={"local_prefill_max_tokens": 64})
        pow2 = ServeConfig(**common, router={"policy": "pow2"})
        deploy({"aware": (aware, "/"), "pow2": (pow2, "/pow2")})
        yield (
            Served(f"http://127.0.0.1:{port}/v1", num_engine_replicas=4),
            Served(f"http://127.0.0.1:{port}/pow2/v1", num_engine_replicas=2),
        )


@pytest.fixture(scope="module")
def reference(smollm2_dir: Path):  # type: ignore[no-untyped-def]
    return load_reference_model(smollm2_dir)


@pytest.fixture(scope="module")
def conversations(smollm2_dir: Path, reference) -> list[list[tuple[list[int], str]]]:  # type: ignore[no-untyped-def]
    """Two conversations of three turns: [(prompt ids, transformers' greedy reply text)] per turn. Each turn's
    prompt is the previous prompt + the model's own reply + a new user turn."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    system = tokenizer(SYSTEM)["input_ids"]
    users = random_prompts([12, 30, 9, 20, 25, 14], 49152, seed=40, low=100)
    result = []
    for c in range(2):
        turns, history = [], list(system)
        for t in range(3):
            prompt = history + users[3 * c + t]
            reply = reference_greedy(reference, prompt, MAX_TOKENS).token_ids
            turns.append((prompt, str(tokenizer.decode(reply, skip_special_tokens=True))))
            history = prompt + reply
        result.append(turns)
    return result


def complete(served: Served, prompt: list[int]) -> str:
    client = openai.OpenAI(base_url=served.base_url, api_key="unused", max_retries=0, timeout=120)
    out = client.completions.create(
        model="smollm2", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, extra_body={"ignore_eos": True}
    )
    assert out.usage is not None and out.usage.completion_tokens == MAX_TOKENS
    return out.choices[0].text


def counter(served: Served, name: str, **labels: str) -> float:
    samples = served.fresh_metrics().get(name, {})
    want = set(labels.items())
    return sum(v for k, v in samples.items() if want <= set(k))


def test_multiturn_is_exact_and_uses_both_modes(apps, conversations) -> None:  # type: ignore[no-untyped-def]
    aware, _ = apps
    for turns in conversations:
        for prompt, reply in turns:
            assert complete(aware, prompt) == reply
            time.sleep(0.5)  # let the router pull the replicas' KV events (every 0.1 s)
    local = counter(aware, "pdserve_router_decisions_total", mode="local")
    disagg = counter(aware, "pdserve_router_decisions_total", mode="disaggregated")
    # Turn 1 of the first conversation has nothing cached: disaggregated. Every later prompt finds its system
    # prompt and history (including the reply the decode replica generated) on one decode replica: local.
    assert (disagg, local) == (1, 5)
    expected = counter(aware, "pdserve_router_expected_hit_tokens_total")
    realized = counter(aware, "pdserve_router_realized_hit_tokens_total")
    assert realized == expected > 0  # with fresh events, the index knows exactly what each replica caches
    assert aware.wait_blocks_used(0) == 0


def test_pow2_routing_is_exact(apps, conversations) -> None:  # type: ignore[no-untyped-def]
    _, pow2 = apps
    for turns in conversations:
        for prompt, reply in turns:
            assert complete(pow2, prompt) == reply
    assert counter(pow2, "pdserve_router_decisions_total") == 0  # Serve routed: no pdserve decisions
    assert pow2.wait_blocks_used(0) == 0
