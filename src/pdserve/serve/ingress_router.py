"""The ingress's side of the global router: keeps `pdserve.router.Router` fed from the replicas, and routes.

Every `sync_period_s` it broadcasts `router_sync(cursors)` to the prefill and decode pools; each replica answers
with its load and the KV events after its cursor (or a snapshot), which the router applies. Each ingress replica
keeps its own router (Serve request routers are per process too). Routing never waits on the sync.

A pull that finds the cluster quiet (every replica idle, no new KV events, no request of this ingress in flight)
slows the next to `idle_sync_period_s`, and a request's arrival ends that wait: an idle app costs its replicas one
pull a second instead of ten (at 0.1 s, the pulls alone were ~2/3 of an idle 1P1D app's CPU, ~0.13 of a core).
Only another ingress's requests can change a quiet cluster, and this one sees them at most one idle period late.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from ray.serve.exceptions import DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from pdserve.engine import EngineRequest
from pdserve.kvcache import hash_block_chain
from pdserve.router import CostConfig, RouteDecision, Router
from pdserve.router.admission import Admission
from pdserve.serve.config import RouterSettings
from pdserve.serve.failover import BrokenReplicas, ReplicaCancelled, foreign_cancel_as_fault, raise_if_cancelling
from pdserve.serve.failover import counters as failover
from pdserve.serve.messages import ReplicaSync

logger = logging.getLogger(__name__)
BROADCAST_TIMEOUT_S = 5.0


async def broadcast(
    handle: DeploymentHandle, method: str, *args: Any, timeout_s: float = BROADCAST_TIMEOUT_S
) -> list[Any]:
    """`method(*args)` on every replica of `handle`: results and exceptions, one per replica, within `timeout_s` —
    a replica that has not answered by then (wedged) gets a TimeoutError in its place, and the others' answers
    count (with Serve's all-or-nothing `results_async`, one wedged replica made its whole pool look silent, and the
    router dropped the healthy ones until Serve's health check replaced it). Empty when Serve cannot even list the
    replicas in time. Raises DeploymentUnavailableError when the pool has no running replica (all died, or scaled
    to zero): Serve knows it is empty, which is not the same as not knowing. Uses the per-replica results of Ray
    2.60's broadcast response (pyproject pins Ray)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    response = handle.broadcast(method, *args)
    try:
        replica_results = await asyncio.wait_for(response._fetch_replica_results_async(), timeout_s)
    except TimeoutError:
        logger.warning("broadcast of %s found no replicas within %.0f s; skipped this round", method, timeout_s)
        return []
    calls = [asyncio.ensure_future(result.get_async()) for result in replica_results]
    if not calls:
        return []
    try:
        _, pending = await asyncio.wait(calls, timeout=max(0.0, deadline - loop.time()))
    finally:  # and when the caller is cancelled: no call outlives the broadcast
        for call in calls:
            call.cancel()
    if pending:
        logger.warning("%d replica(s) did not answer %s within %.0f s", len(pending), method, timeout_s)
    results: list[Any] = []
    for call in calls:
        if call in pending:
            results.append(TimeoutError(f"{method} unanswered after {timeout_s:.0f} s"))
        elif call.cancelled():  # on the replica's side (Serve raises that as a plain CancelledError): its answer
            results.append(ReplicaCancelled(f"{method} was cancelled on its replica"))
        elif (error := call.exception()) is not None:
            results.append(error)
        else:
            results.append(call.result())
    return results


class IngressRouter:
    def __init__(self, settings: RouterSettings, cost: CostConfig, prefill: DeploymentHandle, decode: DeploymentHandle):
        self.settings = settings
        self.router = Router(cost, settings.policy, settings.optimistic_ttl_s, settings.replica_timeout_s)
        self.pools = (prefill, decode)
        self._task: asyncio.Task[None] | None = None
        self.is_quiet = False  # the last pull found nothing going on: the next waits longer, or for a request
        self._arrived = asyncio.Event()

    async def start(self) -> None:
        """Sync once (so the first requests are routed with knowledge), then keep syncing in the background."""
        if self.settings.policy == "pow2":
            return  # Serve's own routing: nothing to keep
        await self.sync()
        self._task = asyncio.get_running_loop().create_task(self._sync_forever())

    def route(self, request: EngineRequest) -> RouteDecision | None:
        """The (prefill, decode) pair for `request`; None means "let Serve route" (pow2, or no replica known)."""
        if self.settings.policy == "pow2" or not self.router.loads:
            return None
        self._arrived.set()  # ends a quiet wait: pull now, while this request runs
        if request.sampling.prompt_logprobs is not None:  # the engine computes every prompt token: no cache hit
            chain: list[int] = []
        else:
            chain = hash_block_chain(request.prompt_token_ids, self.router.config.block_size, request.cache_salt)
        max_new_tokens = request.sampling.max_tokens or self.router.config.expected_output_tokens
        try:
            return self.router.route(request.request_id, chain, len(request.prompt_token_ids), max_new_tokens)
        except ValueError:
            logger.warning("router knows no decode replica yet; letting Serve route %s", request.request_id)
            return None

    async def sync(self) -> None:
        cursors = self.router.cursors()
        is_quiet = True
        for role, pool in zip(("prefill", "decode"), self.pools, strict=True):
            try:
                results = await broadcast(pool, "router_sync", cursors)
            except DeploymentUnavailableError:  # no running replica: route around the pool at once (local prefill)
                for replica_id in self.router.retain(role, set()):
                    logger.warning("%s replica %s left the pool, which has no running replica", role, replica_id)
                is_quiet = False
                continue
            is_quiet = is_quiet and bool(results)
            for result in results:
                if isinstance(result, ReplicaSync):
                    self.router.apply_report(result.report, result.events)
                    is_quiet = is_quiet and _is_quiet(result)
                else:
                    is_quiet = False
                    logger.warning("a replica failed its router sync: %r", result)
            if results and all(isinstance(r, ReplicaSync) for r in results):  # the pool's whole live set answered
                for replica_id in self.router.retain(role, {r.report.replica_id for r in results}):
                    logger.info("%s replica %s left the pool (scaled down or replaced)", role, replica_id)
        for replica_id in self.router.drop_silent_replicas():
            logger.warning("replica %s stopped reporting; removed from the router", replica_id)
        self.is_quiet = is_quiet and self.router.num_in_flight == 0

    async def _sync_forever(self) -> None:
        while True:
            raise_if_cancelling()
            if self.is_quiet:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._arrived.wait(), self.settings.idle_sync_period_s)
            else:
                await asyncio.sleep(self.settings.sync_period_s)
            self._arrived.clear()  # a request arriving from here on, during the pull too, cuts the next quiet wait
            try:
                with foreign_cancel_as_fault("a router sync"):  # only this task's own cancel may end the loop
                    await self.sync()
            except Exception:
                self.is_quiet = False
                logger.exception("router sync failed; retrying next period")


def _is_quiet(sync: ReplicaSync) -> bool:
    """Nothing to follow on this replica: no request on it and no change to its cache since the last pull."""
    report, events = sync.report, sync.events
    return report.num_running == 0 and report.num_waiting == 0 and not events.events and events.snapshot is None


class RouterCollector(Collector):
    """The router's counters and index staleness, rendered at /metrics."""

    def __init__(
        self, router: IngressRouter | None, admission: Admission, broken: BrokenReplicas | None = None
    ) -> None:
        self.ingress_router = router
        self.admission = admission
        self.broken = broken

    def collect(self) -> Iterable[Metric]:
        a = self.admission
        yield GaugeMetricFamily("pdserve_admission_queued_tokens", "prompt tokens waiting for their first token",
                                value=a.num_queued_tokens)  # fmt: skip
        yield CounterMetricFamily("pdserve_admission_refused", "requests refused at admission (429)",
                                  value=a.counters.num_refused)  # fmt: skip
        for name, doc, value in [
            ("prefill_retries", "prefills retried on another replica", failover.prefill_retries),
            ("local_prefill_fallbacks", "prompts prefilled on their decode replica: no prefill worked",
             failover.local_fallbacks),
            ("handoff_retries", "requests handed off again after failing before their first token",
             failover.handoff_retries),
            ("stream_migrations", "streams moved to another replica", failover.migrations),
        ]:  # fmt: skip
            yield CounterMetricFamily(f"pdserve_{name}", doc, value=value)
        if self.broken is not None:
            yield GaugeMetricFamily("pdserve_replicas_routed_around", "engine replicas whose engine failed a call, "
                                    "avoided until Serve replaces them", value=len(self.broken.current()))  # fmt: skip
        if self.ingress_router is None:
            return
        router = self.ingress_router.router
        c = router.counters
        decisions = CounterMetricFamily("pdserve_router_decisions", "routing decisions", labels=["policy", "mode"])
        for mode, count in c.decisions.items():
            decisions.add_metric([router.policy, mode], count)
        yield decisions
        for name, doc, value in [
            ("prompt_tokens", "prompt tokens routed", c.num_prompt_tokens),
            ("expected_hit_tokens", "prefix-cache hit tokens the decisions expected", c.expected_hit_tokens),
            ("realized_hit_tokens", "prefix-cache hit tokens the computing replicas reported", c.realized_hit_tokens),
            ("expected_transfer_tokens", "prompt tokens the decisions expected to move", c.expected_transfer_tokens),
            ("index_resyncs", "replica resyncs after a gap or restart", router.index.num_resyncs),
        ]:
            yield CounterMetricFamily(f"pdserve_router_{name}", doc, value=value)
        yield GaugeMetricFamily("pdserve_router_in_flight", "requests the router tracks", value=router.num_in_flight)
        staleness = GaugeMetricFamily(
            "pdserve_router_index_staleness_seconds", "age of the replica's last applied KV events", labels=["replica"]
        )
        for replica_id in router.index.replica_ids:
            staleness.add_metric([replica_id], router.index.staleness_s(replica_id))
        yield staleness
