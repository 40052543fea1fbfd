"""AsyncEngine: the engine on its own thread, driven from asyncio."""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from oracle import greedy, random_prompts, run_staggered
from pdserve.config import CacheConfig, EngineConfig, ModelConfig
from pdserve.engine import EngineDeadError, EngineRequest, FinishReason, LLMEngine, RequestOutput
from pdserve.engine.async_engine import AsyncEngine

ENDLESS = 100_000  # max_tokens past any tiny model's context: such a request ends only by an abort (or the context)


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
    """The request asks for more tokens than the context holds, so it could end by itself only at the context's end
    (some 970 tokens of decoding away): that the engine counted one abort and generated far fewer tokens shows that
    closing the stream ended it."""

    async def main() -> None:
        engine = make(tiny_models["llama"])
        prompt = tuple(range(5, 60))
        room = engine.engine.max_model_len - len(prompt)  # the most tokens the request could generate on its own
        stream = engine.generate(EngineRequest("a", prompt, greedy(ENDLESS)))
        async for _ in stream:
            break
        await stream.aclose()
        for _ in range(50):
            stats = await engine.stats()
            if stats.num_aborts > 0 and stats.num_used_blocks == 0:
                break
            await asyncio.sleep(0.02)
        assert (stats.num_aborts, stats.num_used_blocks, stats.num_running) == (1, 0, 0)
        assert stats.load.generated_tokens < room // 2, "the request ran on after its stream was closed"
        engine.shutdown()

    asyncio.run(main())


@pytest.mark.parametrize("via", ["generate", "commit"])
def test_a_closed_stream_gives_its_id_back_at_once(tiny_models: dict[str, Path], via: str) -> None:
    """`aclose()` of a stream (what `aclosing` in the replicas does) ends its request before it returns: the id is
    free for a retry on the spot and the abort is queued — not left to asyncio's finalizer of the inner generator,
    a few loop iterations later (the same id was then still "in use")."""

    async def main() -> None:
        engine = make(tiny_models["llama"])
        request = EngineRequest("x", tuple(range(5, 40)), greedy(ENDLESS))
        if via == "generate":
            stream = engine.generate(request)
        else:
            held = await engine.reserve(request, lease_s=30)
            assert held is not None
            engine.engine.kv.block_epochs[list(held.block_ids)] = held.epoch  # as a transport would
            stream = engine.commit("x", 11, None)
        async for _ in stream:
            break
        await stream.aclose()
        retry = [
            t async for out in engine.generate(EngineRequest("x", (5, 6, 7), greedy(3))) for t in out.new_token_ids
        ]
        assert len(retry) == 3
        stats = await engine.stats()
        assert (stats.num_aborts, stats.num_used_blocks, stats.num_running) == (1, 0, 0)
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


def test_cancellation_at_any_await_leaks_nothing(tiny_models: dict[str, Path]) -> None:
    """Seeded random flows — colocated streams, prefill-only results, reservations committed and decoded — each
    cancelled with a plain `task.cancel()` at a random moment: before its command ran (queued behind a long step),
    while it ran, mid-stream, or not at all. Afterwards no block is used, held or reserved. A stream due to be
    cancelled asks for more tokens than the context holds, so it cannot finish by itself first (its blocks would
    then come back without any abort): each one cut mid-stream must have been aborted by the engine."""
    rng = random.Random(7)
    engine = make(tiny_models["llama"])
    llm = engine.engine
    aborted: set[str] = set()  # requests the engine aborted (it knew them, unfinished)
    cut: dict[str, int] = {}  # streams cancelled after their first output -> the tokens they had received
    engine_abort = llm.abort

    def recording_abort(request_id: str, *args: bool) -> bool:
        found = engine_abort(request_id, *args)
        if found:
            aborted.add(request_id)
        return found

    llm.abort = recording_abort  # type: ignore[method-assign]

    async def consume(request_id: str, stream: AsyncIterator[RequestOutput]) -> None:
        received = 0
        try:
            async with contextlib.aclosing(stream):  # as the serving layer does: not left to the garbage collector
                async for out in stream:
                    received += len(out.new_token_ids)
                    await asyncio.sleep(0)
        except asyncio.CancelledError:
            if received:
                cut[request_id] = received
            raise

    async def colocated(i: int, is_cancelled: bool) -> None:
        request = EngineRequest(
            f"c{i}", tuple(range(3, 3 + rng.randint(1, 90))), greedy(ENDLESS if is_cancelled else 30)
        )
        await consume(request.request_id, engine.generate(request))

    async def prefill_only(i: int, is_cancelled: bool) -> None:
        request = EngineRequest(f"p{i}", tuple(range(5, 5 + rng.randint(1, 90))), greedy(4))
        try:
            async for out in engine.generate(request, prefill_only=True):
                assert out.kv_block_ids is not None
        finally:
            with contextlib.suppress(ValueError):  # released by its own abort when cancelled mid-generation
                await asyncio.shield(engine.release(request.request_id))

    async def reserved(i: int, is_cancelled: bool) -> None:
        request = EngineRequest(
            f"d{i}", tuple(range(7, 7 + rng.randint(1, 90))), greedy(ENDLESS if is_cancelled else 20)
        )
        held = await engine.reserve(request, lease_s=30)
        if held is None:
            return
        first = held.num_cached_tokens // llm.layout.block_size
        llm.kv.block_epochs[list(held.block_ids[first:])] = held.epoch  # as a transport would, after its writes
        await consume(request.request_id, engine.commit(request.request_id, 11, None))

    async def main() -> None:
        flows = [colocated, prefill_only, reserved]
        tasks = []
        for i in range(300):
            flow = rng.choice(flows)
            delay = rng.choice([None, 0.0, rng.uniform(0, 0.01), rng.uniform(0.01, 0.5)])
            task = asyncio.ensure_future(flow(i, delay is not None))
            tasks.append(task)
            if delay is not None:
                asyncio.get_running_loop().call_later(delay, task.cancel)
            if i % 30 == 0:
                await asyncio.sleep(0.05)
        # Streams that outlived their cancel would hold the pool until the context's end, and the rest wait behind.
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)
        failures = [r for r in results if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError)]
        assert not failures, failures[:3]
        assert sum(isinstance(r, asyncio.CancelledError) for r in results) > 100
        for _ in range(100):
            stats = await engine.stats()
            if (stats.num_used_blocks, stats.num_held, stats.num_reserved_blocks, stats.num_running) == (0, 0, 0, 0):
                break
            await asyncio.sleep(0.05)
        assert (stats.num_used_blocks, stats.num_held, stats.num_reserved_blocks, stats.num_running) == (0, 0, 0, 0)
        assert stats.num_waiting == 0 and stats.num_fenced_blocks == 0
        engine.shutdown()

    asyncio.run(main())
    # A stream cut well before the context's end (the least room is 1024 - 97 tokens) was still running: only the
    # abort that closing it sends can have ended it.
    early = {request_id for request_id, received in cut.items() if received < 400}
    assert len(early) >= 8, f"only {len(early)} streams were cut mid-stream"
    assert early <= aborted, f"streams cut but never aborted: {sorted(early - aborted)[:5]}"


def test_a_dead_engine_thread_fails_every_caller(tiny_models: dict[str, Path]) -> None:
    """Streams, a call queued while the thread dies, and calls after it all fail with EngineDeadError: none hangs."""

    async def main() -> None:
        engine = make(tiny_models["llama"])

        def failing_step() -> list[RequestOutput]:
            time.sleep(0.3)  # long enough for the calls below to be queued behind it
            raise RuntimeError("boom")

        engine.engine.step = failing_step  # type: ignore[method-assign]
        stream = engine.generate(EngineRequest("x", (5, 6, 7), greedy(3)))
        consumer = asyncio.ensure_future(_drain_all(stream))
        await asyncio.sleep(0.1)
        queued = asyncio.ensure_future(engine.stats())
        with pytest.raises(EngineDeadError):
            await asyncio.wait_for(consumer, 5)
        with pytest.raises(EngineDeadError):
            await asyncio.wait_for(queued, 5)
        with pytest.raises(EngineDeadError):
            await asyncio.wait_for(engine.stats(), 5)

    asyncio.run(main())


def test_a_shut_down_engine_fails_its_streams_and_every_later_call(tiny_models: dict[str, Path]) -> None:
    """After shutdown() an open stream and later calls got nothing, ever (the thread just ended), and the health
    check said healthy (found in review): they fail with EngineDeadError, and so does the check."""

    async def main() -> None:
        engine = make(tiny_models["llama"])
        stream = engine.generate(EngineRequest("x", (5, 6, 7), greedy(ENDLESS)))
        await anext(stream)
        engine.shutdown()
        with pytest.raises(EngineDeadError):
            await asyncio.wait_for(_drain_all(stream), 5)
        with pytest.raises(EngineDeadError):
            await asyncio.wait_for(engine.stats(), 5)
        with pytest.raises(EngineDeadError):
            engine.check_health(60.0)

    asyncio.run(main())


def test_an_engine_thread_failing_before_its_build_fails_the_constructor(tiny_models: dict[str, Path]) -> None:
    """The constructor waits for the engine thread to build the engine: a failure before the build (here torch
    refusing the thread count) left it waiting forever (found in review)."""
    from functools import partial

    config = EngineConfig(ModelConfig(str(tiny_models["llama"]), dtype="float32"), CacheConfig(num_blocks=64))
    outcome: list[BaseException | None] = []

    def construct() -> None:
        try:
            AsyncEngine(partial(LLMEngine, config), num_threads=0).shutdown()
            outcome.append(None)
        except BaseException as e:
            outcome.append(e)

    thread = threading.Thread(target=construct, daemon=True)
    thread.start()
    thread.join(30)
    assert outcome and isinstance(outcome[0], RuntimeError), outcome or "the constructor hangs"


async def _drain_all(stream: AsyncIterator[RequestOutput]) -> None:
    async for _ in stream:
        pass


def test_a_consumer_that_falls_behind_gets_the_queued_tokens_merged(tiny_models: dict[str, Path]) -> None:
    """Outputs queued while the consumer was busy arrive as one output (fewer messages downstream), with every
    token in order and the finish reason of the last."""
    path = tiny_models["llama"]
    request = EngineRequest("slow", tuple(random_prompts([20], 500, seed=43)[0]), greedy(24, logprobs=True))
    sync = LLMEngine(EngineConfig(ModelConfig(str(path), dtype="float32"), CacheConfig(num_blocks=64)))
    want = run_staggered(sync, [(0, request)])["slow"]

    async def main() -> list[RequestOutput]:
        engine = make(path)
        outputs = []
        async for out in engine.generate(request):
            outputs.append(out)
            time.sleep(0.05)  # a busy event loop: the engine thread keeps stepping meanwhile
        engine.shutdown()
        return outputs

    outputs = asyncio.run(main())
    assert [t for out in outputs for t in out.new_token_ids] == want
    assert all(len(out.new_logprobs or []) == len(out.new_token_ids) for out in outputs)
    assert outputs[-1].finish_reason is not None and all(out.finish_reason is None for out in outputs[:-1])
    assert len(outputs) < len(want), "nothing was merged"


def test_a_stream_interval_sends_the_tokens_in_larger_messages(tiny_models: dict[str, Path]) -> None:
    """stream_interval=4: the first token alone (TTFT unchanged), then messages of at least 4 tokens, the last with
    the rest and the finish reason — the same tokens as the engine's, in order."""
    path = tiny_models["llama"]
    requests = [EngineRequest(f"s{i}", tuple(p), greedy(n)) for i, (p, n) in
                enumerate(zip(random_prompts([7, 30, 1], 500, seed=44), (14, 4, 1), strict=True))]  # fmt: skip
    sync = LLMEngine(EngineConfig(ModelConfig(str(path), dtype="float32"), CacheConfig(num_blocks=64)))
    want = run_staggered(sync, [(0, r) for r in requests])

    async def main() -> list[list[RequestOutput]]:
        llm = LLMEngine(EngineConfig(ModelConfig(str(path), dtype="float32"), CacheConfig(num_blocks=64)))
        engine = AsyncEngine(llm, stream_interval=4)

        async def one(request: EngineRequest) -> list[RequestOutput]:
            return [out async for out in engine.generate(request)]

        outputs = await asyncio.gather(*(one(r) for r in requests))
        engine.shutdown()
        return list(outputs)

    for request, outputs in zip(requests, asyncio.run(main()), strict=True):
        assert [t for out in outputs for t in out.new_token_ids] == want[request.request_id]
        assert len(outputs[0].new_token_ids) == 1 and outputs[-1].finish_reason is not None
        assert all(len(out.new_token_ids) >= 4 and out.finish_reason is None for out in outputs[1:-1])


@pytest.mark.parametrize("prefill_only", [False, True], ids=["generate", "prefill_only"])
def test_an_id_reused_right_after_a_cancel_gets_only_its_own_outputs(
    tiny_models: dict[str, Path], prefill_only: bool
) -> None:
    """A retry may reuse its request's id on the same replica the moment the first attempt was cancelled (a prefill
    retried after a timeout, when Serve picks the same replica). The first attempt's last outputs — a step's tokens,
    the ABORT its cancellation published — may still be on their way to the event loop then; none may reach the
    retry's stream. 400 seeded cancels from before the request is queued to after its first output: each retry must
    get the fresh engine's tokens (prefill-only: its first token, blocks of its own that hold the prompt), no ABORT,
    and the engine must be empty afterwards."""
    path = tiny_models["llama"]
    prompts = random_prompts([1, 3, 8, 17, 30], 500, seed=43)
    sync = LLMEngine(EngineConfig(ModelConfig(str(path), dtype="float32"), CacheConfig(num_blocks=64)))
    want = run_staggered(sync, [(0, EngineRequest(f"w{i}", tuple(p), greedy(4))) for i, p in enumerate(prompts)])

    async def attempt(engine: AsyncEngine, request: EngineRequest) -> list[RequestOutput]:
        outs = []
        async for out in engine.generate(request, prefill_only=prefill_only):
            outs.append(out)
        return outs

    async def main() -> None:
        engine = make(path)
        rng = random.Random(44)
        for case in range(400):
            i = rng.randrange(len(prompts))
            request = EngineRequest("same-id", tuple(prompts[i]), greedy(4))
            first = asyncio.ensure_future(attempt(engine, request))
            for _ in range(rng.randint(0, 12)):  # 0: before the request is queued; later: mid-prefill or after it
                await asyncio.sleep(0)
            if rng.random() < 0.5:
                await asyncio.sleep(rng.uniform(0.0, 0.004))
            first.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                held = await first  # it ended before the cancel: release its result, as its caller would
                if prefill_only and held and held[-1].kv_block_ids is not None:
                    await engine.release(request.request_id)
            outs = await attempt(engine, request)  # at once: the first attempt's outputs may still be in flight
            label = f"case {case}, prompt {i}"
            assert all(out.finish_reason is not FinishReason.ABORT for out in outs), f"{label}: {outs}"
            tokens = [t for out in outs for t in out.new_token_ids]
            if prefill_only:
                assert len(outs) == 1 and tokens == want[f"w{i}"][:1], f"{label}: {outs}"
                blocks = outs[0].kv_block_ids
                assert blocks is not None and len(blocks) == -(-len(prompts[i]) // engine.engine.layout.block_size)
                seq = engine.engine._seqs[request.request_id]
                assert tuple(seq.block_ids) == blocks, f"{label}: blocks {blocks} are not the retry's {seq.block_ids}"
                await engine.release(request.request_id)
            else:
                assert tokens == want[f"w{i}"], f"{label}: {tokens} != {want[f'w{i}']}"
        stats = await engine.stats()
        assert (stats.num_used_blocks, stats.num_held, stats.num_running, stats.num_waiting) == (0, 0, 0, 0)
        engine.shutdown()

    asyncio.run(main())


def test_a_cancelled_reserve_that_got_no_room_aborts_nothing(tiny_models: dict[str, Path]) -> None:
    """A reserve refused for room (None) whose caller was cancelled: its undo runs after a second reserve of the
    same id, queued meanwhile, succeeded; it must not abort that reservation (it held nothing itself)."""

    async def main() -> None:
        engine = AsyncEngine(
            LLMEngine(EngineConfig(ModelConfig(str(tiny_models["llama"]), dtype="float32"), CacheConfig(num_blocks=4)))
        )
        assert await engine.reserve(EngineRequest("x", tuple(range(5, 45)), greedy(1)), lease_s=30)  # 3 of 4 blocks
        gate = threading.Event()
        blocked = asyncio.ensure_future(engine.call(gate.wait, 10))  # the engine thread busy: commands queue up
        too_long = EngineRequest("a", tuple(range(50, 80)), greedy(1))  # 2 blocks: more than the pool has left
        first = asyncio.ensure_future(engine.reserve(too_long, lease_s=30))
        await asyncio.sleep(0.01)
        second = asyncio.ensure_future(engine.reserve(EngineRequest("a", (5, 6, 7), greedy(1)), lease_s=30))
        await asyncio.sleep(0.01)
        first.cancel()  # its undo queues behind the second reserve
        await asyncio.sleep(0.01)
        gate.set()
        await blocked
        assert await second is not None
        with contextlib.suppress(asyncio.CancelledError):
            await first
        await engine.call(lambda: None)  # the undo has run
        assert (await engine.stats()).load.reserves_refused == 1  # the first reserve ran and found no room
        assert await engine.renew("a", 30), "the refused reserve's undo aborted the second one"
        engine.shutdown()

    asyncio.run(main())


def test_a_prompt_waiting_for_held_blocks_does_not_spin_the_engine_thread(tiny_models: dict[str, Path]) -> None:
    """An open reservation (KV still arriving) holds most of the pool and a prompt waits for blocks: the engine
    thread waits for a command or the next reap instead of rescheduling in a loop (it ran ~40,000 empty steps a
    second, holding the GIL and a core from the transports and the replica's event loop); the prompt runs as soon
    as the reservation goes."""

    async def main() -> None:
        llm = LLMEngine(
            EngineConfig(ModelConfig(str(tiny_models["llama"]), dtype="float32"), CacheConfig(num_blocks=4))
        )
        steps = 0
        step = llm.step

        def counted() -> list[RequestOutput]:
            nonlocal steps
            steps += 1
            return step()

        llm.step = counted  # type: ignore[method-assign]
        engine = AsyncEngine(llm)
        assert await engine.reserve(EngineRequest("kv", tuple(range(5, 45)), greedy(1)), lease_s=30)  # 3 of 4 blocks
        waiting = asyncio.ensure_future(_collect(engine, EngineRequest("p", tuple(range(50, 80)), greedy(3))))
        await asyncio.sleep(1.0)
        assert not waiting.done() and steps < 60, f"{steps} steps in 1 s with nothing to run"  # one per 50 ms wait
        engine.abort("kv")  # the reservation goes: its blocks free, the prompt runs at once
        started = time.monotonic()
        assert len(await asyncio.wait_for(waiting, 30)) == 3 and time.monotonic() - started < 5
        engine.shutdown()

    asyncio.run(main())


async def _collect(engine: AsyncEngine, request: EngineRequest) -> list[int]:
    return [t async for out in engine.generate(request) for t in out.new_token_ids]
