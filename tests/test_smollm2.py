"""The real model: SmolLM2-135M-Instruct (float32, CPU) is token-identical to transformers' generate()."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
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
from pdserve.engine import EngineRequest, LLMEngine, SamplingParams, native
from pdserve.engine.weights import cpu_has_native_bf16

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


def _bf16_errors(path: Path, prompts: list[list[int]], native_ops: bool) -> tuple[list[float], list[float]]:
    """SmolLM2 in bf16 on the engine, native kernels and fused glue on or off, against float32 transformers: the
    mean |logprob difference| of every prompt token (prefill: chunks of 64 after cached context) and of every greedy
    output token given the engine's own output so far (decode steps), one figure per request each."""
    engine = LLMEngine(
        EngineConfig(
            ModelConfig(str(path), dtype="bfloat16"),
            CacheConfig(num_blocks=512, enable_prefix_caching=False),
            SchedulerConfig(max_num_batched_tokens=64),
        )
    )
    if not native_ops:
        engine.model.decode_kernel = engine.model.prefill_kernel = engine.model.fused = None
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=True, prompt_logprobs=0)
    for i, p in enumerate(prompts):
        engine.add_request(EngineRequest(f"r{i}", tuple(p), params))
    prompt_lps: dict[str, list[float]] = {}
    tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    output_lps: dict[str, list[float]] = {f"r{i}": [] for i in range(len(prompts))}
    while engine.has_unfinished():
        for out in engine.step():
            if out.prompt_logprobs is not None:
                prompt_lps[out.request_id] = [lp for lp, _ in out.prompt_logprobs]
            tokens[out.request_id].extend(out.new_token_ids)
            output_lps[out.request_id].extend(lp for lp, _ in out.new_logprobs or [])
    model = load_reference_model(path)
    prefill_err, decode_err = [], []
    with torch.no_grad():
        for i, p in enumerate(prompts):
            seq = p + tokens[f"r{i}"]
            logprobs = torch.log_softmax(model(torch.tensor([seq])).logits[0].float(), -1)
            want = logprobs[:-1].gather(1, torch.tensor(seq[1:]).unsqueeze(1)).squeeze(1)  # token t + 1 given ..t
            got = torch.tensor(prompt_lps[f"r{i}"] + output_lps[f"r{i}"])
            assert got.shape == want.shape
            if len(p) > 1:  # a 1-token prompt has no prompt logprobs
                prefill_err.append((got[: len(p) - 1] - want[: len(p) - 1]).abs().mean().item())
            decode_err.append((got[len(p) - 1 :] - want[len(p) - 1 :]).abs().mean().item())
    assert engine.stats().num_used_blocks == 0
    return prefill_err, decode_err


def test_bf16_native_kernels_are_as_close_to_float32_as_torchs_ops(smollm2_dir: Path, workload: tuple) -> None:
    """bf16 greedy text differs from float32's wherever two tokens are near a tie, whichever kernels run, so the
    kernels (native attention, fused glue: on by default in bf16 on CPUs with bf16 instructions) are held to their
    numerical error instead: against float32 transformers, per prompt and output token, no larger than bf16 on
    torch's own ops (measured on SmolLM2: 0.04 mean |logprob difference| both ways; a wrong mask or a bad tile would
    be far off)."""
    prompts, _ = workload
    if native.fused_ops() is None:
        pytest.skip("no native kernels here (no C++ compiler)")
    if not cpu_has_native_bf16():
        pytest.skip("the kernels run in bf16 only on CPUs with bf16 instructions (avx512_bf16, AMX)")
    native_prefill, native_decode = _bf16_errors(smollm2_dir, prompts, native_ops=True)
    torch_prefill, torch_decode = _bf16_errors(smollm2_dir, prompts, native_ops=False)
    for name, ours, theirs in (("prefill", native_prefill, torch_prefill), ("decode", native_decode, torch_decode)):
        mean_ours, mean_theirs = sum(ours) / len(ours), sum(theirs) / len(theirs)
        print(f"{name}: mean |logprob - float32| native {mean_ours:.4f}, torch ops {mean_theirs:.4f}")
        print(f"  per request: native {[round(x, 4) for x in ours]}, torch ops {[round(x, 4) for x in theirs]}")
        assert mean_ours <= 1.15 * mean_theirs + 1e-3, (name, ours, theirs)
        assert max(ours) <= 2 * max(theirs) + 1e-3, (name, ours, theirs)


def test_bfloat16_is_cast_from_the_float32_conversion(
    smollm2_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the float32 conversion cached, bfloat16 is that checkpoint cast (~2 s) instead of the GGUF dequantized
    again (~45 s): the same tensors `_convert` makes, as it casts the same float32 weights (checked by hand: the
    two routes' model.safetensors are byte-identical)."""
    import shutil

    from safetensors.torch import load_file

    from pdserve import hub

    shutil.copytree(smollm2_dir, tmp_path / smollm2_dir.name)  # its marker names the same installed GGUF

    def no_gguf(*args: object) -> None:
        raise AssertionError("dequantized the GGUF again")

    monkeypatch.setattr(hub, "_convert", no_gguf)
    bf16 = hub.materialize_smollm2("bfloat16", cache_dir=tmp_path)
    assert bf16 == tmp_path / "SmolLM2-135M-Instruct-bfloat16" and (bf16 / hub.MARKER).is_file()
    want = load_file(smollm2_dir / "model.safetensors")
    got = load_file(bf16 / "model.safetensors")
    assert got.keys() == want.keys()
    assert all(got[k].dtype == torch.bfloat16 and got[k].equal(want[k].to(torch.bfloat16)) for k in want)
    assert AutoTokenizer.from_pretrained(bf16).chat_template == AutoTokenizer.from_pretrained(smollm2_dir).chat_template
