"""Pinned calls reach their replica or fail: the request router never offers another replica while the target is
a candidate (Serve then waits for a slot on it, at max_ongoing_requests too), and a replica refuses a call pinned
to another (the target vanished)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest

from pdserve.serve.messages import MisroutedCallError
from pdserve.serve.replicas import _EngineReplica
from pdserve.serve.routing import pin_tiers


def replica(unique_id: str) -> Any:
    return SimpleNamespace(replica_id=SimpleNamespace(unique_id=unique_id))


def test_the_target_is_the_only_choice_while_it_exists() -> None:
    a, b, c = replica("a"), replica("b"), replica("c")
    assert pin_tiers([a, b, c], "b") == [[b]]  # no fallback tier: a full target makes Serve wait, not spill


def test_a_vanished_target_lets_the_call_fail_elsewhere() -> None:
    a, b = replica("a"), replica("b")
    assert pin_tiers([a, b], "gone") == [[a, b]]
    assert pin_tiers([], "gone") == []


@pytest.mark.parametrize("kwargs", [{"target_replica_id": "a"}, {}], ids=["pinned", "unpinned"])
def test_a_call_waiting_for_a_full_replica_backs_off_between_attempts(kwargs: dict[str, str]) -> None:
    """Serve's routing loop (Ray 2.60's `_choose_replicas_with_backoff`, real) over PinnedRequestRouter, its one
    replica full at every attempt: a pinned call sleeps between attempts as an unpinned one does (it retried back
    to back, probing the busy replica's queue length ~840 times a second)."""
    from ray.serve._private.common import RequestMetadata
    from ray.serve._private.request_router.common import PendingRequest

    from pdserve.serve.routing import PinnedRequestRouter

    router: Any = object.__new__(PinnedRequestRouter)  # only what the loop reads

    @dataclass(frozen=True)
    class ReplicaId:
        unique_id: str

    target = SimpleNamespace(replica_id=ReplicaId("a"), max_ongoing_requests=8)
    router._replicas = {target.replica_id: target}
    router._replicas_list, router._replica_id_set = [target], {target.replica_id}
    router._prefer_local_node_routing = router._prefer_local_az_routing = False
    router.num_routing_tasks_in_backoff = 0
    router.num_routing_tasks_in_backoff_gauge = SimpleNamespace(set=lambda _: None)
    sleeps: list[int] = []

    async def backoff(attempt: int) -> None:
        sleeps.append(attempt)

    router._backoff = backoff

    async def main() -> None:
        pending = PendingRequest(args=[], kwargs=kwargs, metadata=RequestMetadata("r", "i"))
        tiers = router._choose_replicas_with_backoff(pending)
        for _ in range(50):  # each tier tried and found full
            assert await anext(tiers) == [target]
        await tiers.aclose()

    asyncio.run(main())
    assert len(sleeps) >= 45


def test_a_replica_refuses_calls_pinned_to_another() -> None:
    shell = _EngineReplica.__new__(_EngineReplica)
    shell.replica_id = "mine"
    shell._check_pinned(None)
    shell._check_pinned("mine")
    with pytest.raises(MisroutedCallError, match="pinned to replica theirs reached mine"):
        shell._check_pinned("theirs")


class Sleeper:
    """A replica that takes one call at a time and says who served it."""

    def __init__(self) -> None:
        from ray import serve

        self.replica_id = serve.get_replica_context().replica_id.unique_id

    async def whoami(self, target_replica_id: str | None = None) -> str:
        return self.replica_id

    async def hold(self, seconds: float, target_replica_id: str | None = None) -> str:
        await asyncio.sleep(seconds)
        return self.replica_id


@pytest.mark.slow
@pytest.mark.serve_cluster
def test_a_pinned_call_waits_for_its_full_replica_instead_of_spilling() -> None:
    """Two replicas at max_ongoing_requests=1: replica A is busy; calls pinned to A wait for it and are served by
    A (before, Serve's fallback tier sent them to B)."""
    import sys

    from ray import cloudpickle, serve
    from ray.serve.config import RequestRouterConfig

    from serving import shared_serve

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    with shared_serve():
        deployment: Any = serve.deployment(Sleeper).options(
            num_replicas=2,
            max_ongoing_requests=1,
            ray_actor_options={"num_cpus": 0},
            request_router_config=RequestRouterConfig(request_router_class="pdserve.serve.routing.PinnedRequestRouter"),
        )
        handle = serve.run(deployment.bind(), name="pinned", route_prefix=None)
        ids = {handle.whoami.remote().result() for _ in range(40)}
        assert len(ids) == 2, ids
        a = sorted(ids)[0]

        async def main() -> list[str]:
            busy = handle.hold.remote(1.5, target_replica_id=a)
            await asyncio.sleep(0.3)  # A now holds its one slot
            pinned = [handle.whoami.remote(target_replica_id=a) for _ in range(4)]
            return [await busy] + [await p for p in pinned]

        served_by = asyncio.run(main())
        assert served_by == [a] * 5, served_by


@pytest.mark.parametrize("second_target", ["Y", None], ids=["pinned-elsewhere", "unpinned"])
def test_a_replica_chosen_for_one_call_never_goes_to_a_call_pinned_elsewhere(second_target: str | None) -> None:
    """Serve's routing loop (real) over PinnedRequestRouter: call A pinned to X waits for a slot there; call B then
    finds room on Y. Serve's FIFO rule handed Y to A, the oldest pending call, which Y then refused as misrouted
    (a commit retried from scratch; found in review). Y goes to B; A keeps waiting for X, and gets it once free."""
    from ray.serve._private.common import RequestMetadata
    from ray.serve._private.request_router.common import PendingRequest

    async def main() -> None:
        router, x, _ = _router_of_x_and_y("DecodeServer")
        x_is_full = True

        async def select(candidates: list[Any], backoff_index: int) -> Any:
            await asyncio.sleep(0)
            return None if candidates[0] is x and x_is_full else candidates[0]

        router._select_from_candidate_replicas = select
        a = PendingRequest(args=[], kwargs={"target_replica_id": "X"}, metadata=RequestMetadata("a", "ia"))
        b_kwargs = {} if second_target is None else {"target_replica_id": second_target}
        b = PendingRequest(args=[], kwargs=b_kwargs, metadata=RequestMetadata("b", "ib"))
        a_routed = asyncio.ensure_future(router._choose_replica_for_request(a))
        await asyncio.sleep(0.05)  # A waits for a slot on X
        b_routed = asyncio.ensure_future(router._choose_replica_for_request(b))
        assert (await asyncio.wait_for(b_routed, 5)).replica_id.unique_id == "Y"
        await asyncio.sleep(0.05)
        assert not a_routed.done(), f"A was routed to {a_routed.result().replica_id.unique_id}"
        x_is_full = False
        assert (await asyncio.wait_for(a_routed, 5)).replica_id.unique_id == "X"

    asyncio.run(main())


def test_a_failed_engine_names_its_replica_through_ray_and_is_avoided_until_its_ttl() -> None:
    """The replica tags EngineUnavailableError with its id; it reaches the ingress through Ray's serialization of a
    task's error, as Ray's dual RayTaskError (an instance of both classes, where the cause class's `replica_id = None`
    hid the cause's own: the first version of this marked nothing), and `BrokenReplicas` remembers it; other errors
    mark nothing."""
    from ray.exceptions import RayError, RayTaskError

    from pdserve.engine import EngineDeadError, EngineWedgedError
    from pdserve.serve.failover import BrokenReplicas

    dead = EngineDeadError("the engine thread has failed")
    dead.replica_id = "x"
    arrived = RayError.from_bytes(RayTaskError("generate", "traceback", dead).to_bytes()).as_instanceof_cause()
    assert isinstance(arrived, EngineDeadError) and isinstance(arrived, RayTaskError)
    broken = BrokenReplicas()
    for other in (EngineWedgedError("untagged"), RuntimeError("x"), RayTaskError("f", "tb", ValueError("x"))):
        broken.mark(other)
    assert broken.current() == ()
    broken.mark(arrived)
    wedged = EngineWedgedError("busy")
    wedged.replica_id = "y"
    broken.mark(wedged)
    assert broken.current() == ("x", "y")
    expired = BrokenReplicas(ttl_s=0.0)
    expired.mark(arrived)
    assert expired.current() == ()


@pytest.mark.parametrize("avoid", [("X",), (), ("X", "Y")], ids=["avoids-x", "none", "avoids-all"])
def test_an_unpinned_call_goes_around_the_replicas_it_avoids(avoid: tuple[str, ...]) -> None:
    """Serve's routing loop (real) over PinnedRequestRouter, X always the first choice (as a failed replica, which
    answers at once, is the least loaded): a call avoiding X gets Y, a call avoiding none gets X, and a call
    avoiding every replica still gets one (it must go somewhere); `_may_take` (the hand-off of a replica freed for
    the oldest pending call) refuses a call a replica it avoids."""
    from ray.serve._private.common import RequestMetadata
    from ray.serve._private.request_router.common import PendingRequest

    from pdserve.serve.routing import AVOID_REPLICAS_KWARG, _may_take

    async def main() -> str:
        router, x, y = _router_of_x_and_y("EngineServer")

        async def select(candidates: list[Any], backoff_index: int) -> Any:
            await asyncio.sleep(0)
            return x if x in candidates else candidates[0]

        router._select_from_candidate_replicas = select
        kwargs = {AVOID_REPLICAS_KWARG: avoid} if avoid else {}
        call = PendingRequest(args=[], kwargs=kwargs, metadata=RequestMetadata("a", "ia"))
        assert _may_take(call, x) == ("X" not in avoid) and _may_take(call, y) == ("Y" not in avoid)
        chosen = await asyncio.wait_for(router._choose_replica_for_request(call), 5)
        return str(chosen.replica_id.unique_id)

    assert asyncio.run(main()) == ("Y" if avoid == ("X",) else "X")


@dataclass(frozen=True)
class _ReplicaId:
    unique_id: str


def _router_of_x_and_y(deployment: str) -> tuple[Any, Any, Any]:
    """A real PinnedRequestRouter (made on a running loop) over two stand-in replicas X and Y, one slot each."""
    from ray.serve._private.common import DeploymentHandleSource, DeploymentID

    from pdserve.serve.routing import PinnedRequestRouter

    router: Any = PinnedRequestRouter(
        deployment_id=DeploymentID(deployment, "app"), handle_source=DeploymentHandleSource.UNKNOWN
    )
    x, y = (SimpleNamespace(replica_id=_ReplicaId(n), max_ongoing_requests=1) for n in ("X", "Y"))
    router._replicas = {x.replica_id: x, y.replica_id: y}
    router._replicas_list, router._replica_id_set = [x, y], {x.replica_id, y.replica_id}
    return router, x, y
