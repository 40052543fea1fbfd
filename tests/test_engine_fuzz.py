"""Randomized differential test of the engine against transformers: thousands of greedy requests over seeded random
schedules — arrivals at random steps, prompt lengths from 1 token, shared prefixes and exact repeats (across three
tenants whose cache salts keep their prefix-cache blocks apart: no admission may hit another tenant's), random chunk
budgets and block sizes, both prefill orders (fcfs, shortest_prefill_first), pools small enough to preempt, aborts
at random steps, stop tokens with `min_tokens` (chosen where the greedy output stays the reference's), and the
disaggregated split (prefill on one engine, reserve/commit on another) mixed into both engines' batches; half the
schedules on the native attention kernels, half on SDPA. Every surviving request must be token-exact (oracle.py),
and afterwards no engine holds a block.

A failure prints its seed: `FUZZ_SEEDS=<seed> pytest tests/test_engine_fuzz.py` replays exactly that schedule.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from handoff import copy_missing_blocks
from oracle import (
    NEAR_TIE,
    Reference,
    assert_matches,
    greedy,
    load_reference_model,
    random_prompts,
    reference_greedy,
)
from pdserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from pdserve.engine import EngineRequest, LLMEngine, RequestOutput, native
from pdserve.engine.scheduler import SchedulerOutput

MAX_TOKENS = 12
NUM_SCHEDULES = int(os.environ.get("FUZZ_SCHEDULES", "48"))
REQUESTS_PER_SCHEDULE = 48


@dataclass(frozen=True)
class Corpus:
    prompts: list[list[int]]
    references: list[Reference]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def corpus(request: pytest.FixtureRequest, tiny_models: dict[str, Path]) -> tuple[Path, Corpus]:
    """Prompts of 1..90 tokens; a third extend one of four shared prefixes (block-aligned or not), and the
    schedules repeat prompts exactly, so prefix-cache hits leave anything from 1 token to the whole suffix."""
    path = tiny_models[request.param]
    model = load_reference_model(path)
    vocab = model.config.vocab_size
    rng = random.Random(1234)
    lengths = [1, 1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 47, 64, 65, 90] + [
        rng.randint(1, 90) for _ in range(21)
    ]
    prompts = random_prompts(lengths, vocab, seed=21)
    prefixes = random_prompts([16, 20, 32, 45], vocab, seed=22)
    suffixes = random_prompts([rng.randint(1, 40) for _ in range(20)], vocab, seed=23)
    prompts += [rng.choice(prefixes) + s for s in suffixes] + prefixes
    return path, Corpus(prompts, [reference_greedy(model, p, MAX_TOKENS) for p in prompts])


@dataclass
class _Live:
    request: EngineRequest
    prompt_index: int
    mode: str  # "p" (colocated on P), "d" (colocated on D) or "split" (prefill on P, decode on D)
    expect: int  # output tokens: max_tokens, or up to a stop token the reference reaches
    tokens: list[int] = field(default_factory=list)
    hits: list[int] = field(default_factory=list)  # prefix-cache hits reported at admission (P's, D's)
    is_done: bool = False
    is_aborted: bool = False


def _cap_checked(engine: LLMEngine) -> None:
    """Fail the step that schedules more sequences than max_num_seqs (committed reservations join `running` past
    it: a step must still run no more)."""
    schedule, limit = engine.scheduler.schedule, engine.scheduler.config.max_num_seqs

    def checked() -> SchedulerOutput:
        out = schedule()
        assert len(out.chunks) <= limit, f"{len(out.chunks)} sequences in one step, max_num_seqs {limit}"
        return out

    engine.scheduler.schedule = checked  # type: ignore[method-assign]


class _Schedule:
    """Two engines driven step by step: P runs colocated and prefill-only requests, D runs colocated requests and
    the committed reservations of split ones, so both engines' batches mix every kind of chunk."""

    def __init__(self, path: Path, corpus: Corpus, seed: int) -> None:
        self.rng = random.Random(seed)
        self.corpus = corpus
        block_size = self.rng.choice([4, 8, 16])  # the transfer contract: P and D agree on it
        self.p, self.d = self._engine(path, block_size), self._engine(path, block_size)
        if seed % 2 == 0:  # even seeds on the native attention kernels (on for bf16 by default), odd ones on SDPA
            for engine in (self.p, self.d):
                engine.model.decode_kernel = native.paged_decode_op()
                engine.model.prefill_kernel = native.paged_prefill_op()
                if engine.model.prefill_kernel is None and os.environ.get("CI"):
                    pytest.fail("the native attention kernels did not build on this CI machine")
        for engine in (self.p, self.d):
            _cap_checked(engine)
        self.live: dict[str, _Live] = {}
        self.waiting_reservation: list[_Live] = []

    def _engine(self, path: Path, block_size: int) -> LLMEngine:
        rng = self.rng
        need = -(-(90 + MAX_TOKENS) // block_size) + 1  # the longest request alone must fit
        return LLMEngine(
            EngineConfig(
                ModelConfig(str(path), dtype="float32"),
                CacheConfig(
                    block_size=block_size,
                    num_blocks=rng.choice([need, need + 8, 4 * need, 400]),
                    enable_prefix_caching=rng.random() < 0.85,
                ),
                SchedulerConfig(
                    max_num_batched_tokens=rng.choice([1, 3, 8, 17, 64, 512]),
                    max_num_seqs=rng.choice([2, 5, 16]),
                    policy=rng.choice(["fcfs", "shortest_prefill_first"]),
                    prefill_aging_tokens_per_s=rng.choice([0.0, 256.0]),
                ),
            )
        )

    def run(self) -> None:
        rng = self.rng
        arrivals = sorted(rng.randint(0, 40) for _ in range(REQUESTS_PER_SCHEDULE))
        step = 0
        while arrivals or self._busy():
            while arrivals and arrivals[0] <= step:
                arrivals.pop(0)
                self._arrive(f"s{step}-{len(self.live)}")
            self._retry_reservations()
            if self.live and rng.random() < 0.08:
                self._abort(rng.choice(list(self.live.values())))
            self._handle_p(self.p.step())
            self._collect(self.d.step())
            step += 1
            assert step < 20_000, "the schedule does not finish"

    def check(self, seed: int) -> int:
        num_checked = 0
        for live in self.live.values():
            if live.is_aborted:
                continue
            assert live.is_done, f"seed {seed}: {live.request.request_id} never finished"
            ref = self.corpus.references[live.prompt_index]
            n = live.expect
            label = f"seed {seed} {live.request.request_id} ({live.mode}, {len(live.request.prompt_token_ids)} tokens)"
            assert_matches(Reference(ref.token_ids[:n], ref.top2_gaps[:n]), live.tokens, label)
            num_checked += 1
        self._check_tenants_apart(seed)
        for name, engine in (("P", self.p), ("D", self.d)):
            stats = engine.stats()
            assert (stats.num_used_blocks, stats.num_held, stats.num_running, stats.num_waiting) == (0, 0, 0, 0), (
                f"seed {seed}: engine {name} still holds something: {stats}"
            )
        return num_checked

    def _check_tenants_apart(self, seed: int) -> None:
        """No admission hit more of the prompt than another request of the same tenant (salt) could have cached:
        the longest prefix shared with its prompt and reference output. A hit on another tenant's blocks (an
        identical prompt, say) would exceed it."""
        lives = list(self.live.values())
        for live in lives:
            prompt = self.corpus.prompts[live.prompt_index]
            allowed = 0
            for other in lives:
                if other is live or other.request.cache_salt != live.request.cache_salt:
                    continue
                cached = self.corpus.prompts[other.prompt_index] + self.corpus.references[other.prompt_index].token_ids
                shared = next((i for i, (a, b) in enumerate(zip(prompt, cached, strict=False)) if a != b), None)
                allowed = max(allowed, min(len(prompt), len(cached)) if shared is None else shared)
            assert all(hit <= allowed for hit in live.hits), (
                f"seed {seed}: {live.request.request_id} (salt {live.request.cache_salt}) hit {live.hits} tokens; "
                f"its tenant's other requests share at most {allowed}"
            )

    def _busy(self) -> bool:
        return bool(self.waiting_reservation) or self.p.has_unfinished() or self.d.has_unfinished()

    def _arrive(self, request_id: str) -> None:
        rng = self.rng
        index = rng.randrange(len(self.corpus.prompts))
        max_tokens = rng.randint(1, MAX_TOKENS)
        stopping, expect = self._stopping(self.corpus.references[index], max_tokens)
        params = greedy(max_tokens, **stopping)
        salt = rng.choice([None, None, "tenant-a", "tenant-b"])  # tenants must never share prefix-cache blocks
        request = EngineRequest(request_id, tuple(self.corpus.prompts[index]), params, cache_salt=salt)
        live = self.live[request_id] = _Live(request, index, rng.choice(["p", "d", "split", "split"]), expect)
        if live.mode == "p":
            self.p.add_request(request)
        elif live.mode == "d":
            self.d.add_request(request)
        else:
            self.waiting_reservation.append(live)

    def _stopping(self, reference: Reference, max_tokens: int) -> tuple[dict[str, object], int]:
        """Sometimes stop tokens with a `min_tokens`, chosen so the greedy output stays the reference's: a token of
        the reference's output (it ends at its first occurrence, the last token; `min_tokens` up to that position,
        where masking it never hid the argmax), or one it never reaches (it runs to `max_tokens`) — both only before
        any near-tie, where the engine may take the other branch. Returns the sampling fields and the output's
        length."""
        rng = self.rng
        tokens = reference.token_ids[:max_tokens]
        clean = next((i for i, gap in enumerate(reference.top2_gaps[:max_tokens]) if gap < NEAR_TIE), max_tokens)
        draw = rng.random()
        if draw < 0.2 and clean > 0:
            stop = tokens.index(tokens[rng.randrange(clean)])
            return {"stop_token_ids": (tokens[stop],), "min_tokens": rng.randint(0, stop)}, stop + 1
        if draw < 0.3 and clean == max_tokens:
            never = [t for ref in self.corpus.references for t in ref.token_ids if t not in tokens]
            if never:
                return {"stop_token_ids": (rng.choice(never),), "min_tokens": rng.randint(0, max_tokens)}, max_tokens
        return {}, max_tokens

    def _retry_reservations(self) -> None:
        for live in list(self.waiting_reservation):
            reservation = self.d.reserve(live.request)
            if reservation is None:
                return  # D is full: keep arrival order, try again next step
            self.waiting_reservation.remove(live)
            live.hits.append(reservation.num_cached_tokens)
            live.reservation = reservation  # type: ignore[attr-defined]
            self.p.add_request(live.request, prefill_only=True)

    def _abort(self, live: _Live) -> None:
        if live.is_done or live.is_aborted:
            return
        live.is_aborted = True
        if live in self.waiting_reservation:
            self.waiting_reservation.remove(live)
        self.p.abort(live.request.request_id)
        self.d.abort(live.request.request_id)

    def _handle_p(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            live = self.live[out.request_id]
            if live.mode != "split":
                self._collect([out])
                continue
            assert out.kv_block_ids is not None  # a prefill-only request reports once, with its blocks
            live.hits.append(out.num_cached_tokens)
            copy_missing_blocks(self.p, out.kv_block_ids, self.d, live.reservation)  # type: ignore[attr-defined]
            self.p.release(out.request_id)
            live.tokens.extend(out.new_token_ids)
            if out.finish_reason is not None:  # the first token already ends it: D's reservation is not needed
                self.d.abort(out.request_id)
                live.is_done = True
                continue
            final = self.d.commit(out.request_id, out.new_token_ids[0])
            if final is not None:
                live.is_done = True

    def _collect(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            live = self.live[out.request_id]
            assert not live.is_aborted, f"{out.request_id} produced a token after its abort"
            if live.mode != "split" and not live.hits:
                live.hits.append(out.num_cached_tokens)
            live.tokens.extend(out.new_token_ids)
            live.is_done = out.finish_reason is not None


def _seeds() -> list[int]:
    chosen = os.environ.get("FUZZ_SEEDS")
    return [int(s) for s in chosen.split(",")] if chosen else list(range(NUM_SCHEDULES))


def test_random_schedules_are_token_exact_and_leak_nothing(corpus: tuple[Path, Corpus]) -> None:
    path, prompts = corpus
    num_checked = num_preemptions = num_aborted = num_stopped = 0
    for seed in _seeds():
        schedule = _Schedule(path, prompts, seed)
        schedule.run()
        num_checked += schedule.check(seed)
        num_preemptions += schedule.p.num_preemptions + schedule.d.num_preemptions
        num_aborted += sum(live.is_aborted for live in schedule.live.values())
        num_stopped += sum(
            live.expect < live.request.sampling.max_tokens and not live.is_aborted for live in schedule.live.values()
        )
    print(
        f"{num_checked} requests token-exact over {len(_seeds())} schedules; "
        f"{num_preemptions} preemptions, {num_aborted} aborts, {num_stopped} ended by a stop token"
    )
    assert num_checked >= 0.7 * len(_seeds()) * REQUESTS_PER_SCHEDULE
    if len(_seeds()) >= 16:  # the schedules really exercise preemption and aborts
        assert num_preemptions > 0 and num_aborted > 0 and num_stopped > 0


def test_one_token_chunk_beside_a_longer_one(tiny_models: dict[str, Path]) -> None:
    """The first wave's bug: a 1-token prompt admitted in the same step as a 20-token one got the other's token."""
    path = tiny_models["llama"]
    model = load_reference_model(path)
    prompts = random_prompts([20, 1, 33, 1], model.config.vocab_size, seed=5)
    refs = [reference_greedy(model, p, MAX_TOKENS) for p in prompts]
    engine = LLMEngine(EngineConfig(ModelConfig(str(path), dtype="float32"), CacheConfig(block_size=16, num_blocks=64)))
    for i, p in enumerate(prompts):
        engine.add_request(EngineRequest(f"r{i}", tuple(p), greedy(MAX_TOKENS)))
    tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    first = engine.step()
    assert len(first) == 4  # all four admitted and sampled in one step
    for out in first:
        tokens[out.request_id].extend(out.new_token_ids)
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id].extend(out.new_token_ids)
    for i, ref in enumerate(refs):
        assert_matches(ref, tokens[f"r{i}"], f"request {i} ({len(prompts[i])} tokens)")
