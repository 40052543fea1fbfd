"""A migrated stream's continuation (serve/failover.py): prompt + the streamed tokens, limits shrunk, seeded draws
continuing at the same output index, penalties counting the streamed tokens as output — so greedy and seeded requests
continue exactly where they stopped."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from oracle import random_prompts, run_staggered
from pdserve.api.backend import CapacityError
from pdserve.config import CacheConfig, EngineConfig, ModelConfig
from pdserve.engine import EngineRequest, InvalidRequestError, LLMEngine, SamplingParams
from pdserve.router import RouteDecision, RouteMode
from pdserve.serve.failover import as_original, can_migrate, continuation, without


def engine(path: Path) -> LLMEngine:
    return LLMEngine(EngineConfig(ModelConfig(str(path), dtype="float32"), CacheConfig(num_blocks=64)))


def test_a_continuation_samples_what_the_whole_request_would(tiny_models: dict[str, Path]) -> None:
    path = tiny_models["llama"]
    prompt = random_prompts([37], 500, seed=5)[0]
    for sampling in (
        SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True, min_tokens=9),
        # penalties count the streamed tokens as output, not as prompt (they did not: a greedy continuation differed)
        SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, frequency_penalty=1.5, presence_penalty=1.0),
        SamplingParams(
            max_tokens=16,
            temperature=0.8,
            seed=99,
            ignore_eos=True,
            frequency_penalty=-0.5,
            presence_penalty=0.7,
            repetition_penalty=1.3,
            logit_bias=((7, 2.0),),
        ),
    ):
        request = EngineRequest("r", tuple(prompt), sampling)
        whole = run_staggered(engine(path), [(0, request)])["r"]
        for cut in (1, 3, 8, 15):
            rest = continuation(request, whole[:cut], attempt=1)
            assert rest.request_id == "r.m1" and rest.prompt_token_ids == (*prompt, *whole[:cut])
            assert rest.sampling.max_tokens == 16 - cut and rest.sampling.min_tokens == max(
                0, sampling.min_tokens - cut
            )
            got = run_staggered(engine(path), [(0, rest)])["r.m1"]
            assert whole[:cut] + got == whole, (sampling, cut)


def test_only_reproducible_requests_migrate_and_only_on_server_faults() -> None:
    greedy = EngineRequest("g", (1, 2), SamplingParams(temperature=0.0))
    seeded = EngineRequest("s", (1, 2), SamplingParams(temperature=1.0, seed=7))
    free = EngineRequest("f", (1, 2), SamplingParams(temperature=1.0))
    fault = RuntimeError("the actor died")
    assert can_migrate(greedy, fault) and can_migrate(seeded, fault) and not can_migrate(free, fault)
    assert not can_migrate(greedy, InvalidRequestError("bad")) and not can_migrate(greedy, CapacityError("full"))


def test_the_continuation_avoids_the_failed_decode_replica() -> None:
    route = RouteDecision("r", RouteMode.LOCAL, "d1", None, 10, 0, 0, (), ("d1", "d2", "d3"), (), ())
    moved = without(route, "d1", "r.m1")
    assert moved is not None
    assert (moved.request_id, moved.mode, moved.decode_replica_id, moved.decode_ranking) == (
        "r.m1",
        RouteMode.DISAGGREGATED,
        "d2",
        ("d2", "d3"),
    )
    assert without(replace(route, decode_ranking=("d1",)), "d1", "x") is None  # Serve picks
    assert without(None, "d1", "x") is None


def test_the_continuation_avoids_a_prefill_replica_that_failed_on_its_own() -> None:
    """The cheapest other prefill replica the router knew of; none left: the decode replica prefills (local)."""
    terms = [(rid, "prefill", 0, 0, 0, 100, 0.0, cost, 0.0, cost, True) for rid, cost in (("p0", 1.0), ("p1", 3.0),
                                                                                         ("p2", 2.0))]  # fmt: skip
    route = RouteDecision("r", RouteMode.DISAGGREGATED, "d1", "p0", 10, 0, 10, (), ("d1", "d2"), (), tuple(terms))
    assert without(route, "d1", "r.m1").prefill_replica_id == "p0"  # type: ignore[union-attr]  # P did not fail
    moved = without(route, "d1", "r.m1", frozenset({"p0"}))
    assert moved is not None and (moved.mode, moved.prefill_replica_id, moved.decode_replica_id) == (
        RouteMode.DISAGGREGATED, "p2", "d2",
    )  # fmt: skip
    local = without(route, "d1", "r.m1", frozenset({"p0", "p1", "p2"}))
    assert local is not None and (local.mode, local.prefill_replica_id) == (RouteMode.LOCAL, None)
    # A local route (no prefill replica) continued: the cheapest that did not fail, not Serve's blind pick (which
    # could be the failed one again); after every one failed, local again.
    was_local = replace(route, mode=RouteMode.LOCAL, prefill_replica_id=None)
    assert without(was_local, "d1", "r.m2").prefill_replica_id == "p0"  # type: ignore[union-attr]
    assert without(was_local, "d1", "r.m2", frozenset({"p0"})).prefill_replica_id == "p2"  # type: ignore[union-attr]
    again = without(replace(local, decode_ranking=("d2", "d1")), "d2", "r.m2", frozenset({"p0", "p1", "p2"}))
    assert again is not None and (again.mode, again.prefill_replica_id, again.decode_replica_id) == (
        RouteMode.LOCAL, None, "d1",
    )  # fmt: skip


def test_continuation_outputs_read_as_the_original_request() -> None:
    from pdserve.engine import RequestOutput

    original = EngineRequest("r", (1, 2, 3), SamplingParams())
    out = RequestOutput("r.m1", [9], None, None, 7, 5)
    assert as_original(out, original) == RequestOutput("r", [9], None, None, 3, 5)


def test_a_continuation_asks_for_no_prompt_logprobs_once_tokens_were_streamed() -> None:
    request = EngineRequest("r", (1, 2, 3), SamplingParams(prompt_logprobs=2, max_tokens=8))
    assert continuation(request, [], attempt=1).sampling.prompt_logprobs == 2  # a retry: nothing shown yet
    assert continuation(request, [5, 6], attempt=1).sampling.prompt_logprobs is None


def test_random_continuations_sample_what_the_whole_request_would(tiny_models: dict[str, Path]) -> None:
    """Seeded random requests (greedy or seeded sampling, penalties, logit_bias, top_k/top_p/min_p, min_tokens),
    each cut after a random number of streamed tokens: the continuation completes exactly the whole request."""
    import random

    rng = random.Random(17)
    path = tiny_models["llama"]
    for case in range(150):
        max_tokens = rng.randint(2, 32)
        sampling = SamplingParams(
            max_tokens=max_tokens,
            temperature=rng.choice([0.0, 0.0, 0.7, 1.5]),
            seed=rng.randrange(1 << 30),
            ignore_eos=rng.random() < 0.7,
            min_tokens=rng.choice([0, 0, rng.randint(0, max_tokens)]),
            top_k=rng.choice([0, 0, 5]),
            top_p=rng.choice([1.0, 1.0, 0.9]),
            min_p=rng.choice([0.0, 0.0, 0.1]),
            frequency_penalty=rng.choice([0.0, 1.5, 2.0, -0.8]),
            presence_penalty=rng.choice([0.0, 1.0, 2.0, -1.0]),
            repetition_penalty=rng.choice([1.0, 1.0, 1.4]),
            logit_bias=rng.choice([(), ((rng.randrange(100), 3.0),)]),
        )
        prompt = random_prompts([rng.randint(1, 60)], rng.choice([20, 500]), seed=case)[0]  # few ids: repeats
        request = EngineRequest("r", tuple(prompt), sampling)
        whole = run_staggered(engine(path), [(0, request)])["r"]
        if len(whole) < 2:
            continue
        cut = rng.randint(1, len(whole) - 1)
        rest = continuation(request, whole[:cut], attempt=1)
        got = run_staggered(engine(path), [(0, rest)])["r.m1"]
        assert whole[:cut] + got == whole, (case, sampling, cut)
