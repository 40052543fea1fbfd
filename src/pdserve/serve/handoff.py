"""The prefill -> decode handoff (DESIGN.md §4), as one linear async function.

reserve on a decode replica -> prefill (which pushes only the blocks the decode replica lacks) -> commit and stream
from the same decode replica. Whatever happens after the reservation, it is released exactly once: by the
stream's end, by commit failure, or by an explicit abort (client gone, prefill failed).

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
from pdserve.serve.messages import PrefillResult, Reservation

logger = logging.getLogger(__name__)
_ABORT_TIMEOUT_S = 5.0


async def disaggregated_generate(
    request: EngineRequest, prefill: DeploymentHandle, decode: DeploymentHandle
) -> AsyncIterator[RequestOutput]:
    with anyio.CancelScope(shield=True):
        reservation: Reservation | None = await decode.reserve.remote(request)
    if reservation is None:
        raise CapacityError("no decode replica has room for this request now", retry_after_s=1.0)
    pinned = {"target_replica_id": reservation.replica_id}
    is_done = False
    try:
        with anyio.CancelScope(shield=True):
            result: PrefillResult = await prefill.prefill.remote(request, reservation)
        first = RequestOutput(
            request.request_id,
            [result.first_token_id],
            None if result.first_logprob is None else [result.first_logprob],
            FinishReason(result.finish_reason) if result.finish_reason else None,
            result.num_prompt_tokens,
            max(result.num_cached_tokens, reservation.num_cached_tokens),
        )
        yield first
        if first.finish_reason is not None:
            return
        stream: DeploymentResponseGenerator[RequestOutput] = decode.options(stream=True).decode.remote(  # type: ignore[assignment]
            request.request_id, result.first_token_id, result.first_logprob, **pinned
        )
        try:
            async for out in stream:
                is_done = out.finish_reason is not None
                yield out
            is_done = True
        finally:
            if not is_done:
                stream.cancel()
    finally:
        if not is_done:
            with anyio.CancelScope(shield=True):  # runs even when the client's request was cancelled
                await _abort(decode, request.request_id, pinned)


async def _abort(decode: DeploymentHandle, request_id: str, pinned: dict[str, str]) -> None:
    """Free the reservation now rather than at lease expiry; never raises (it runs in `finally`)."""
    try:
        await asyncio.wait_for(decode.abort.remote(request_id, **pinned), _ABORT_TIMEOUT_S)
    except Exception:
        logger.warning("abort of %s on decode replica %s failed; its lease frees it", request_id, pinned)


async def colocated_generate(request: EngineRequest, engine: DeploymentHandle) -> AsyncIterator[RequestOutput]:
    stream: DeploymentResponseGenerator[RequestOutput] = engine.options(stream=True).generate.remote(request)  # type: ignore[assignment]
    is_done = False
    try:
        async for out in stream:
            is_done = out.finish_reason is not None
            yield out
    finally:
        if not is_done:
            stream.cancel()  # the replica's generator is cancelled and aborts the request
