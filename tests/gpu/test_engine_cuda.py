"""The engine on CUDA: token-exact with transformers (float32, same GPU); bf16 runs. Skipped without CUDA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import FAMILIES
from handoff import prefill_then_decode
from oracle import assert_matches, greedy, random_prompts, reference_greedy, run_staggered
from pdserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from pdserve.engine import EngineRequest, LLMEngine

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
LENGTHS = [1, 7, 16, 17, 45, 100, 160, 300]


def make_engine(path: Path, dtype: str = "float32", num_blocks: int = 256, budget: int = 64) -> LLMEngine:
    return LLMEngine(
        EngineConfig(
            ModelConfig(str(path), dtype=dtype, device="cuda"),
            CacheConfig(num_blocks=num_blocks),
            SchedulerConfig(max_num_batched_tokens=budget),
        )
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_greedy_matches_transformers(tiny_models: dict[str, Path], family: str) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False  # the oracle is float32, not TF32
    path = tiny_models[family]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
    prompts = random_prompts(LENGTHS, model.config.vocab_size)
    refs = [reference_greedy(model, p, 24) for p in prompts]
    requests = [EngineRequest(f"r{i}", tuple(p), greedy(24)) for i, p in enumerate(prompts)]
    engine = make_engine(path, num_blocks=26)  # small pool: preemption on the GPU path too
    got = run_staggered(engine, [(i, r) for i, r in enumerate(requests)])
    for i, ref in enumerate(refs):
        assert_matches(ref, got[f"r{i}"], f"cuda {family} request {i}")
    assert engine.stats().num_used_blocks == 0
    prefill, decode = make_engine(path), make_engine(path)
    for i, request in enumerate(requests):
        tokens, _ = prefill_then_decode(prefill, decode, request)
        assert_matches(refs[i], tokens, f"cuda split {family} request {i}")


def test_cuda_bfloat16_runs_and_frees_blocks(tiny_models: dict[str, Path]) -> None:
    engine = make_engine(tiny_models["llama"], dtype="auto")
    assert engine.model.dtype == torch.bfloat16
    prompts = random_prompts([5, 50, 200], 500)
    got = run_staggered(engine, [(0, EngineRequest(f"r{i}", tuple(p), greedy(16))) for i, p in enumerate(prompts)])
    assert all(len(t) == 16 for t in got.values())
    assert engine.stats().num_used_blocks == 0
