"""Greedy output is token-identical to transformers' generate() (float32, CPU) on every tiny model family, with
decode attention on the native paged kernel (the default on CPU) and on SDPA over gathered blocks (its fallback)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import FAMILIES
from handoff import prefill_then_decode
from oracle import (
    assert_matches,
    greedy,
    load_reference_model,
    random_prompts,
    reference_greedy,
    run_staggered,
)
from pdserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from pdserve.engine import EngineRequest, LLMEngine, attention, model_runner, native

LENGTHS = [1, 7, 16, 17, 45, 100, 160, 300]
MAX_TOKENS = 24


def make_engine(path: Path, num_blocks: int = 256, budget: int = 512, prefix_caching: bool = True) -> LLMEngine:
    return LLMEngine(
        EngineConfig(
            ModelConfig(str(path), dtype="float32"),
            CacheConfig(block_size=16, num_blocks=num_blocks, enable_prefix_caching=prefix_caching),
            SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=16),
        )
    )


@pytest.fixture(scope="module", params=FAMILIES)
def family(request: pytest.FixtureRequest, tiny_models: dict[str, Path]) -> tuple[Path, list[list[int]], list]:
    """(model dir, prompts, references) per family; references computed once."""
    path = tiny_models[request.param]
    model = load_reference_model(path)
    prompts = random_prompts(LENGTHS, model.config.vocab_size)
    return path, prompts, [reference_greedy(model, p, MAX_TOKENS) for p in prompts]


def requests(prompts: list[list[int]], tag: str = "r") -> list[EngineRequest]:
    return [EngineRequest(f"{tag}{i}", tuple(p), greedy(MAX_TOKENS)) for i, p in enumerate(prompts)]


def check(engine: LLMEngine, refs: list, got: dict[str, list[int]], tag: str = "r") -> None:
    for i, ref in enumerate(refs):
        assert_matches(ref, got[f"{tag}{i}"], f"request {i} ({LENGTHS[i]} prompt tokens)")
    stats = engine.stats()
    assert stats.num_used_blocks == 0 and stats.num_running == 0 and stats.num_waiting == 0 and stats.num_held == 0


def use_kernels(engine: LLMEngine, kernels: str) -> None:
    """ "sdpa": torch's attention only (what a machine without a compiler runs); "native": the paged decode and
    prefill kernels, which are on for bf16 by default and asked for here in float32."""
    if kernels == "sdpa":
        engine.model.decode_kernel = engine.model.prefill_kernel = None
        return
    engine.model.decode_kernel, engine.model.prefill_kernel = native.paged_decode_op(), native.paged_prefill_op()
    if engine.model.decode_kernel is None or engine.model.prefill_kernel is None:
        if os.environ.get("CI"):
            pytest.fail("the native attention kernels did not build on this CI machine")
        pytest.skip("no native kernels here (no C++ compiler)")


@pytest.mark.parametrize("kernels", ["native", "sdpa"])
def test_staggered_arrivals(family: tuple, kernels: str) -> None:
    path, prompts, refs = family
    engine = make_engine(path)
    use_kernels(engine, kernels)
    got = run_staggered(engine, [(2 * i, r) for i, r in enumerate(requests(prompts))])
    check(engine, refs, got)


@pytest.mark.parametrize("kernels", ["native", "sdpa"])
def test_chunked_prefill_smaller_than_prompts(family: tuple, kernels: str) -> None:
    path, prompts, refs = family
    engine = make_engine(path, budget=24)
    use_kernels(engine, kernels)
    got = run_staggered(engine, [(i, r) for i, r in enumerate(requests(prompts))])
    check(engine, refs, got)


def test_decodes_split_into_length_groups(family: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    """The torch route with a decode group costing one block: nearly every step whose decodes differ in length
    splits them into groups (by default only where it pays, rarely in these short tests), token-exact all the same."""
    path, prompts, refs = family
    splits: list[bool] = []

    def counted(num_blocks: list[int], overhead_blocks: int) -> list[list[int]]:
        groups = attention.length_groups(num_blocks, overhead_blocks)
        splits.append(len(groups) > 1)
        return groups

    monkeypatch.setattr(model_runner, "DECODE_GROUP_OVERHEAD_TOKENS", 1)
    monkeypatch.setattr(model_runner, "length_groups", counted)
    engine = make_engine(path, budget=24)
    use_kernels(engine, "sdpa")
    got = run_staggered(engine, [(i, r) for i, r in enumerate(requests(prompts))])
    check(engine, refs, got)
    assert sum(splits) >= 10, f"{sum(splits)} of {len(splits)} decode steps split"


def test_preemption_by_recompute(family: tuple) -> None:
    path, prompts, refs = family
    engine = make_engine(path, num_blocks=26)  # 416 slots for ~800 tokens of context in flight
    got = run_staggered(engine, [(0, r) for r in requests(prompts)])
    assert engine.num_preemptions > 0
    check(engine, refs, got)


@pytest.mark.parametrize("kernels", ["native", "sdpa"])
def test_prefix_cache_hits_with_shared_system_prompt(family: tuple, kernels: str) -> None:
    path, _, _ = family
    model = load_reference_model(path)
    system = random_prompts([40], model.config.vocab_size, seed=7)[0]
    suffixes = random_prompts([5, 30, 1, 70], model.config.vocab_size, seed=8)
    prompts = [system + s for s in suffixes]
    refs = [reference_greedy(model, p, MAX_TOKENS) for p in prompts]
    engine = make_engine(path)
    use_kernels(engine, kernels)
    first = run_staggered(engine, [(0, requests(prompts[:1])[0])])
    rest = requests(prompts, tag="r")[1:]
    cached: dict[str, int] = {}
    for r in rest:
        engine.add_request(r)
    got = dict(first)
    got.update({r.request_id: [] for r in rest})
    while engine.has_unfinished():
        for out in engine.step():
            got[out.request_id].extend(out.new_token_ids)
            cached.setdefault(out.request_id, out.num_cached_tokens)
    assert all(n == 32 for n in cached.values()), cached  # the system prompt's two full blocks
    for i, ref in enumerate(refs):
        assert_matches(ref, got[f"r{i}"], f"shared-prefix request {i}")
    assert engine.stats().num_used_blocks == 0


def test_split_prefill_then_decode_on_another_engine(family: tuple) -> None:
    path, prompts, refs = family
    prefill, decode = make_engine(path), make_engine(path)
    for i, request in enumerate(requests(prompts)):
        tokens, sent = prefill_then_decode(prefill, decode, request)
        assert sent == -(-len(prompts[i]) // 16)  # nothing cached on the decode side yet: every block moves
        assert_matches(refs[i], tokens, f"split request {i}")
    for engine in (prefill, decode):
        assert engine.stats().num_used_blocks == 0 and engine.stats().num_held == 0


def test_split_with_layer_pipelined_copy_and_chunked_prefill(family: tuple) -> None:
    """Layer i is copied from the layer hook while later layers have not run; prompts span several chunks."""
    path, prompts, refs = family
    prefill, decode = make_engine(path, budget=64), make_engine(path)
    for i, request in enumerate(requests(prompts)):
        tokens, sent = prefill_then_decode(prefill, decode, request, pipelined=True)
        assert sent == -(-len(prompts[i]) // 16)
        assert_matches(refs[i], tokens, f"pipelined request {i}")
    for engine in (prefill, decode):
        assert engine.stats().num_used_blocks == 0 and engine.stats().num_held == 0
    with pytest.raises(ValueError, match="layer sink needs a prefill-only request"):
        prefill.add_request(requests(prompts[:1])[0], layer_sink=object())  # type: ignore[arg-type]


def test_split_with_prefix_hits_on_both_sides_moves_only_missing_blocks(family: tuple) -> None:
    path, _, _ = family
    model = load_reference_model(path)
    system = random_prompts([48], model.config.vocab_size, seed=11)[0]
    prompts = [system + s for s in random_prompts([9, 20], model.config.vocab_size, seed=12)]
    refs = [reference_greedy(model, p, MAX_TOKENS) for p in prompts]
    prefill, decode = make_engine(path), make_engine(path)
    sent = []
    for i, request in enumerate(requests(prompts)):
        tokens, num_sent = prefill_then_decode(prefill, decode, request)
        assert_matches(refs[i], tokens, f"delta request {i}")
        sent.append(num_sent)
    assert sent == [4, 2]  # second request: the 3 system-prompt blocks are already on the decode side
    assert decode.stats().num_used_blocks == 0 and prefill.stats().num_used_blocks == 0


def test_without_prefix_caching(family: tuple) -> None:
    path, prompts, refs = family
    engine = make_engine(path, prefix_caching=False)
    got = run_staggered(engine, [(0, r) for r in requests(prompts)])
    check(engine, refs, got)
    assert engine.stats().num_cached_blocks == 0
