"""The real model: SmolLM2-135M-Instruct (float32, CPU) is token-identical to transformers' generate()."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from handoff import prefill_then_decode
from oracle import (
    Reference,
    assert_matches,
    greedy,
    load_reference_model,
    random_prompts,
    reference_greedy,
    run_staggered,
)
from pdserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from pdserve.engine import EngineRequest, LLMEngine

pytestmark = pytest.mark.slow
MAX_TOKENS = 32
SYSTEM = "You are a concise assistant. Answer in one short sentence, and never use lists."
QUESTIONS = ["What is the capital of France?", "Why is the sky blue?", "Name a prime number above 10."]


@pytest.fixture(scope="module")
def workload(smollm2_dir: Path) -> tuple[list[list[int]], list[Reference]]:
    """8 prompts of 1..300 tokens (3 chats sharing a system prompt, random ones) and their references."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    chats = [
        tokenizer.apply_chat_template(
            [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )
        for q in QUESTIONS
    ]
    prompts = [list(c) for c in chats] + random_prompts([1, 16, 90, 200, 300], 49152, seed=21, low=100)
    model = load_reference_model(smollm2_dir)
    return prompts, [reference_greedy(model, p, MAX_TOKENS) for p in prompts]


def make_engine(path: Path, num_blocks: int = 512, budget: int = 512) -> LLMEngine:
    return LLMEngine(
        EngineConfig(
            ModelConfig(str(path), dtype="float32"),
            CacheConfig(num_blocks=num_blocks),
            SchedulerConfig(max_num_batched_tokens=budget),
        )
    )


def requests(prompts: list[list[int]]) -> list[EngineRequest]:
    return [EngineRequest(f"r{i}", tuple(p), greedy(MAX_TOKENS)) for i, p in enumerate(prompts)]


def check(refs: list[Reference], got: dict[str, list[int]], engine: LLMEngine) -> None:
    for i, ref in enumerate(refs):
        assert_matches(ref, got[f"r{i}"], f"SmolLM2 request {i}")
    assert engine.stats().num_used_blocks == 0


def test_chat_answer_is_right(smollm2_dir: Path, workload: tuple) -> None:
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    _, refs = workload
    assert "Paris" in tokenizer.decode(refs[0].token_ids)


def test_staggered_with_shared_system_prompt(smollm2_dir: Path, workload: tuple) -> None:
    prompts, refs = workload
    engine = make_engine(smollm2_dir)
    got = run_staggered(engine, [(3 * i, r) for i, r in enumerate(requests(prompts))])
    check(refs, got, engine)
    assert engine.pool.stats().num_cached_blocks > 0


def test_prefix_hits_are_reported(smollm2_dir: Path, workload: tuple) -> None:
    prompts, refs = workload
    engine = make_engine(smollm2_dir)
    got = run_staggered(engine, [(0, requests(prompts)[0])])
    engine.add_request(requests(prompts)[1])
    num_cached = None
    while engine.has_unfinished():
        for out in engine.step():
            num_cached = out.num_cached_tokens
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
    assert num_cached is not None and num_cached >= 16
    assert_matches(refs[1], got["r1"], "prefix-hit chat")


def test_chunked_prefill_and_preemption(smollm2_dir: Path, workload: tuple) -> None:
    prompts, refs = workload
    engine = make_engine(smollm2_dir, num_blocks=40, budget=64)  # 640 slots for ~1000 tokens in flight
    got = run_staggered(engine, [(i, r) for i, r in enumerate(requests(prompts))])
    assert engine.num_preemptions > 0
    check(refs, got, engine)


def test_split_prefill_and_decode_engines(smollm2_dir: Path, workload: tuple) -> None:
    prompts, refs = workload
    prefill, decode = make_engine(smollm2_dir), make_engine(smollm2_dir)
    for i, request in enumerate(requests(prompts)):
        tokens, _ = prefill_then_decode(prefill, decode, request)
        assert_matches(refs[i], tokens, f"SmolLM2 split request {i}")
    assert prefill.stats().num_used_blocks == 0 and decode.stats().num_used_blocks == 0
