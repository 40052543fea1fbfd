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

Faults (failover.py decides): a failed prefill is retried once on another prefill replica, then prefilled on the
reserved decode replica itself; a handoff failing before the client's first token is retried once elsewhere; a decode
replica failing mid-stream moves greedy and seeded streams to another one.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import logging
import time
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

from ray.exceptions import ActorDiedError, RayTaskError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from pdserve.api.backend import CapacityError
from pdserve.engine import EngineRequest, FinishReason, InvalidRequestError, RequestOutput
from pdserve.router import RouteDecision, RouteMode
from pdserve.serve.channels import IngressChannels
from pdserve.serve.failover import (
    BrokenReplicas,
    Failover,
    ReplicaCancelled,
    as_original,
    cheapest_prefill,
    continuation,
    counters,
    foreign_cancel_as_fault,
    is_own_fault,
    is_server_fault,
    without,
)
from pdserve.serve.messages import PrefillResult, Reservation
from pdserve.serve.routing import AVOID_REPLICAS_KWARG

logger = logging.getLogger(__name__)
_ABORT_TIMEOUT_S = 10.0
_CALL_TIMEOUT_S = 30.0  # reserve and renew on a decode replica that does not answer
_FIRST_BACKOFF_S, _MAX_BACKOFF_S = 0.02, 0.5  # waiting for decode room
_background: set[asyncio.Task[Any]] = set()  # cleanup tasks: referenced until they end


class ClientGone(Exception):
    """The client left before the handoff started its prefill: it stopped there, holding nothing."""


class PrefillFailed(Exception):
    """Every prefill attempt failed; the reservation on `decode_replica_id` was freed (fenced)."""

    def __init__(self, request_id: str, decode_replica_id: str) -> None:
        super().__init__(f"no prefill replica could prefill {request_id}")
        self.decode_replica_id = decode_replica_id


async def disaggregated_generate(
    request: EngineRequest,
    prefill: DeploymentHandle,
    decode: DeploymentHandle,
    route: RouteDecision | None,
    queue_ttl_s: float = 20.0,
    max_migrations: int = 1,
    prefill_timeout_s: float = 60.0,
    channels: IngressChannels | None = None,
    abandoned: list[asyncio.Task[Any]] | None = None,
    moved: Callable[..., None] | None = None,
) -> AsyncGenerator[RequestOutput, None]:
    """Stream `request`'s outputs through the pair `route` chose (None: Serve picks the replicas). A handoff that
    fails before the first token is retried once elsewhere; a decode replica failing mid-stream moves a greedy or
    seeded stream to another one (up to `max_migrations` times) — see failover.py. `channels`: the decode
    replicas' outputs travel on this ingress's output channels (channels.py); None: on each request's call.
    `abandoned`: where a client leaving mid-handoff leaves the handoff's task, which runs on (a prefill under way
    finishes on its replica) until it frees the reservation: the caller's load accounting follows it. `moved`: told
    (`decode_replica_id=`, `computing_replica_id=`) when the work goes elsewhere than `route` said — a reservation
    on the runner-up or a migrated stream's replica, a prefill retried on the runner-up or done on D — so the
    router's load view follows it (`Router.move`)."""
    streamed: list[int] = []
    where = _Where(abandoned if abandoned is not None else [], moved or _unheard)
    attempt = request
    failover = Failover(max_migrations)
    for number in itertools.count(1):
        try:
            passes = _handoff(attempt, prefill, decode, route, where, queue_ttl_s, prefill_timeout_s, channels)
            async with aclosing(passes):  # closed when this is: never left to the garbage collector
                async for out in passes:
                    streamed.extend(out.new_token_ids)
                    yield out if attempt is request else as_original(out, request)
                    if out.finish_reason is not None:  # done: a replica failing after this is no stream's concern
                        return
            return
        except Exception as e:
            if (action := failover.action(request, streamed, e)) is None:
                raise
            logger.warning("%s failed on decode replica %s (%r); %s", request.request_id, where.decode, e, action)
        attempt = continuation(request, streamed, number)
        route = without(route, where.decode, attempt.request_id, frozenset(where.failed_prefills))


async def _handoff(
    request: EngineRequest,
    prefill: DeploymentHandle,
    decode: DeploymentHandle,
    route: RouteDecision | None,
    where: _Where,
    queue_ttl_s: float,
    prefill_timeout_s: float,
    channels: IngressChannels | None,
) -> AsyncGenerator[RequestOutput, None]:
    """One reserve -> prefill -> decode (or local) pass; `where.decode` names the decode replica it streams from."""
    where.decode = route.decode_replica_id if route is not None else None
    if route is not None and route.mode is RouteMode.LOCAL:  # the decode replica lacks few tokens: it prefills
        where.moved(decode_replica_id=route.decode_replica_id, computing_replica_id=route.decode_replica_id)
        async with aclosing(_local(request, decode, route.decode_replica_id, channels)) as outputs:
            async for out in outputs:
                yield out
        return
    client_gone = asyncio.Event()  # the one signal a departing client sends: the handoff stops at its next step
    writer = _Writers()
    prefilled = _reserve_and_prefill(
        request, prefill, decode, route, queue_ttl_s, prefill_timeout_s, client_gone, writer, where.moved,
        where.failed_prefills,
    )  # fmt: skip
    handoff = _detached(prefilled)
    _background.add(handoff)  # referenced until done, whoever still awaits it
    handoff.add_done_callback(_background.discard)
    try:
        reservation, result = await asyncio.shield(handoff)
    except asyncio.CancelledError:  # the client left: the handoff goes on, and frees the reservation when done
        client_gone.set()
        handoff.add_done_callback(partial(_abort_when_done, decode, request.request_id, writer))
        where.abandoned.append(handoff)
        task = asyncio.current_task()
        if task is not None and task.cancelling() == 0:  # not us: the handoff's own task was cancelled
            raise ReplicaCancelled(f"the handoff of {request.request_id} was cancelled") from None
        raise
    except PrefillFailed as e:  # no prefill replica works: the decode replica prefills the prompt itself
        counters.local_fallbacks += 1
        where.decode = e.decode_replica_id
        where.moved(computing_replica_id=e.decode_replica_id)
        logger.warning("%r; prefilling %s on its decode replica %s", e, request.request_id, e.decode_replica_id)
        local = replace(request, request_id=f"{request.request_id}.local")  # not the id its reservation's abort ends
        async with aclosing(_local(local, decode, e.decode_replica_id, channels)) as outputs:
            async for out in outputs:
                yield as_original(out, request)
        return
    pinned = {"target_replica_id": reservation.replica_id}
    where.decode = reservation.replica_id
    is_done = False
    try:
        first = _first_output(request, result)
        if first.finish_reason is not None:
            yield first
            return  # never committed: the `finally` frees the reservation
        channel = {} if channels is None else {"channel_id": channels.channel_id}
        call = decode.options(stream=True).decode.remote(
            request.request_id, result.first_token_id, result.first_logprob, request.traceparent, **pinned, **channel,
            **writer.fence(),
        )  # fmt: skip
        # The first token waits for the decode call's acknowledgement (one hop, not an engine step): a call that
        # cannot reach its replica — dead, or leaving the pool — then fails a request that has shown nothing, which
        # any request may retry elsewhere.
        async with aclosing(_outputs(call, decode, request.request_id, channels, yield_start=True)) as outputs:
            await anext(outputs)
            yield first
            async for out in outputs:
                is_done = out.finish_reason is not None  # the consumer closes us there: D has freed it already
                yield out
        is_done = True
    finally:
        if not is_done:  # client gone or stream failed: free at once unless an abandoned attempt may still write
            _spawn(_abort(decode, request.request_id, pinned, **writer.fence()))


async def _local(
    request: EngineRequest, decode: DeploymentHandle, replica_id: str, channels: IngressChannels | None
) -> AsyncGenerator[RequestOutput, None]:
    """Prefill and decode on one decode replica (its `generate`)."""
    async with aclosing(_generate(request, decode, channels, target_replica_id=replica_id)) as outputs:
        async for out in outputs:
            yield out


def _generate(
    request: EngineRequest, handle: DeploymentHandle, channels: IngressChannels | None, **routing: Any
) -> AsyncGenerator[RequestOutput, None]:
    channel = {} if channels is None else {"channel_id": channels.channel_id}
    call = handle.options(stream=True).generate.remote(request, **routing, **channel)
    return _outputs(call, handle, request.request_id, channels)


def _outputs(
    call: Any, handle: DeploymentHandle, request_id: str, channels: IngressChannels | None, yield_start: bool = False
) -> AsyncGenerator[RequestOutput, None]:
    """A streaming call's outputs: relayed from the call itself, or gathered from the output channels."""
    if channels is None:
        return _stream(call)
    return channels.stream(handle, call, request_id, yield_start=yield_start)


@dataclass
class _Where:
    abandoned: list[asyncio.Task[Any]]  # handoffs left running by a client that left (`disaggregated_generate`)
    moved: Callable[..., None]  # tells the router where the work went (`disaggregated_generate`)
    decode: str | None = None  # the decode replica of the current pass (None: Serve's pick, unknown)
    failed_prefills: set[str] = field(default_factory=set)  # prefill replicas that failed on their own


async def _reserve_and_prefill(
    request: EngineRequest,
    prefill: DeploymentHandle,
    decode: DeploymentHandle,
    route: RouteDecision | None,
    queue_ttl_s: float,
    prefill_timeout_s: float,
    client_gone: asyncio.Event,
    writer: _Writers,
    moved: Callable[..., None],
    failed_prefills: set[str],
) -> tuple[Reservation, PrefillResult]:
    """Reserve on D, prefill on P into the reservation. On failure, D's reservation is freed (or fenced) here, and
    a server fault raises PrefillFailed (the caller falls back to D). A client gone before the prefill starts stops
    it there (its reservation freed: no writer ever saw it), and one gone before a retry stops it there."""
    reservation = await _reserve_within(request, decode, route, queue_ttl_s, client_gone)
    moved(decode_replica_id=reservation.replica_id)
    pinned = {"target_replica_id": reservation.replica_id}
    if client_gone.is_set():
        _spawn(_abort(decode, request.request_id, pinned, may_be_written=False))
        raise ClientGone(request.request_id)
    try:
        result = await _prefill_with_retry(
            request, prefill, decode, route, reservation, prefill_timeout_s, writer, moved, failed_prefills, client_gone
        )
    except BaseException as e:
        # P stopped writing if its method raised or it died; a layer its push already sent may still land through
        # D's receiver, so the blocks wait a grace period. If the call was lost instead, they wait out the lease.
        if not isinstance(e, ClientGone):  # (raised before a retry: the failed attempt is the writer's already)
            writer.abandon(e)
        _spawn(_abort(decode, request.request_id, pinned, **writer.fence()))
        if is_server_fault(e) and not client_gone.is_set():
            raise PrefillFailed(request.request_id, reservation.replica_id) from e
        raise
    return reservation, result


async def _prefill_with_retry(
    request: EngineRequest,
    prefill: DeploymentHandle,
    decode: DeploymentHandle,
    route: RouteDecision | None,
    reservation: Reservation,
    timeout_s: float,
    writer: _Writers,
    moved: Callable[..., None],
    failed_prefills: set[str],
    client_gone: asyncio.Event,
) -> PrefillResult:
    """Prefill on the chosen replica; if it fails for a reason of its own (died, wedged, a failed transfer, no
    answer within `timeout_s`) and the client still waits (else ClientGone), once more on the next-best prefill
    replica (prefill is idempotent: a retry writes
    the same KV under the same epoch into the same reserved blocks; the transfer is named by the reservation, so the
    retry's engine id may differ). A client error is not retried. `writer` learns what the first attempt may still
    write: it is not waited for, so whatever frees the reservation's blocks later must fence them.
    `failed_prefills` learns the targets that failed on their own (`is_own_fault`), for a later pass to avoid."""
    first = route.prefill_replica_id if route is not None else None
    if first is not None:  # (a retry's pass may prefill elsewhere than the request was routed: `without`)
        moved(computing_replica_id=first)
    try:
        call = prefill.prefill.remote(request, reservation, target_replica_id=first)
        with foreign_cancel_as_fault(f"the prefill of {request.request_id}"):
            return await _renewing(call, decode, reservation, timeout_s)
    except Exception as e:
        if not is_server_fault(e):
            raise
        if first is not None and is_own_fault(e):
            failed_prefills.add(first)
        writer.abandon(e)
        if client_gone.is_set():  # nobody waits for the retry's tokens
            raise ClientGone(request.request_id) from e
        logger.warning("prefill of %s failed on %s (%r); retrying once elsewhere", request.request_id, first, e)
    counters.prefill_retries += 1
    # Under an engine id of its own: the first attempt may still be ending on the same replica (Serve's pick, or the
    # only one: a cancelled call whose push is finishing), where the same id would be refused as in use.
    again = replace(request, request_id=f"{request.request_id}.p1")
    if (runner_up := cheapest_prefill(route, {first} | failed_prefills)) is not None:
        moved(computing_replica_id=runner_up)
    retry = prefill.prefill.remote(again, reservation, target_replica_id=runner_up)
    try:
        with foreign_cancel_as_fault(f"the prefill of {again.request_id}"):
            return await _renewing(retry, decode, reservation, timeout_s)
    except Exception as e:
        if runner_up is not None and is_own_fault(e):
            failed_prefills.add(runner_up)
        raise


@dataclass
class _Writers:
    """What the prefill attempts of one reservation may still write once the handoff moves on: nothing (the
    attempt that succeeded has ended its push), or a layer from an attempt abandoned for a retry — one that raised
    or died stopped writing, though a layer it sent may still land within the grace period (`is_stopped`); one
    that timed out was cancelled without waiting, and may write until its permits' deadline."""

    is_abandoned: bool = False
    is_stopped: bool = True

    def abandon(self, error: BaseException) -> None:
        self.is_abandoned = True
        self.is_stopped = self.is_stopped and _has_stopped(error)

    def fence(self) -> dict[str, bool]:
        """The flags of a commit or abort of the reservation (`LLMEngine.commit`, `LLMEngine.abort`)."""
        return {"may_be_written": self.is_abandoned, "is_writer_stopped": self.is_stopped}


def _unheard(**_: str) -> None:
    """Nobody follows where the work goes (no router)."""


def _has_stopped(error: BaseException) -> bool:
    """Whether a prefill call's error says its push has ended: its method raised (the push ends before the method
    returns or raises) or its replica died; a timeout or a lost call says nothing."""
    return isinstance(error, RayTaskError | ActorDiedError)


async def _renewing(call: Any, decode: DeploymentHandle, reservation: Reservation, timeout_s: float) -> PrefillResult:
    """Await the prefill call, renewing the reservation's lease on D while it runs (a long queue on P); TimeoutError
    (the call cancelled) after `timeout_s`. A renewal runs beside the wait, never in its way: a slow one (up to
    `_CALL_TIMEOUT_S`) neither hides the prefill's end nor stretches its timeout."""
    task: asyncio.Future[PrefillResult] = asyncio.ensure_future(_awaited(call))
    deadline = time.monotonic() + timeout_s
    renewal: asyncio.Task[None] | None = None
    try:
        while (left_s := deadline - time.monotonic()) > 0:
            done, _ = await asyncio.wait({task}, timeout=min(left_s, reservation.lease_s / 3))
            if done:
                return task.result()
            if time.monotonic() < deadline and (renewal is None or renewal.done()):
                renewal = asyncio.ensure_future(_renew(decode, reservation))
                _background.add(renewal)  # it may outlive this call: referenced until it ends (it logs its failure)
                renewal.add_done_callback(_background.discard)
        raise TimeoutError(f"prefill of {reservation.request_id} took over {timeout_s:.0f} s")
    finally:
        if not task.done():
            task.cancel()
            call.cancel()


async def _renew(decode: DeploymentHandle, reservation: Reservation) -> None:
    """Extend the lease; a failure is logged, never fatal: the prefill's own outcome decides the handoff."""
    pinned = {"target_replica_id": reservation.replica_id}
    try:
        with foreign_cancel_as_fault(f"renewing reservation {reservation.request_id}"):  # not the prefill's cancel
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
    failed: set[str] = set()  # targets that failed a call: not tried again for this request
    number = 0  # rounds so far
    while (reservation := await _reserve(request, decode, route, deadline, failed, number)) is None:
        if client_gone.is_set():
            raise ClientGone(request.request_id)
        if time.monotonic() + backoff_s > deadline:
            raise CapacityError("no decode replica has had room for this request; retry later", retry_after_s=1.0)
        await asyncio.sleep(backoff_s)
        if client_gone.is_set():  # gone during the backoff: no more rounds of reserve calls
            raise ClientGone(request.request_id)
        backoff_s = min(2 * backoff_s, _MAX_BACKOFF_S)
        number += 1
    return reservation


async def _reserve(
    request: EngineRequest,
    decode: DeploymentHandle,
    route: RouteDecision | None,
    deadline: float,
    failed: set[str],
    number: int = 0,
) -> Reservation | None:
    """Reserve on the chosen decode replica, or on the runner-up when the chosen one has no room; None when neither
    has. Round `number` > 0 (after rounds without room) also asks one more replica of the route's ranking, in turn:
    the ranking is the router's view when the request arrived, and with 3+ decode replicas a request waited out its
    queue_ttl_s for the first two while a third had room (found in review); one more per round keeps the calls of
    many waiting requests bounded. A target that fails (gone, draining, dead: the router's view lags Serve's) is
    skipped, now and in later rounds (`failed`), and then — or without a route — Serve picks among its live
    replicas; that pick's failure propagates only when no ranked replica is left to wait for. No call waits past
    `deadline` (the request's queue_ttl_s) by more than a second."""

    async def on(target: str | None) -> Reservation | None:
        call = decode.reserve.remote(request, target_replica_id=target)
        timeout_s = min(_CALL_TIMEOUT_S, max(1.0, deadline - time.monotonic()))
        reply: asyncio.Future[Reservation | None] = asyncio.ensure_future(_awaited(call))
        try:
            with foreign_cancel_as_fault(f"reserving for {request.request_id}"):  # else taken for the client leaving
                return await asyncio.wait_for(asyncio.shield(reply), timeout_s)
        except BaseException:
            # Given up (timed out, say): Serve does not cancel a replica's call when its waiter stops waiting. Cancel
            # it (a reserve cancelled there undoes itself), and free a reservation granted anyway once it arrives:
            # nobody else knows of it, and its lease would hold the blocks for a minute.
            call.cancel()
            reply.add_done_callback(partial(_abort_unused, decode))
            raise

    ranking = route.decode_ranking if route is not None else ()
    ranked = list(ranking[:2])
    if number > 0 and len(ranking) > 2:
        ranked.append(ranking[2 + (number - 1) % (len(ranking) - 2)])
    targets = [t for t in ranked if t not in failed]
    has_failed = bool(set(ranked) & failed)
    for target in targets:
        try:
            if (reservation := await on(target)) is not None:
                return reservation
        except InvalidRequestError:
            raise
        except Exception as e:
            logger.warning("reserving %s on decode replica %s failed: %r", request.request_id, target, e)
            failed.add(target)
            has_failed = True
    if targets and not has_failed:
        return None  # no room on the targets: the caller waits (and asks one more next round), never a blind pick
    try:
        return await on(None)
    except InvalidRequestError:
        raise
    except Exception as e:
        if not set(ranking) - failed:  # no ranked replica left to wait for: the request fails (or is retried)
            raise
        logger.warning("reserving %s on Serve's pick failed: %r; waiting for the ranked ones", request.request_id, e)
        return None


def _first_output(request: EngineRequest, result: PrefillResult) -> RequestOutput:
    return RequestOutput(
        request.request_id,
        [result.first_token_id],
        None if result.first_logprob is None else [result.first_logprob],
        FinishReason(result.finish_reason) if result.finish_reason else None,
        result.num_prompt_tokens,
        result.num_cached_tokens,  # the prefill replica's hit: prompt tokens nobody recomputed
        queue_s=result.queue_s,
        prompt_logprobs=result.prompt_logprobs,
    )


def _abort_when_done(decode: DeploymentHandle, request_id: str, writer: _Writers, handoff: asyncio.Future[Any]) -> None:
    """The handoff ended after its client left: free the reservation it made (a failed one freed it already)."""
    if handoff.cancelled():
        return
    if (error := handoff.exception()) is not None:  # it freed what it held; nobody is left to tell
        logger.info("handoff of %s failed after its client left: %r", request_id, error)
        return
    reservation: Reservation = handoff.result()[0]
    _spawn(_abort(decode, request_id, {"target_replica_id": reservation.replica_id}, **writer.fence()))


def _abort_unused(decode: DeploymentHandle, reply: asyncio.Future[Reservation | None]) -> None:
    """A reservation its handoff stopped waiting for: free it on its replica (no writer ever learned of it)."""
    if reply.cancelled() or reply.exception() is not None or (reservation := reply.result()) is None:
        return
    pinned = {"target_replica_id": reservation.replica_id}
    _spawn(_abort(decode, reservation.request_id, pinned, may_be_written=False))


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
        with foreign_cancel_as_fault("the abort"):  # cancelled on the replica's side: a failure to log too
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


async def colocated_generate(
    request: EngineRequest,
    engine: DeploymentHandle,
    channels: IngressChannels | None = None,
    max_migrations: int = 1,
    broken: BrokenReplicas | None = None,
) -> AsyncGenerator[RequestOutput, None]:
    """Stream `request`'s outputs from an engine replica (Serve picks it, around the `broken` ones), failing over
    as `disaggregated_generate` does: a replica failing before the first token is retried once on Serve's next
    pick, a greedy or seeded stream it fails mid-way continues there (failover.py); a replica whose engine failed
    joins `broken`, so neither of those goes back to it."""
    streamed: list[int] = []
    attempt = request
    failover = Failover(max_migrations)
    for number in itertools.count(1):
        avoid = broken.current() if broken is not None else ()
        routing = {AVOID_REPLICAS_KWARG: avoid} if avoid else {}
        try:
            async with aclosing(_generate(attempt, engine, channels, **routing)) as outputs:
                async for out in outputs:
                    streamed.extend(out.new_token_ids)
                    yield out if attempt is request else as_original(out, request)
                    if out.finish_reason is not None:
                        return
            return
        except Exception as e:
            if broken is not None:
                broken.mark(e)
            if (action := failover.action(request, streamed, e)) is None:
                raise
            logger.warning("%s failed on its engine replica (%r); %s", request.request_id, e, action)
        attempt = continuation(request, streamed, number)


async def _stream(stream: DeploymentResponseGenerator[RequestOutput]) -> AsyncGenerator[RequestOutput, None]:
    """Relay a replica's output stream; if we stop early, cancel it (the replica then aborts the request)."""
    is_done = False
    try:
        with foreign_cancel_as_fault("a replica's output stream"):
            async for out in stream:
                is_done = out.finish_reason is not None
                yield out
                if is_done:  # not waiting for the stream's end: the replica may die meanwhile, after it ended
                    return
    finally:
        if not is_done:
            stream.cancel()
