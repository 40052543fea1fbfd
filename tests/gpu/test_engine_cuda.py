"""The engine on CUDA: token-exact with transformers (float32, same GPU); bf16 runs. Skipped without CUDA."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import FAMILIES
from handoff import prefill_then_decode
from oracle import assert_matches, greedy, random_prompts, reference_greedy, run_staggered
from pdserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from pdserve.engine import EngineRequest, LLMEngine, SamplingParams
from pdserve.engine.sampler import SampleRow, sample

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


def test_cuda_sampler_adjusts_logits_as_on_cpu() -> None:
    """logit_bias, the three penalties, min_tokens and logprobs on CUDA logits: the same tokens and logprobs as on
    CPU from the same logits (greedy), and seeded draws repeat on CUDA."""
    logits = torch.randn(2, 500, generator=torch.Generator().manual_seed(0))
    history = tuple(torch.randint(0, 500, (40,), generator=torch.Generator().manual_seed(1)).tolist())
    adjusted = dict(
        logit_bias=((history[-1], 5.0), (7, -3.0)),
        presence_penalty=0.5,
        frequency_penalty=0.7,
        repetition_penalty=1.3,
        min_tokens=4,
        logprobs=True,
        top_logprobs=3,
    )
    greedy_rows = [
        SampleRow(SamplingParams(temperature=0.0, **adjusted), 2, (3,), history),  # type: ignore[arg-type]
        SampleRow(SamplingParams(temperature=0.0), 0, (3,)),
    ]
    cpu, cuda = sample(logits, greedy_rows), sample(logits.cuda(), greedy_rows)
    assert cuda.token_ids == cpu.token_ids
    assert cuda.logprobs is not None and cpu.logprobs is not None
    for (logprob, top), (cpu_logprob, cpu_top) in zip(cuda.logprobs, cpu.logprobs, strict=True):
        assert abs(logprob - cpu_logprob) < 1e-4 and [i for i, _ in top] == [i for i, _ in cpu_top]
    sampled = SamplingParams(temperature=0.8, top_k=50, top_p=0.9, seed=7, **adjusted)  # type: ignore[arg-type]
    seeded = [SampleRow(sampled, 5, (3,), history), SampleRow(replace(sampled, seed=8), 5, (3,), history)]
    first, again = sample(logits.cuda(), seeded), sample(logits.cuda(), seeded)
    assert first.token_ids == again.token_ids
