"""The ingress router's pull of replica state: ten a second while anything goes on, one a second when the cluster is
quiet, and at once when a request arrives at a quiet ingress (fake pools in place of Serve's handles)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from pdserve.engine import EngineRequest, SamplingParams
from pdserve.kvcache import KVEvent, KVEventBatch, KVEventKind
from pdserve.router import CostConfig, ReplicaReport, SyncCursor
from pdserve.serve.config import RouterSettings
from pdserve.serve.ingress_router import IngressRouter
from pdserve.serve.messages import ReplicaSync


class FakePool:
    """One replica of a pool, answering `router_sync` broadcasts as a replica does; the test sets its load and
    appends KV events."""

    def __init__(self, role: str) -> None:
        self.replica_id = f"{role}-0"
        self.role = role
        self.running = 0
        self.events: list[KVEvent] = []
        self.pulls: list[float] = []
        self.delay_s = 0.0  # how long an answer takes

    def broadcast(self, method: str, cursors: dict[str, SyncCursor]) -> FakePool:
        assert method == "router_sync"
        self._cursor = cursors.get(self.replica_id, SyncCursor(None, 0))
        return self

    async def results_async(self, timeout_s: float, return_exceptions: bool) -> list[Any]:
        self.pulls.append(time.monotonic())
        cursor = self._cursor
        await asyncio.sleep(self.delay_s)
        if cursor.incarnation != "inc":
            batch = KVEventBatch("inc", len(self.events), (), frozenset())
        else:
            batch = KVEventBatch("inc", len(self.events), tuple(self.events[cursor.seq :]), None)
        report = ReplicaReport(self.replica_id, self.role, "node", 100, 100, self.running, 0)
        return [ReplicaSync(report, batch)]


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
