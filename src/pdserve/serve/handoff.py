"""The prefill -> decode handoff (DESIGN.md §4), as one linear async function.

reserve on a decode replica -> prefill (which pushes only the blocks the decode replica lacks) -> commit and stream
from the same decode replica; or, when the router chose local mode, the decode replica prefills and decodes alone.

Ownership under cancellation. Starlette and Serve cancel with a plain `task.cancel()`, which reaches any `await`, so
the part that allocates — reserve, then prefill into the reservation — runs as a task of its own
(`_reserve_and_prefill`, outside the request's context, so Serve's child-call cancellation skips it too) that the
client's cancellation never reaches: the client going away only signals, and the
task's done-callback frees the reservation once the prefill call has ended, when no writer can touch it any more.
Whoever allocates releases, on every path: the task itself when reserve or prefill fails (fenced: a writer may be
mid-layer), the stream's end or an explicit abort afterwards. The decode replica's lease (renewed
while the prefill works) and its write fence are the backstop, not the mechanism.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

from ray.exceptions import ActorDiedError, RayTaskError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from pdserve.api.backend import CapacityError
from pdserve.engine import EngineRequest, FinishReason, InvalidRequestError, RequestOutput
from pdserve.router import RouteDecision, RouteMode
from pdserve.serve.messages import PrefillResult, Reservation

logger = logging.getLogger(__name__)
_ABORT_TIMEOUT_S = 10.0
_CALL_TIMEOUT_S = 30.0
_FIRST_BACKOFF_S, _MAX_BACKOFF_S = (
    0.02,
    0.5,
)  # waiting for decode room  # reserve and renew on a decode replica that does not answer
_background: set[asyncio.Task[Any]] = set()  # cleanup tasks: referenced until they end


class ClientGone(Exception):
    """The client left before the handoff started its prefill: it stopped there, holding nothing."""


@dataclass
class HandoffCounters:
    prefill_retries: int = 0  # prefills retried on another replica after the first one failed
    migrations: int = 0  # streams moved to another decode replica after theirs failed


counters = HandoffCounters()  # per ingress process (each ingress replica counts its own)


async def disaggregated_generate(
    request: EngineRequest,
    prefill: DeploymentHandle,
    decode: DeploymentHandle,
    route: RouteDecision | None,
    queue_ttl_s: float = 20.0,
    max_migrations: int = 1,
) -> AsyncIterator[RequestOutput]:
    """Stream `request`'s outputs through the pair `route` chose (None: Serve picks the replicas). If the decode
    replica fails mid-stream, a greedy or seeded request migrates (up to `max_migrations` times): prompt + the
    tokens already streamed are prefilled for another decode replica, which continues exactly where the stream
    stopped; other requests end with the error."""
    streamed: list[int] = []
    attempt, where = request, _Where()
    for migration in itertools.count():
        try:
            async for out in _handoff(attempt, prefill, decode, route, where, queue_ttl_s):
                streamed.extend(out.new_token_ids)
                yield out if attempt is request else _as_original(out, request)
            return
        except Exception as e:
            if not (streamed and migration < max_migrations and _can_migrate(request, e)):
                raise
            logger.warning(
                "decode replica %s failed mid-stream (%r); migrating %s", where.decode, e, request.request_id
            )
        counters.migrations += 1
        attempt = _continuation(request, streamed, migration + 1)
        route = _without(route, where.decode, attempt.request_id)


async def _handoff(
    request: EngineRequest,
    prefill: DeploymentHandle,
    decode: DeploymentHandle,
    route: RouteDecision | None,
    where: _Where,
    queue_ttl_s: float,
) -> AsyncIterator[RequestOutput]:
    """One reserve -> prefill -> decode (or local) pass; `where.decode` names the decode replica it streams from."""
    where.decode = route.decode_replica_id if route is not None else None
    if route is not None and route.mode is RouteMode.LOCAL:  # the decode replica lacks few tokens: it prefills
        local = decode.options(stream=True).generate.remote(request, target_replica_id=route.decode_replica_id)
        async for out in _stream(local):  # type: ignore[arg-type]
            yield out
        return
    client_gone = asyncio.Event()  # the one signal a departing client sends: the handoff stops at its next step
    handoff = _detached(_reserve_and_prefill(request, prefill, decode, route, queue_ttl_s, client_gone))
    _background.add(handoff)  # referenced until done, whoever still awaits it
    handoff.add_done_callback(_background.discard)
    try:
        reservation, result = await asyncio.shield(handoff)
    except asyncio.CancelledError:  # the client left: the handoff goes on, and frees the reservation when done
        client_gone.set()
        handoff.add_done_callback(partial(_abort_when_done, decode, request.request_id))
        raise
    pinned = {"target_replica_id": reservation.replica_id}
    where.decode = reservation.replica_id
    is_done = False
    try:
        first = _first_output(request, result)
        yield first
        if first.finish_reason is not None:
            return  # never committed: the `finally` frees the reservation
        stream = decode.options(stream=True).decode.remote(
            request.request_id, result.first_token_id, result.first_logprob, request.traceparent, **pinned
        )
        async for out in _stream(stream):  # type: ignore[arg-type]
            yield out
        is_done = True
    finally:
        if not is_done:  # client gone or stream failed; the prefill is over, so no writer is left: free at once
            _spawn(_abort(decode, request.request_id, pinned, may_be_written=False))


@dataclass
class _Where:
    decode: str | None = None  # the decode replica of the current pass (None: Serve's pick, unknown)


def _can_migrate(request: EngineRequest, error: Exception) -> bool:
    """A replica fault (not the client's input, not capacity) on a request whose continuation is reproducible."""
    is_reproducible = request.sampling.is_greedy or request.sampling.seed is not None
    return is_reproducible and not isinstance(error, InvalidRequestError | CapacityError)


def _continuation(request: EngineRequest, streamed: list[int], migration: int) -> EngineRequest:
    """The rest of `request` after `streamed` tokens: they join the prompt, the limits shrink by their count."""
    params = request.sampling
    sampling = replace(
        params,
        max_tokens=params.max_tokens - len(streamed),
        min_tokens=max(0, params.min_tokens - len(streamed)),
        seed_offset=params.seed_offset + len(streamed),
    )
    prompt = (*request.prompt_token_ids, *streamed)
    return replace(request, request_id=f"{request.request_id}.m{migration}", prompt_token_ids=prompt, sampling=sampling)


def _as_original(out: RequestOutput, request: EngineRequest) -> RequestOutput:
    """A continuation's output as the original request's (its id and prompt size)."""
    return replace(out, request_id=request.request_id, num_prompt_tokens=len(request.prompt_token_ids))


def _without(route: RouteDecision | None, failed: str | None, request_id: str) -> RouteDecision | None:
    """The route for a continuation: the same prefill replica, the next decode replica that did not fail."""
    if route is None:
        return None
    ranking = tuple(r for r in route.decode_ranking if r != failed)
    if not ranking:
        return None
    mode = RouteMode.DISAGGREGATED
    return replace(route, request_id=request_id, mode=mode, decode_replica_id=ranking[0], decode_ranking=ranking)


async def _reserve_and_prefill(
    request: EngineRequest,
    prefill: DeploymentHandle,
    decode: DeploymentHandle,
    route: RouteDecision | None,
    queue_ttl_s: float,
    client_gone: asyncio.Event,
) -> tuple[Reservation, PrefillResult]:
    """Reserve on D, prefill on P into the reservation. On failure, D's reservation is freed (or fenced) here. A
    client gone before the prefill starts stops it there (its reservation freed: no writer ever saw it)."""
    reservation = await _reserve_within(request, decode, route, queue_ttl_s, client_gone)
    pinned = {"target_replica_id": reservation.replica_id}
    if client_gone.is_set():
        _spawn(_abort(decode, request.request_id, pinned, may_be_written=False))
        raise ClientGone(request.request_id)
    try:
        result = await _prefill_with_retry(request, prefill, decode, route, reservation)
    except BaseException as e:
        # P stopped writing if its method raised or it died; a layer its push already sent may still land through
        # D's receiver, so the blocks wait a grace period. If the call was lost instead, they wait out the lease.
        is_stopped = isinstance(e, RayTaskError | ActorDiedError)
        _spawn(_abort(decode, request.request_id, pinned, may_be_written=True, is_writer_stopped=is_stopped))
        raise
    return reservation, result


async def _prefill_with_retry(
    request: EngineRequest,
    prefill: DeploymentHandle,
    decode: DeploymentHandle,
    route: RouteDecision | None,
    reservation: Reservation,
) -> PrefillResult:
    """Prefill on the chosen replica; if it fails for a reason of its own (died, wedged, a failed transfer), once
    more on the next-best prefill replica (prefill is idempotent: a retry writes the same KV under the same epoch
    into the same reserved blocks). A client error is not retried."""
    first = route.prefill_replica_id if route is not None else None
    try:
        return await _renewing(
            prefill.prefill.remote(request, reservation, target_replica_id=first), decode, reservation
        )
    except (asyncio.CancelledError, InvalidRequestError):
        raise
    except Exception as e:
        logger.warning("prefill of %s failed on %s (%r); retrying once elsewhere", request.request_id, first, e)
    counters.prefill_retries += 1
    retry = _runner_up(route, first)
    return await _renewing(prefill.prefill.remote(request, reservation, target_replica_id=retry), decode, reservation)


def _runner_up(route: RouteDecision | None, failed: str | None) -> str | None:
    """The best other prefill replica the router knew of; None lets Serve pick."""
    if route is None:
        return None
    others = sorted((c for c in route.prefill_candidates if c.replica_id != failed), key=lambda c: c.total_s)
    return others[0].replica_id if others else None


async def _renewing(call: Any, decode: DeploymentHandle, reservation: Reservation) -> PrefillResult:
    """Await the prefill call, renewing the reservation's lease on D while it runs (a long queue on P)."""
    task: asyncio.Future[PrefillResult] = asyncio.ensure_future(_awaited(call))
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=reservation.lease_s / 3)
            if done:
                return task.result()
            await _renew(decode, reservation)
    finally:
        if not task.done():
            task.cancel()
            call.cancel()


async def _renew(decode: DeploymentHandle, reservation: Reservation) -> None:
    """Extend the lease; a failure is logged, never fatal: the prefill's own outcome decides the handoff."""
    pinned = {"target_replica_id": reservation.replica_id}
    try:
        is_open = await asyncio.wait_for(decode.renew.remote(reservation.request_id, **pinned), _CALL_TIMEOUT_S)
    except Exception:
        logger.warning("renewing reservation %s failed", reservation.request_id, exc_info=True)
        return
    if not is_open:
        logger.warning("reservation %s was revoked while its prefill ran", reservation.request_id)


async def _awaited(call: Any) -> Any:
    return await call


async def _reserve_within(
    request: EngineRequest,
    decode: DeploymentHandle,
    route: RouteDecision | None,
    queue_ttl_s: float,
    client_gone: asyncio.Event,
) -> Reservation:
    """A reservation, waiting for decode room up to `queue_ttl_s` (as a colocated request waits in its engine's
    queue); CapacityError after that, ClientGone once nobody waits for it."""
    deadline = time.monotonic() + queue_ttl_s
    backoff_s = _FIRST_BACKOFF_S
    while (reservation := await _reserve(request, decode, route)) is None:
        if client_gone.is_set():
            raise ClientGone(request.request_id)
        if time.monotonic() + backoff_s > deadline:
            raise CapacityError("no decode replica has had room for this request; retry later", retry_after_s=1.0)
        await asyncio.sleep(backoff_s)
        backoff_s = min(2 * backoff_s, _MAX_BACKOFF_S)
    return reservation


async def _reserve(request: EngineRequest, decode: DeploymentHandle, route: RouteDecision | None) -> Reservation | None:
    """Reserve on the chosen decode replica, or on the runner-up when the chosen one has no room; None when neither
    has. A target that fails (gone, draining, dead: the router's view lags Serve's) is skipped, and then — or
    without a route — Serve picks among its live replicas; that last attempt's failure propagates."""

    async def on(target: str | None) -> Reservation | None:
        call = decode.reserve.remote(request, target_replica_id=target)
        return await asyncio.wait_for(call, _CALL_TIMEOUT_S)  # a late reservation: its lease ends it

    targets = route.decode_ranking[:2] if route is not None else ()
    has_failed = False
    for target in targets:
        try:
            if (reservation := await on(target)) is not None:
                return reservation
        except InvalidRequestError:
            raise
        except Exception as e:
            logger.warning("reserving %s on decode replica %s failed: %r", request.request_id, target, e)
            has_failed = True
    if targets and not has_failed:
        return None  # no room on the targets: the caller waits rather than spill to a replica the router avoided
    return await on(None)


def _first_output(request: EngineRequest, result: PrefillResult) -> RequestOutput:
    return RequestOutput(
        request.request_id,
        [result.first_token_id],
        None if result.first_logprob is None else [result.first_logprob],
        FinishReason(result.finish_reason) if result.finish_reason else None,
        result.num_prompt_tokens,
        result.num_cached_tokens,  # the prefill replica's hit: prompt tokens nobody recomputed
        queue_s=result.queue_s,
    )


def _abort_when_done(decode: DeploymentHandle, request_id: str, handoff: asyncio.Future[Any]) -> None:
    """The handoff ended after its client left: free the reservation it made (a failed one freed it already)."""
    if handoff.cancelled():
        return
    if (error := handoff.exception()) is not None:  # it freed what it held; nobody is left to tell
        logger.info("handoff of %s failed after its client left: %r", request_id, error)
        return
    reservation: Reservation = handoff.result()[0]
    _spawn(_abort(decode, request_id, {"target_replica_id": reservation.replica_id}, may_be_written=False))


async def _abort(
    decode: DeploymentHandle,
    request_id: str,
    pinned: dict[str, str],
    may_be_written: bool,
    is_writer_stopped: bool = True,
) -> None:
    """Free the reservation now rather than at lease expiry; never raises (it runs detached)."""
    try:
        call = decode.abort.remote(request_id, may_be_written, is_writer_stopped, **pinned)
        await asyncio.wait_for(call, _ABORT_TIMEOUT_S)
    except Exception:
        logger.warning("abort of %s on decode replica %s failed; its lease frees it", request_id, pinned, exc_info=True)


def _spawn(coro: Any) -> None:
    task = _detached(coro)
    _background.add(task)
    task.add_done_callback(_background.discard)


def _detached(coro: Any) -> asyncio.Task[Any]:
    """A task outside the client request's context. Serve cancels every call made in a request's context when its
    client disconnects (child-call cancellation): the handoff's reserve, prefill and aborts must not be among
    them. The trace context travels explicitly (`traceparent`), so nothing else of that context is needed."""
    return contextvars.Context().run(asyncio.ensure_future, coro)


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
