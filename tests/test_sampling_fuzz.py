"""Randomized differential test of sampling under batching: every request carries its own sampling parameters
(seeded temperature, top-k/top-p/min-p, the three penalties, logit bias, stop tokens, min_tokens, logprobs, prompt
logprobs; max_tokens from 1) and runs in seeded random schedules — arrivals at random steps, prompts from 1 token and
around the block size, shared prefixes and exact repeats, token budgets from 1, both prefill orders, pools small
enough to preempt. Each request must give exactly what it gives alone in a large engine without a prefix cache
(tokens, finish reason; logprobs within float noise), and afterwards no block is held: in float32 a seeded draw
depends on the seed and the output index only, never on its batch (test_engine_fuzz.py covers greedy against
transformers; this covers the rest of the sampler's state).

A failure prints its seed: `SAMPLING_FUZZ_SEEDS=<seed> pytest tests/test_sampling_fuzz.py` replays it.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from handoff import copy_missing_blocks
from oracle import random_prompts
from pdserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from pdserve.engine import EngineRequest, KVReservation, LLMEngine, RequestOutput, SamplingParams
from pdserve.serve.failover import continuation

SEEDS = [int(s) for s in os.environ.get("SAMPLING_FUZZ_SEEDS", "").split(",") if s] or list(range(48))
REQUESTS_PER_SCHEDULE = 20
VOCAB = 512  # tiny_models' vocabulary


def _engine(
    path: Path, block_size: int, num_blocks: int, budget: int, max_seqs: int, policy: str, prefix_cache: bool = True
) -> LLMEngine:
    return LLMEngine(
        EngineConfig(
            ModelConfig(str(path), dtype="float32"),
            CacheConfig(block_size=block_size, num_blocks=num_blocks, enable_prefix_caching=prefix_cache),
            SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs, policy=policy),  # type: ignore[arg-type]
        )
    )


def _sampling(rng: random.Random) -> SamplingParams:
    max_tokens = rng.choice([1, 2, 10, 20, 20])
    kw: dict[str, object] = {
        "max_tokens": max_tokens, "seed": rng.randint(0, 10**6), "ignore_eos": rng.random() < 0.7,
        "temperature": rng.choice([0.0, 0.7, 1.0, 1.5, 3.0]),
    }  # fmt: skip
    optional: list[tuple[float, str, object]] = [
        (0.4, "top_k", rng.choice([1, 5, 50])),
        (0.4, "top_p", rng.choice([0.3, 0.9])),
        (0.3, "min_p", rng.choice([0.05, 0.2])),
        (0.3, "repetition_penalty", rng.choice([0.8, 1.3])),
        (0.3, "frequency_penalty", rng.choice([-1.0, 1.5])),
        (0.3, "presence_penalty", rng.choice([-1.0, 1.5])),
        (0.3, "logit_bias", ((rng.randrange(VOCAB), rng.choice([-50.0, 20.0])),)),
        (0.3, "stop_token_ids", tuple(rng.sample(range(3, VOCAB), 40))),
        (0.3, "min_tokens", rng.randint(0, max_tokens)),
        (0.2, "prompt_logprobs", rng.choice([0, 3])),
    ]
    kw.update({name: value for chance, name, value in optional if rng.random() < chance})
    if rng.random() < 0.3:
        kw.update(logprobs=True, top_logprobs=rng.randint(0, 5))
    return SamplingParams(**kw)  # type: ignore[arg-type]


class _Result:
    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.prompt_logprobs: list[float] | None = None
        self.finish: str | None = None

    def add(self, out: RequestOutput) -> None:
        self.tokens += out.new_token_ids
        self.logprobs += [lp for lp, _ in out.new_logprobs or []]
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = [lp for lp, _ in out.prompt_logprobs]
        if out.finish_reason is not None:
            self.finish = out.finish_reason.value


def _run(engine: LLMEngine, arrivals: list[tuple[int, EngineRequest]]) -> dict[str, _Result]:
    results = {r.request_id: _Result() for _, r in arrivals}
    pending = sorted(arrivals, key=lambda a: a[0])
    step = 0
    while pending or engine.has_unfinished():
        while pending and pending[0][0] <= step:
            engine.add_request(pending.pop(0)[1])
        for out in engine.step():
            results[out.request_id].add(out)
        step += 1
        assert step < 5000, "the schedule never finished"
    return results


def _close(a: list[float] | None, b: list[float] | None) -> bool:
    if a is None or b is None:
        return a is b
    return len(a) == len(b) and all(abs(x - y) < 2e-3 + 1e-4 * abs(y) for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def alone(tiny_models: dict[str, Path]) -> LLMEngine:
    """Runs one request at a time: a large pool and budget, no prefix cache."""
    return _engine(tiny_models["llama"], 16, 64, 512, 16, "fcfs", prefix_cache=False)


@pytest.mark.parametrize("seed", SEEDS)
def test_every_request_samples_as_it_would_alone(tiny_models: dict[str, Path], alone: LLMEngine, seed: int) -> None:
    rng = random.Random(seed)
    block_size = rng.choice([4, 8, 16])
    lengths = [
        rng.choice([1, 2, block_size - 1, block_size, block_size + 1, 2 * block_size, rng.randint(1, 40)])
        for _ in range(REQUESTS_PER_SCHEDULE)
    ]
    prefixes = random_prompts([8, 16, 21], VOCAB, seed=77)
    prompts = [rng.choice(prefixes) + p if rng.random() < 0.4 else p for p in random_prompts(lengths, VOCAB, seed)]
    prompts[1] = list(prompts[0]) if rng.random() < 0.5 else prompts[1]  # an exact repeat: a whole-prompt hit
    requests = [EngineRequest(f"r{i}", tuple(p), _sampling(rng)) for i, p in enumerate(prompts)]
    need = -(-84 // block_size)  # the longest prompt and its output, in blocks: more force preemptions
    engine = _engine(
        tiny_models["llama"], block_size, rng.choice([need, need + 1, need + 2]),
        rng.choice([1, 2, 3, block_size, block_size + 1, 40]), rng.choice([4, 8, 16]),
        rng.choice(["fcfs", "shortest_prefill_first"]),
    )  # fmt: skip
    got = _run(engine, [(rng.randint(0, 2), r) for r in requests])
    assert engine.stats().num_used_blocks == 0, f"seed {seed}: blocks held after every request ended"
    for request in requests:
        want, have = _run(alone, [(0, request)])[request.request_id], got[request.request_id]
        where = f"seed {seed}, {request.request_id} ({len(request.prompt_token_ids)} prompt tokens, {request.sampling})"
        assert (have.tokens, have.finish) == (want.tokens, want.finish), where
        assert _close(have.logprobs, want.logprobs), f"{where}: logprobs"
        assert _close(have.prompt_logprobs, want.prompt_logprobs), f"{where}: prompt logprobs"


def _run_split(p: LLMEngine, d: LLMEngine, arrivals: list[tuple[int, EngineRequest]]) -> dict[str, _Result]:
    """The disaggregated path, step by step: reserve on D (in arrival order), prefill-only on P (which samples the
    first token), copy the blocks D lacks, commit on D with that token, decode on D."""
    results = {r.request_id: _Result() for _, r in arrivals}
    pending = sorted(arrivals, key=lambda a: a[0])
    waiting: list[EngineRequest] = []
    reservations: dict[str, KVReservation] = {}
    step = 0
    while pending or waiting or p.has_unfinished() or d.has_unfinished():
        while pending and pending[0][0] <= step:
            waiting.append(pending.pop(0)[1])
        while waiting and (reservation := d.reserve(waiting[0])) is not None:
            request = waiting.pop(0)
            reservations[request.request_id] = reservation
            p.add_request(request, prefill_only=True)
        for out in p.step():
            results[out.request_id].add(out)
            assert out.kv_block_ids is not None  # a prefill-only request reports once, with its blocks
            copy_missing_blocks(p, out.kv_block_ids, d, reservations[out.request_id])
            p.release(out.request_id)
            if out.finish_reason is not None:  # the first token ends it: D's reservation is not needed
                d.abort(out.request_id)
                continue
            first_logprob = out.new_logprobs[0] if out.new_logprobs else None
            if (final := d.commit(out.request_id, out.new_token_ids[0], first_logprob)) is not None:
                results[out.request_id].add(final)
        for out in d.step():
            results[out.request_id].add(out)
        step += 1
        assert step < 5000, "the schedule never finished"
    return results


@pytest.mark.parametrize("seed", SEEDS[:24])
def test_disaggregated_and_migrated_requests_sample_as_they_would_alone(
    tiny_models: dict[str, Path], alone: LLMEngine, seed: int
) -> None:
    """The sampler on the disaggregated path: P samples the first token of a prefill-only request, D continues after
    the commit; and a migrated stream (`failover.continuation`: the prompt plus the tokens streamed so far, counted
    as prior output) prefilled on P for D. Each must give what its request gives alone: the same seeded draws, the
    penalties counting the same tokens, min_tokens and stop tokens where they were. (Every cluster test runs greedy,
    and this fuzz ran on one colocated engine only: the path a migration takes had no differential test; found in
    review.)"""
    rng = random.Random(1000 + seed)
    block_size = rng.choice([4, 8, 16])
    lengths = [rng.choice([1, 2, block_size, block_size + 1, rng.randint(1, 40)]) for _ in range(REQUESTS_PER_SCHEDULE)]
    prefixes = random_prompts([8, 16, 21], VOCAB, seed=78)
    prompts = [rng.choice(prefixes) + p if rng.random() < 0.4 else p for p in random_prompts(lengths, VOCAB, seed)]
    requests = [EngineRequest(f"r{i}", tuple(p), _sampling(rng)) for i, p in enumerate(prompts)]
    wants = {r.request_id: _run(alone, [(0, r)])[r.request_id] for r in requests}
    jobs: list[tuple[EngineRequest, int]] = []  # (what runs, how many of the alone run's tokens it continues after)
    for request in requests:
        num_streamed = len(wants[request.request_id].tokens)
        k = rng.randint(1, num_streamed - 1) if num_streamed > 1 and rng.random() < 0.5 else 0
        jobs.append((continuation(request, wants[request.request_id].tokens[:k], 1) if k else request, k))
    need = -(-84 // block_size)
    p, d = (
        _engine(tiny_models["llama"], block_size, rng.choice([need, 2 * need, 4 * need]),
                rng.choice([1, 3, block_size, 40]), rng.choice([4, 16]), rng.choice(["fcfs", "shortest_prefill_first"]))
        for _ in range(2)
    )  # fmt: skip
    got = _run_split(p, d, [(rng.randint(0, 3), job) for job, _ in jobs])
    assert p.stats().num_used_blocks == 0 and d.stats().num_used_blocks == 0, f"seed {seed}: blocks held"
    for (job, k), request in zip(jobs, requests, strict=True):
        want, have = wants[request.request_id], got[job.request_id]
        where = (
            f"seed {seed}, {job.request_id} after {k} streamed ({len(request.prompt_token_ids)}, {request.sampling})"
        )
        assert (have.tokens, have.finish) == (want.tokens[k:], want.finish), where
        assert _close(have.logprobs, want.logprobs[k:] if request.sampling.logprobs else []), f"{where}: logprobs"
        if k == 0:
            assert _close(have.prompt_logprobs, want.prompt_logprobs), f"{where}: prompt logprobs"
