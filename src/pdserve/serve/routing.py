"""Replica choice for Serve handles: pinning to a named replica, otherwise a least-loaded pick.

A decode request must reach the replica that holds its reservation. Callers pass `target_replica_id=` to the
method; this router puts that replica in the first tier and everyone else in a fallback tier (a replica that
vanished must never make a request wait forever — it then fails cleanly on the wrong replica instead).
"""

from __future__ import annotations

import random

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

TARGET_REPLICA_KWARG = "target_replica_id"


class PinnedRequestRouter(FIFOMixin, RequestRouter):
    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        target = pending_request.kwargs.get(TARGET_REPLICA_KWARG) if pending_request is not None else None
        return rank_replicas(candidate_replicas, target)


def rank_replicas(candidates: list[RunningReplica], target: str | None) -> list[list[RunningReplica]]:
    """Tiers: the target alone, then the rest; or, unpinned, two random candidates (the less loaded wins)."""
    if target is not None:
        pinned = [r for r in candidates if r.replica_id.unique_id == target]
        rest = [r for r in candidates if r.replica_id.unique_id != target]
        return [tier for tier in (pinned, rest) if tier]
    return [random.sample(candidates, min(2, len(candidates)))] if candidates else []
