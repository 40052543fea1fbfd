"""Replica choice inside Serve handles: pinning to a named replica, otherwise Serve's own power-of-two choices.

The ingress's global router (pdserve.router) picks the replicas; a call carries its pick as `target_replica_id=`,
and this request router puts that replica in the first tier and everyone else in a fallback tier (a replica that
vanished must never make a request wait forever — it then fails cleanly on the wrong replica instead). A decode
stream must reach the replica holding its reservation, so those calls are always pinned. Unpinned calls (the
`pow2` policy, or before the router has heard from any replica) get Serve's default routing unchanged.
"""

from __future__ import annotations

from ray.serve._private.request_router import PowerOfTwoChoicesRequestRouter
from ray.serve.request_router import PendingRequest, RunningReplica

TARGET_REPLICA_KWARG = "target_replica_id"


class PinnedRequestRouter(PowerOfTwoChoicesRequestRouter):
    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        target = pending_request.kwargs.get(TARGET_REPLICA_KWARG) if pending_request is not None else None
        if target is None:
            return await super().choose_replicas(candidate_replicas, pending_request)
        return pin_tiers(candidate_replicas, target)


def pin_tiers(candidates: list[RunningReplica], target: str) -> list[list[RunningReplica]]:
    """The target alone, then the rest as the fallback tier."""
    pinned = [r for r in candidates if r.replica_id.unique_id == target]
    rest = [r for r in candidates if r.replica_id.unique_id != target]
    return [tier for tier in (pinned, rest) if tier]
