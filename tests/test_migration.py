"""A migrated stream's continuation (serve/failover.py): prompt + the streamed tokens, limits shrunk, seeded draws
continuing at the same output index — so greedy and seeded requests continue exactly where they stopped."""

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
    prompt = random_prompts([23], 500, seed=3)[0]
    for sampling in (
        SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True, min_tokens=9),
    ):
        request = EngineRequest("r", tuple(prompt), sampling)
        whole = run_staggered(engine(path), [(0, request)])["r"]
        for cut in (1, 5, 15):
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


def test_continuation_outputs_read_as_the_original_request() -> None:
    from pdserve.engine import RequestOutput

    original = EngineRequest("r", (1, 2, 3), SamplingParams())
    out = RequestOutput("r.m1", [9], None, None, 7, 5)
    assert as_original(out, original) == RequestOutput("r", [9], None, None, 3, 5)
