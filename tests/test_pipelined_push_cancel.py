"""A pipelined push (kv_pipelined_push) outlives a cancelled prefill call's compute: the prompt's blocks on P must
stay its own until the push thread has ended (found in review: they were freed at the cancel, reused by the next
request, and its KV sent as the first's: wrong tokens with a 200); and its deadline counts from the prompt's first
layer, not from a queue before it."""

from __future__ import annotations

import asyncio
import threading
import time
from contextlib import aclosing
from pathlib import Path
from typing import Any

import pytest

from oracle import greedy
from pdserve.engine import EngineRequest
from pdserve.serve.config import ServeConfig
from pdserve.transfer import base, shm
from test_handoff_faults import Cluster, serve_config  # noqa: F401  (the rig's fixture)


@pytest.fixture
def pipelined_config(serve_config: ServeConfig) -> ServeConfig:  # noqa: F811  (the imported fixture)
    """test_handoff_faults' rig with pushes pipelined, and a lease the test's pauses never reach."""
    return serve_config.model_copy(update={"reservation_lease_s": 30.0, "kv_pipelined_push": True})


async def _tokens(outputs: Any) -> list[int]:
    tokens: list[int] = []
    async with aclosing(outputs) as stream:
        async for out in stream:
            tokens += out.new_token_ids
    return tokens


async def _until(event: threading.Event, timeout_s: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not event.is_set():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.005)


def test_pipelined_prefill_cancelled_in_its_last_step_keeps_its_source_blocks_until_its_push_ends(
    pipelined_config: ServeConfig, tiny_models: dict[str, Path]
) -> None:
    """kv_pipelined_push: P1's prefill of A is cancelled (the ingress's prefill timeout: `_renewing` cancels the
    call) while the engine runs A's last step. The cancel lands in `_compute` (AsyncEngine._drain's
    `await stream.get()`), whose `finally` aborts A on P1's engine: A's prompt blocks are freed after that step —
    while the push thread (a worker thread `_finish_uncancelled` waits for, but does not stop) still reads them
    layer by layer. B then reuses them on P1. The handoff retries A on P2 into the same reservation (same epoch),
    and the first attempt's push, still permitted by D's fence, copies its next layer from P1's blocks — B's KV —
    into A's reserved blocks. A is committed and decodes from KV that is not its prompt's: wrong tokens."""
    asyncio.run(_stale_source(pipelined_config, str(tiny_models["llama"])))


async def _stale_source(config: ServeConfig, model_path: str) -> None:
    cluster = Cluster(config, model_path)
    cluster.config = config.model_copy(update={"num_kv_blocks": 6})  # P1: 6 blocks of 4; a 20-token prompt: 5
    p1 = cluster.add("prefill").server
    cluster.config = config
    p2 = cluster.add("prefill").server
    d = cluster.add("decode").server
    num_layers = p1.llm.layout.num_layers
    a_prompt, b_prompt = list(range(100, 120)), list(range(300, 320))

    reported, go, stalled, release = threading.Event(), threading.Event(), threading.Event(), threading.Event()
    pause_engine, stall_push = [True], [True]
    layer_done, check = base.LayerProgress.layer_done, shm.fence_deadline

    def pausing_layer_done(self: Any, layer: int, block_ids: Any) -> None:
        layer_done(self, layer, block_ids)
        if pause_engine[0] and layer == num_layers - 1:  # A's last step, on P1's engine thread
            pause_engine[0] = False
            reported.set()
            go.wait(20)

    def stalling_check(*args: Any) -> Any:
        deadline = check(*args)  # the permit is open to A's epoch: the copy of this layer goes on
        if stall_push[0] and args[-1] == "layer 1":
            stall_push[0] = False
            stalled.set()
            release.wait(20)  # a descheduled push thread, a slow link
        return deadline

    try:
        want = await _tokens(p2.engine.generate(EngineRequest("oracle-a", tuple(a_prompt), greedy(6))))
        request = EngineRequest("A", tuple(a_prompt), greedy(6))
        reservation = await d.reserve(request)
        assert reservation is not None and reservation.num_cached_tokens == 0
        with pytest.MonkeyPatch.context() as m:
            m.setattr(base.LayerProgress, "layer_done", pausing_layer_done)
            m.setattr(shm, "fence_deadline", stalling_check)
            first_call = asyncio.ensure_future(p1.prefill(request, reservation))
            await _until(reported)  # P1's engine thread is inside A's last step; the push copied layer 0
            await _until(stalled)
            first_call.cancel()  # the ingress timed the prefill out
            await asyncio.sleep(0.05)  # the cancel reaches `_compute`: A's abort is queued on P1's engine
            go.set()  # the step ends; the abort frees A's blocks on P1
            await asyncio.sleep(0.1)
            assert not first_call.done(), "the cancelled call waits for its push"
            # Another request on P1 takes the freed blocks and writes its KV there (the defect: at once); kept until the
            # push ends (the fix), B waits for them, so it runs beside the rest (awaited, it waited out `release`).
            b_call = asyncio.ensure_future(_tokens(p1.engine.generate(EngineRequest("B", tuple(b_prompt), greedy(1)))))
            await asyncio.wait({b_call}, timeout=1.0)
            # The handoff's retry, on the other prefill replica, into the same reservation.
            result = await p2.prefill(EngineRequest("A.p1", tuple(a_prompt), greedy(6)), reservation)
            release.set()  # the first attempt's push goes on: layer 1, read from P1's blocks now
            with pytest.raises(asyncio.CancelledError):
                await first_call
            await b_call
        got = [result.first_token_id]
        got += await _tokens(d.decode("A", result.first_token_id, result.first_logprob, may_be_written=True,
                                      is_writer_stopped=True))  # fmt: skip
        assert got == want, "A decoded from another request's KV, copied by its abandoned prefill's push"
    finally:
        go.set()
        release.set()
        cluster.close()


def test_a_pipelined_push_waits_out_the_prompts_queue_time_beyond_the_transfer_timeout(
    pipelined_config: ServeConfig, tiny_models: dict[str, Path]
) -> None:
    """kv_pipelined_push starts its push with the call; a prompt that waits in P's queue longer than
    `kv_transfer_timeout_s` before its first layer must still be pushed (the queue is the prefill's time, bounded
    by `prefill_timeout_s`): it failed with "deadline passed" and was retried, then prefilled locally."""
    config = pipelined_config.model_copy(update={"kv_transfer_timeout_s": 0.3})
    asyncio.run(_queued_first_layer(config, str(tiny_models["llama"])))


async def _queued_first_layer(config: ServeConfig, model_path: str) -> None:
    cluster = Cluster(config, model_path)
    p, d = cluster.add("prefill").server, cluster.add("decode").server
    prompt = tuple(range(100, 120))
    layer_done, queued = base.LayerProgress.layer_done, [True]

    def queued_layer_done(self: Any, layer: int, block_ids: Any) -> None:
        if queued[0]:  # the prompt's first layer comes after a queue twice the transfer's timeout
            queued[0] = False
            time.sleep(0.6)
        layer_done(self, layer, block_ids)

    try:
        want = await _tokens(p.engine.generate(EngineRequest("oracle", prompt, greedy(6))))
        request = EngineRequest("A", prompt, greedy(6))
        reservation = await d.reserve(request)
        assert reservation is not None
        with pytest.MonkeyPatch.context() as m:
            m.setattr(base.LayerProgress, "layer_done", queued_layer_done)
            result = await p.prefill(request, reservation)
        assert not queued[0]
        got = [result.first_token_id] + await _tokens(d.decode("A", result.first_token_id, result.first_logprob))
        assert got == want
    finally:
        cluster.close()
