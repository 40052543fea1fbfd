"""The ingress router's pull of replica state: ten a second while anything goes on, one a second when the cluster is
quiet, and at once when a request arrives at a quiet ingress (fake pools in place of Serve's handles)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from functools import partial
from types import SimpleNamespace
from typing import Any

import pytest
from ray.serve._private.common import DeploymentID
from ray.serve.exceptions import DeploymentUnavailableError

from pdserve.engine import EngineRequest, SamplingParams
from pdserve.kvcache import KVEvent, KVEventBatch, KVEventKind, hash_block_chain
from pdserve.router import CostConfig, ReplicaReport, RouteMode, SyncCursor
from pdserve.serve.config import RouterSettings
from pdserve.serve.ingress_router import IngressRouter, broadcast
from pdserve.serve.messages import ReplicaSync


class FakeBroadcast:
    """What Ray 2.60's `DeploymentHandle.broadcast` returns, as far as `broadcast()` uses it: the per-replica
    results, each awaited on its own."""

    def __init__(self, *answers: Callable[[], Awaitable[Any]]) -> None:
        self.answers = answers

    async def _fetch_replica_results_async(self) -> list[Any]:
        if not self.answers:  # as Ray 2.60 does for a deployment with no running replica
            raise DeploymentUnavailableError(DeploymentID(name="pool", app_name="app"))
        return [SimpleNamespace(get_async=answer) for answer in self.answers]


class FakePool:
    """Replicas of a pool answering `router_sync` broadcasts as replicas do; the test sets their load and appends
    KV events; a wedged one (`wedged`, by index) never answers."""

    def __init__(self, role: str, num_replicas: int = 1) -> None:
        self.replica_ids = [f"{role}-{i}" for i in range(num_replicas)]
        self.replica_id = self.replica_ids[0]
        self.role = role
        self.running = 0
        self.events: list[KVEvent] = []
        self.pulls: list[float] = []
        self.delay_s = 0.0  # how long an answer takes
        self.wedged: set[int] = set()

    def broadcast(self, method: str, cursors: dict[str, SyncCursor]) -> FakeBroadcast:
        assert method == "router_sync"
        self.pulls.append(time.monotonic())
        return FakeBroadcast(*(partial(self._answer, i, cursors) for i in range(len(self.replica_ids))))

    async def _answer(self, i: int, cursors: dict[str, SyncCursor]) -> ReplicaSync:
        replica_id = self.replica_ids[i]
        cursor = cursors.get(replica_id, SyncCursor(None, 0))
        await asyncio.sleep(1e9 if i in self.wedged else self.delay_s)
        if cursor.incarnation != "inc":
            batch = KVEventBatch("inc", len(self.events), (), frozenset())
        else:
            batch = KVEventBatch("inc", len(self.events), tuple(self.events[cursor.seq :]), None)
        return ReplicaSync(ReplicaReport(replica_id, self.role, "node", 100, 100, self.running, 0), batch)


async def _started(settings: RouterSettings) -> tuple[IngressRouter, FakePool, FakePool]:
    prefill, decode = FakePool("prefill"), FakePool("decode")
    router = IngressRouter(settings, CostConfig(block_size=4), prefill, decode)  # type: ignore[arg-type]
    await router.start()
    return router, prefill, decode


async def _pulls_in(pool: FakePool, seconds: float) -> int:
    before = len(pool.pulls)
    await asyncio.sleep(seconds)
    return len(pool.pulls) - before


def _request(request_id: str) -> EngineRequest:
    return EngineRequest(request_id, tuple(range(1, 13)), SamplingParams(max_tokens=4))


SETTINGS = RouterSettings(sync_period_s=0.02, idle_sync_period_s=0.5)


def test_a_quiet_cluster_is_pulled_at_the_idle_period_and_a_busy_one_at_the_sync_period() -> None:
    async def main() -> None:
        router, prefill, decode = await _started(SETTINGS)
        await asyncio.sleep(0.1)  # the first pull's snapshot applied; nothing goes on
        assert router.is_quiet
        assert await _pulls_in(decode, 1.0) <= 3  # ~2 at 0.5 s (50 at the sync period)

        decode.running = 1  # another ingress's request, seen at the next pull
        await asyncio.sleep(0.6)
        assert not router.is_quiet
        assert await _pulls_in(decode, 0.5) >= 8  # ~25 at 0.02 s

        decode.running = 0
        await asyncio.sleep(0.1)
        assert router.is_quiet
        prefill.events.append(KVEvent(1, KVEventKind.STORED, (7,)))  # a cache change: pulled within the idle period
        await asyncio.sleep(0.6)
        assert router.router.cursors()[prefill.replica_id] == SyncCursor("inc", 1)
        assert router.is_quiet  # and quiet again once a pull brings nothing new

    asyncio.run(main())


def test_a_request_arriving_at_a_quiet_ingress_is_followed_at_once_and_keeps_it_busy() -> None:
    async def main() -> None:
        router, _, decode = await _started(
            RouterSettings(sync_period_s=0.02, idle_sync_period_s=30.0, replica_timeout_s=60.0)
        )
        await asyncio.sleep(0.1)
        assert router.is_quiet
        before = len(decode.pulls)
        decision = router.route(_request("r1"))
        assert decision is not None
        await asyncio.sleep(0.2)
        assert len(decode.pulls) >= before + 3  # at once, then at the sync period while r1 is in flight
        assert not router.is_quiet
        router.router.finish("r1")
        await asyncio.sleep(0.1)
        assert router.is_quiet

    asyncio.run(main())


def test_a_request_that_comes_and_goes_during_a_pull_cuts_the_next_quiet_wait() -> None:
    """Its KV events may postdate that pull: the next pull must not wait the idle period."""

    async def main() -> None:
        router, _, decode = await _started(
            RouterSettings(sync_period_s=0.02, idle_sync_period_s=30.0, replica_timeout_s=60.0)
        )
        await asyncio.sleep(0.1)
        assert router.is_quiet
        decode.delay_s = 0.2
        router.route(_request("r1"))  # wakes the loop: a pull starts
        await asyncio.sleep(0.05)
        before = len(decode.pulls)
        assert router.route(_request("r2")) is not None  # during the pull, and gone before it ends
        router.router.finish("r1")
        router.router.finish("r2")
        decode.delay_s = 0.0
        await asyncio.sleep(0.4)
        assert len(decode.pulls) >= before + 1, "r2's arrival was lost: the next pull waits 30 s"

    asyncio.run(main())


@pytest.mark.parametrize("field", ["sync_period_s", "idle_sync_period_s"])
def test_periods_must_be_positive(field: str) -> None:
    with pytest.raises(ValueError, match=field):
        RouterSettings(**{field: 0})


@pytest.mark.parametrize(
    "periods",
    [{"sync_period_s": 2.0, "idle_sync_period_s": 1.0}, {"idle_sync_period_s": 10.0, "replica_timeout_s": 10.0}],
)
def test_a_quiet_replica_never_times_out_between_pulls(periods: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="idle_sync_period_s < replica_timeout_s"):
        RouterSettings(**periods)


def test_a_wedged_replica_costs_only_its_own_answer() -> None:
    """One replica of three never answers: the broadcast returns the others' answers and a TimeoutError for it, on
    time, and the router keeps routing to the healthy ones — before, the whole pool looked silent, and the router
    dropped every replica of it after replica_timeout_s."""

    async def main() -> None:
        pool = FakePool("decode", num_replicas=3)
        pool.wedged = {1}
        start = time.monotonic()
        results = await broadcast(pool, "router_sync", {}, timeout_s=0.3)  # type: ignore[arg-type]
        assert 0.3 <= time.monotonic() - start < 1.0
        assert [type(r).__name__ for r in results] == ["ReplicaSync", "TimeoutError", "ReplicaSync"]
        await asyncio.sleep(0)  # a cancelled task ends at its next turn
        assert len(asyncio.all_tasks()) == 1  # the unanswered call was cancelled, not left behind

        prefill, decode = FakePool("prefill"), FakePool("decode", num_replicas=2)
        settings = RouterSettings(sync_period_s=0.02, idle_sync_period_s=0.05, replica_timeout_s=0.5)
        router = IngressRouter(settings, CostConfig(block_size=4), prefill, decode)  # type: ignore[arg-type]
        await router.start()
        assert sorted(router.router.loads) == ["decode-0", "decode-1", "prefill-0"]
        decode.wedged = {1}
        with pytest.MonkeyPatch.context() as m:
            m.setattr(broadcast, "__kwdefaults__", {"timeout_s": 0.1})  # Serve's 5 s, shortened
            await asyncio.sleep(1.5)  # three times replica_timeout_s
        assert sorted(router.router.loads) == ["decode-0", "prefill-0"]  # the wedged one left, the healthy stayed
        decision = router.route(_request("r1"))
        assert decision is not None and decision.decode_replica_id == "decode-0"

    asyncio.run(main())


def test_an_answer_cancelled_on_its_replica_fails_that_answer_and_the_sync_goes_on() -> None:
    """Serve raises a call cancelled on the replica's side as a plain CancelledError: `broadcast` let it escape and
    the background sync ended for good — no replica ever dropped or learned again (found in review). Now it is that
    replica's failed answer, and the pulls go on; the router learns a replacement replica."""

    class CancellingPool(FakePool):
        num_to_cancel = 0

        async def _answer(self, i: int, cursors: dict[str, SyncCursor]) -> ReplicaSync:
            if self.num_to_cancel:
                self.num_to_cancel -= 1
                raise asyncio.CancelledError()  # what get_async() raises for a call cancelled on the replica
            return await super()._answer(i, cursors)

    async def main() -> None:
        pool = CancellingPool("decode", num_replicas=2)
        pool.num_to_cancel = 1
        results = await broadcast(pool, "router_sync", {})  # type: ignore[arg-type]
        assert [type(r).__name__ for r in results] == ["ReplicaCancelled", "ReplicaSync"]

        prefill, decode = FakePool("prefill"), CancellingPool("decode")
        router = IngressRouter(SETTINGS, CostConfig(block_size=4), prefill, decode)  # type: ignore[arg-type]
        await router.start()
        decode.num_to_cancel = 3
        router.route(_request("wake"))  # busy: pulled every sync period
        await asyncio.sleep(0.3)
        assert router._task is not None and not router._task.done()
        assert await _pulls_in(prefill, 0.3) > 3
        decode.replica_ids = ["decode-new"]  # Serve replaced the decode replica
        await asyncio.sleep(0.3)
        assert "decode-new" in router.router.loads and "decode-0" not in router.router.loads

    asyncio.run(main())


def test_a_pool_left_with_no_running_replica_is_routed_around_and_the_other_is_still_followed() -> None:
    """Every prefill replica died (or the pool scaled to zero): Serve's broadcast raises DeploymentUnavailableError.
    It escaped the sync before the decode pool was pulled, every round, so the router kept routing prompts to the
    dead P (each waited out its prefill timeout) and froze D's load and cache view (found in review). Now the next
    sync forgets the pool's replicas, prompts prefill on D, and D's reports keep arriving; a P that comes back is
    learned again."""

    async def main() -> None:
        router, prefill, decode = await _started(SETTINGS)
        assert sorted(router.router.loads) == ["decode-0", "prefill-0"]
        prefill.replica_ids = []
        decode.running = 7
        router.route(_request("wake"))  # busy: pulled every sync period
        await asyncio.sleep(0.2)
        assert sorted(router.router.loads) == ["decode-0"]
        assert router.router.loads["decode-0"].num_reported_running == 7
        decision = router.route(_request("r1"))
        assert decision is not None and decision.mode is RouteMode.LOCAL and decision.prefill_replica_id is None
        prefill.replica_ids = ["prefill-new"]
        await asyncio.sleep(0.2)
        assert sorted(router.router.loads) == ["decode-0", "prefill-new"]

    asyncio.run(main())


def test_a_prompt_asking_for_prompt_logprobs_is_routed_as_a_cache_miss() -> None:
    """The engine recomputes the whole prompt when prompt logprobs are asked for (every token's logits are needed):
    routing it by its cached prefix counted almost no work for it, and "D lacks few tokens" sent a full prefill to
    a decode replica past `local_prefill_max_tokens` (found in review)."""

    async def main() -> None:
        router, _, decode = await _started(SETTINGS)
        prompt = tuple(range(1, 401))  # past the local prefill cap (256 tokens)
        hashes = hash_block_chain(prompt, 4, None)
        decode.events.append(KVEvent(1, KVEventKind.STORED, tuple(hashes)))
        await router.sync()
        for prompt_logprobs, mode, cached in [(None, RouteMode.LOCAL, 396), (0, RouteMode.DISAGGREGATED, 0)]:
            request = EngineRequest("r", prompt, SamplingParams(max_tokens=4, prompt_logprobs=prompt_logprobs))
            decision = router.route(request)
            assert decision is not None and (decision.mode, decision.expected_cached_tokens) == (mode, cached)
            router.router.finish("r")

    asyncio.run(main())


def test_the_sync_loop_ends_on_a_cancel_that_a_call_swallowed() -> None:
    """Python 3.11's wait_for returns a result when a cancel lands as its call completes (the cancel is swallowed,
    but counted by `cancelling()`): the loop ran on, and asyncio.run's shutdown waited for it for ever (a CI run hung
    600 s in the test above). The swallow is staged here: a sync that cancels its own task and swallows it."""

    async def main() -> None:
        router, _, _ = await _started(SETTINGS)
        swallowed = asyncio.Event()

        async def sync_swallowing_a_cancel() -> None:
            task = asyncio.current_task()
            assert task is not None
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(0)  # as wait_for does when its call is done as the cancel lands
            swallowed.set()

        router.sync = sync_swallowing_a_cancel  # type: ignore[method-assign]
        await asyncio.wait_for(swallowed.wait(), 5)
        assert router._task is not None
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(router._task, 5)
        assert router._task.cancelled()

    asyncio.run(main())
