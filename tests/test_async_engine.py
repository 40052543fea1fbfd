"""AsyncEngine: the engine on its own thread, driven from asyncio."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from oracle import greedy, random_prompts, run_staggered
from pdserve.config import CacheConfig, EngineConfig, ModelConfig
from pdserve.engine import EngineRequest, LLMEngine
from pdserve.engine.async_engine import AsyncEngine


def make(path: Path) -> AsyncEngine:
    return AsyncEngine(LLMEngine(EngineConfig(ModelConfig(str(path), dtype="float32"), CacheConfig(num_blocks=64))))


def test_concurrent_streams_match_the_sync_engine(tiny_models: dict[str, Path]) -> None:
    path = tiny_models["llama"]
    prompts = random_prompts([3, 40, 90], 500, seed=41)
    requests = [EngineRequest(f"r{i}", tuple(p), greedy(12)) for i, p in enumerate(prompts)]
    sync = LLMEngine(EngineConfig(ModelConfig(str(path), dtype="float32"), CacheConfig(num_blocks=64)))
    want = run_staggered(sync, [(0, r) for r in requests])

    async def collect(engine: AsyncEngine, request: EngineRequest) -> list[int]:
        return [t async for out in engine.generate(request) for t in out.new_token_ids]

    async def main() -> dict[str, list[int]]:
        engine = make(path)
        outs = await asyncio.gather(*[collect(engine, r) for r in requests])
        engine.shutdown()
        return {r.request_id: o for r, o in zip(requests, outs, strict=True)}

    assert asyncio.run(main()) == want


def test_closing_a_stream_early_aborts_and_frees_blocks(tiny_models: dict[str, Path]) -> None:
    async def main() -> None:
        engine = make(tiny_models["llama"])
        stream = engine.generate(EngineRequest("a", tuple(range(5, 60)), greedy(200)))
        async for _ in stream:
            break
        await stream.aclose()
        for _ in range(50):
            if (await engine.stats()).num_used_blocks == 0:
                break
            await asyncio.sleep(0.02)
        stats = await engine.stats()
        assert (stats.num_used_blocks, stats.num_running) == (0, 0)
        engine.shutdown()

    asyncio.run(main())


def test_errors_reach_the_caller_and_leave_nothing_allocated(tiny_models: dict[str, Path]) -> None:
    async def main() -> None:
        engine = make(tiny_models["llama"])
        with pytest.raises(ValueError, match="prompt is empty"):
            async for _ in engine.generate(EngineRequest("e", (), greedy(2))):
                pass
        with pytest.raises(ValueError, match="no open reservation"):
            async for _ in engine.commit("missing", 5, None):
                pass
        assert (await engine.stats()).num_used_blocks == 0
        engine.shutdown()

    asyncio.run(main())
