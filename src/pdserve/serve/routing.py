"""Replica choice inside Serve handles: pinning to a named replica, otherwise Serve's own power-of-two choices.

The ingress's global router (pdserve.router) picks the replicas; a call carries its pick as `target_replica_id=`.
While the target is among the candidates it is the only choice: Serve waits for a slot on it (at
`max_ongoing_requests`) rather than spilling the call to another replica. Only a target that vanished gets the
others as candidates — a call must never wait forever — and every replica refuses a call pinned to another
(`MisroutedCallError`), so a pinned call reaches its replica or fails clearly. A decode stream, renewals and aborts
must reach the replica holding the reservation, so those calls are always pinned. Unpinned calls (the
`pow2` policy, or before the router has heard from any replica) get Serve's default routing, among the candidates
not named in `avoid_replica_ids=` (replicas whose engine failed, until Serve replaces them) while any other is left.
"""

from __future__ import annotations

from ray.serve._private.common import RequestMetadata
from ray.serve._private.request_router import PowerOfTwoChoicesRequestRouter
from ray.serve.request_router import PendingRequest, RunningReplica

TARGET_REPLICA_KWARG = "target_replica_id"
AVOID_REPLICAS_KWARG = "avoid_replica_ids"


class PinnedRequestRouter(PowerOfTwoChoicesRequestRouter):
    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        target = pending_request.kwargs.get(TARGET_REPLICA_KWARG) if pending_request is not None else None
        if target is None:
            tiers = await super().choose_replicas(candidate_replicas, pending_request)
            return tiers if pending_request is None else not_avoided(tiers, candidate_replicas, pending_request)
        # Back off between attempts while the target is full, as Serve's own choice does (it sets the flag in its
        # locality step): without it a pinned call waiting for a slot re-probed the busy replica's queue length
        # back to back (~840 probes a second per waiting call, against ~7).
        assert pending_request is not None
        pending_request.routing_context.should_backoff = True
        return pin_tiers(candidate_replicas, target)

    def _fulfill_next_pending_request(
        self, replica: RunningReplica, request_metadata: RequestMetadata | None = None
    ) -> None:
        """Hand the replica a routing task chose to the request it was chosen for, else to the oldest pending
        request that may take it (unpinned, or pinned to it). Serve's FIFO rule hands it to the oldest request,
        whatever it was chosen for: a call pinned to X waiting for a slot took the replica a concurrent call had
        chosen, and was refused there as misrouted (a commit retried from scratch; found in review)."""
        chosen_for = self._get_pending_request_matching_internal_request_id(request_metadata)
        if chosen_for is None:
            queue = self._pending_requests_to_fulfill
            while queue and queue[0].future.done():  # the lazily cleaned queue (Serve's FIFO rule popped these)
                queue.popleft()
            chosen_for = next((r for r in queue if not r.future.done() and _may_take(r, replica)), None)
        if chosen_for is None:
            return
        self._cancel_routing_task_for_pending_request(chosen_for)
        self._record_queue_wait_time(chosen_for)
        chosen_for.future.set_result(replica)
        self._remove_pending_request_from_indices(chosen_for)


def _may_take(request: PendingRequest, replica: RunningReplica) -> bool:
    target = request.kwargs.get(TARGET_REPLICA_KWARG)
    if target is None:
        return replica.replica_id.unique_id not in (request.kwargs.get(AVOID_REPLICAS_KWARG) or ())
    return target == replica.replica_id.unique_id


def not_avoided(
    tiers: list[list[RunningReplica]], candidates: list[RunningReplica], request: PendingRequest
) -> list[list[RunningReplica]]:
    """Serve's choice `tiers` without the replicas `request` avoids (Serve's power-of-two choices draws from every
    replica, whatever the candidates it is given); any other candidate when it drew only avoided ones; the tiers as
    they are when the request avoids every candidate (a call must go somewhere)."""
    avoid = request.kwargs.get(AVOID_REPLICAS_KWARG) or ()
    if not avoid:
        return tiers
    kept = [tier for tier in ([r for r in t if r.replica_id.unique_id not in avoid] for t in tiers) if tier]
    if kept:
        return kept
    others = [r for r in candidates if r.replica_id.unique_id not in avoid]
    return [others] if others else tiers


def pin_tiers(candidates: list[RunningReplica], target: str) -> list[list[RunningReplica]]:
    """The target alone while it is a candidate (never a fallback to another); else the rest, which refuse it."""
    pinned = [r for r in candidates if r.replica_id.unique_id == target]
    return [pinned] if pinned else [candidates] if candidates else []
