"""The prefill -> decode handoff (DESIGN.md §4), as one linear async function.

reserve on a decode replica -> prefill (which pushes only the blocks the decode replica lacks) -> commit and stream
from the same decode replica; or, when the router chose local mode, the decode replica prefills and decodes alone.
Whatever happens after the reservation, it is released exactly once: by the stream's end, by commit failure, or
by an explicit abort (client gone, prefill failed).

The reserve and the prefill are shielded from the client's cancellation: a reservation the ingress never learned
of would leak until its lease, and a prefill replica may still be writing into reserved blocks — freeing them
before it returns could let a stale writer overwrite blocks already handed to another request.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import anyio
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from pdserve.api.backend import CapacityError
from pdserve.engine import EngineRequest, FinishReason, RequestOutput
from pdserve.router import RouteDecision, RouteMode
from pdserve.serve.messages import PrefillResult, Reservation

logger = logging.getLogger(__name__)
_ABORT_TIMEOUT_S = 5.0


async def disaggregated_generate(
    request: EngineRequest, prefill: DeploymentHandle, decode: DeploymentHandle, route: RouteDecision | None
) -> AsyncIterator[RequestOutput]:
    """Stream `request`'s outputs through the pair `route` chose (None: Serve picks the replicas)."""
    if route is not None and route.mode is RouteMode.LOCAL:  # the decode replica lacks few tokens: it prefills
        local = decode.options(stream=True).generate.remote(request, target_replica_id=route.decode_replica_id)
        async for out in _stream(local):  # type: ignore[arg-type]
            yield out
        return
    with anyio.CancelScope(shield=True):
        reservation = await _reserve(request, decode, route)
    if reservation is None:
        raise CapacityError("no decode replica has room for this request now", retry_after_s=1.0)
    pinned = {"target_replica_id": reservation.replica_id}
    is_done = False
    try:
        with anyio.CancelScope(shield=True):
            result: PrefillResult = await prefill.prefill.remote(
                request, reservation, target_replica_id=route and route.prefill_replica_id
            )
        first = RequestOutput(
            request.request_id,
            [result.first_token_id],
            None if result.first_logprob is None else [result.first_logprob],
            FinishReason(result.finish_reason) if result.finish_reason else None,
            result.num_prompt_tokens,
            result.num_cached_tokens,  # the prefill replica's hit: prompt tokens nobody recomputed
            queue_s=result.queue_s,
        )
        yield first
        if first.finish_reason is not None:
            return  # never committed: the `finally` frees the reservation
        stream = decode.options(stream=True).decode.remote(
            request.request_id, result.first_token_id, result.first_logprob, **pinned
        )
        async for out in _stream(stream):  # type: ignore[arg-type]
            yield out
        is_done = True
    finally:
        if not is_done:
            with anyio.CancelScope(shield=True):  # runs even when the client's request was cancelled
                await _abort(decode, request.request_id, pinned)


async def _reserve(request: EngineRequest, decode: DeploymentHandle, route: RouteDecision | None) -> Reservation | None:
    """Reserve on the chosen decode replica, or on the runner-up when the chosen one has no room."""
    targets = route.decode_ranking[:2] if route is not None else (None,)
    for target in targets:
        reservation: Reservation | None = await decode.reserve.remote(request, target_replica_id=target)
        if reservation is not None:
            return reservation
    return None


async def _abort(decode: DeploymentHandle, request_id: str, pinned: dict[str, str]) -> None:
    """Free the reservation now rather than at lease expiry; never raises (it runs in `finally`)."""
    try:
        await asyncio.wait_for(decode.abort.remote(request_id, **pinned), _ABORT_TIMEOUT_S)
    except Exception:
        logger.warning("abort of %s on decode replica %s failed; its lease frees it", request_id, pinned)


async def colocated_generate(request: EngineRequest, engine: DeploymentHandle) -> AsyncIterator[RequestOutput]:
    async for out in _stream(engine.options(stream=True).generate.remote(request)):  # type: ignore[arg-type]
        yield out


async def _stream(stream: DeploymentResponseGenerator[RequestOutput]) -> AsyncIterator[RequestOutput]:
    """Relay a replica's output stream; if we stop early, cancel it (the replica then aborts the request)."""
    is_done = False
    try:
        async for out in stream:
            is_done = out.finish_reason is not None
            yield out
    finally:
        if not is_done:
            stream.cancel()
