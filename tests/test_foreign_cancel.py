"""A call cancelled on its replica's side — not by the ingress — is a server fault, not the client leaving.

Ray Serve raises a remote task that was cancelled (a replica's request timeout, its task cancelled) as a plain
`asyncio.CancelledError` at the caller. The ingress took every CancelledError for its client leaving: a 200 stream
ended short with no error event, and on the output channels the relay re-raised it without failing the request's
inbox, so the stream waited for outputs forever (found in review; both tests fail on the old code). Our own cancel
(the client left) still propagates as a cancellation. And a lease renewal, cancelled there or slow, never decides
the prefill's outcome or timing."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from pdserve.engine import EngineRequest, RequestOutput, SamplingParams
from pdserve.serve.channels import IngressChannels
from pdserve.serve.failover import ReplicaCancelled, is_server_fault
from pdserve.serve.handoff import _renew, _renewing, colocated_generate, disaggregated_generate
from pdserve.serve.messages import Reservation


class _Call:
    """A replica's output stream: `outputs`, then a CancelledError of its own (or a wait, if `hang`)."""

    def __init__(self, outputs: list[Any], hang: bool = False) -> None:
        self.outputs, self.hang = list(outputs), hang
        self.cancelled = False

    def __aiter__(self) -> _Call:
        return self

    async def __anext__(self) -> Any:
        await asyncio.sleep(0)
        if self.outputs:
            return self.outputs.pop(0)
        if self.hang:
            await asyncio.Event().wait()
        raise asyncio.CancelledError()

    def cancel(self) -> None:
        self.cancelled = True


class _Handle:
    def __init__(self, call: _Call) -> None:
        self.call = call

    def options(self, **_: Any) -> _Handle:
        return self

    @property
    def generate(self) -> _Handle:
        return self

    def remote(self, *_: Any, **__: Any) -> _Call:
        return self.call


def _request() -> EngineRequest:
    return EngineRequest("r", (5, 6, 7), SamplingParams(max_tokens=8))


def _first() -> RequestOutput:
    return RequestOutput("r", [40], None, None, 3, 0)


async def _collect(outputs: Any) -> tuple[list[RequestOutput], BaseException | None]:
    got: list[RequestOutput] = []
    try:
        async for out in outputs:
            got.append(out)
    except BaseException as e:  # what ended the stream is what is checked
        return got, e
    return got, None


def test_a_stream_cancelled_on_its_replica_is_a_server_fault() -> None:
    async def run() -> tuple[list[RequestOutput], BaseException | None]:
        return await _collect(colocated_generate(_request(), _Handle(_Call([_first()]))))  # type: ignore[arg-type]

    got, error = asyncio.run(run())
    assert [o.new_token_ids for o in got] == [[40]]
    assert isinstance(error, ReplicaCancelled) and is_server_fault(error)


def test_a_channeled_stream_cancelled_on_its_replica_fails_instead_of_hanging() -> None:
    async def run() -> tuple[list[RequestOutput], BaseException | None]:
        channels = IngressChannels()
        call = _Call([_first()])
        return await asyncio.wait_for(_collect(channels.stream(_Handle(call), call, "r")), 5)

    got, error = asyncio.run(run())
    assert [o.new_token_ids for o in got] == [[40]]
    assert isinstance(error, ReplicaCancelled)


@pytest.mark.parametrize("channeled", [False, True])
def test_our_own_cancel_stays_a_cancellation(channeled: bool) -> None:
    """The client leaving cancels the ingress's task: that stays a CancelledError (the stream just ends), and the
    replica's call is cancelled too."""

    async def run() -> tuple[BaseException | None, bool]:
        call = _Call([_first()], hang=True)
        if channeled:
            outputs: Any = IngressChannels().stream(_Handle(call), call, "r")
        else:
            outputs = colocated_generate(_request(), _Handle(call))  # type: ignore[arg-type]
        task = asyncio.ensure_future(_collect(outputs))
        await asyncio.sleep(0.05)
        task.cancel()
        try:
            _, error = await task
        except asyncio.CancelledError as e:
            error = e
        await asyncio.sleep(0)
        return error, call.cancelled

    error, cancelled = asyncio.run(run())
    assert isinstance(error, asyncio.CancelledError)
    assert cancelled


class _CancelledOnReplica:
    """A decode pool whose every call (reserve, renew) is cancelled on the replica's side."""

    def __init__(self) -> None:
        self.num_calls = 0
        self.reserve = self.renew = self

    def remote(self, *_: Any, **__: Any) -> Any:
        self.num_calls += 1

        async def cancelled() -> None:
            await asyncio.sleep(0)
            raise asyncio.CancelledError()

        return _Response(cancelled())


class _Response:
    """A unary call's response, as Serve's DeploymentResponse: awaitable once, and `cancel()`able."""

    def __init__(self, coro: Any) -> None:
        self.coro, self.num_cancels = coro, 0

    def __await__(self) -> Any:
        return self.coro.__await__()

    def cancel(self) -> None:
        self.num_cancels += 1


def test_a_reservation_cancelled_on_its_replica_is_a_server_fault() -> None:
    """The reserve call runs in the handoff's own task: a cancel from the replica's side ended that task cancelled,
    which the ingress took for its client leaving — a 200 stream stopped with no error event (found in review).
    Now it is a server fault: retried once (nothing was shown), then the error."""
    decode = _CancelledOnReplica()

    async def run() -> tuple[list[RequestOutput], BaseException | None]:
        outputs = disaggregated_generate(_request(), None, decode, None)  # type: ignore[arg-type]
        return await asyncio.wait_for(_collect(outputs), 5)

    got, error = asyncio.run(run())
    assert got == [] and isinstance(error, ReplicaCancelled) and is_server_fault(error), error
    assert decode.num_calls == 2  # the first attempt and its one retry


def test_a_renewal_cancelled_on_its_replica_is_not_the_prefills_failure() -> None:
    """A renewal's failure is logged and never fatal; a replica-side cancel of it read as the prefill's own
    cancellation, so a healthy prefill was cancelled and retried."""
    decode = _CancelledOnReplica()
    reservation = Reservation("r", "d0", 1, (0,), 0, None, 6.0)  # type: ignore[arg-type]  # no endpoint: never used
    asyncio.run(_renew(decode, reservation))  # type: ignore[arg-type]
    assert decode.num_calls == 1


class _SlowRenewals:
    """A decode pool whose renewals take `renew_s` to answer."""

    def __init__(self, renew_s: float) -> None:
        self.renew_s, self.num_calls = renew_s, 0
        self.renew = self

    def remote(self, *_: Any, **__: Any) -> Any:
        self.num_calls += 1

        async def slow() -> bool:
            await asyncio.sleep(self.renew_s)
            return True

        return slow()


class _Prefill:
    """A prefill call that answers after `seconds` (never, if None); `cancel()` as a Serve response's."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds, self.cancelled = seconds, False

    def __await__(self) -> Any:
        return self._answer().__await__()

    async def _answer(self) -> str:
        await asyncio.sleep(3600 if self.seconds is None else self.seconds)
        return "result"

    def cancel(self) -> None:
        self.cancelled = True


@pytest.mark.parametrize("prefill_s", [0.3, None])
def test_a_slow_renewal_neither_hides_the_prefills_end_nor_stretches_its_timeout(prefill_s: float | None) -> None:
    """Renewals ran inline: one that took long (up to 30 s on an unresponsive decode replica) kept `_renewing` from
    seeing a prefill that had ended, or its timeout pass (found in review)."""
    decode = _SlowRenewals(renew_s=5.0)
    reservation = Reservation("r", "d0", 1, (0,), 0, None, 0.3)  # type: ignore[arg-type]  # a renewal every 0.1 s

    async def run() -> tuple[object, float]:
        start = time.monotonic()
        try:
            result: object = await _renewing(_Prefill(prefill_s), decode, reservation, timeout_s=0.6)  # type: ignore[arg-type]
        except TimeoutError as e:
            result = e
        return result, time.monotonic() - start

    result, took_s = asyncio.run(run())
    if prefill_s is not None:
        assert result == "result" and took_s < 0.5, took_s
    else:
        assert isinstance(result, TimeoutError) and took_s < 0.8, took_s
    assert decode.num_calls == 1  # one renewal in flight at a time


class _Reservations:
    """A decode pool: `wedged` never answers a reserve, every other replica (and Serve's pick) has no room."""

    def __init__(
        self, wedged: str | None = None, failing: str | tuple[str | None, ...] = (), room: str | None = None
    ) -> None:
        """`failing`: targets whose call fails (None: Serve's pick)."""
        self.wedged, self.room, self.calls = wedged, room, []
        self.failing = (failing,) if isinstance(failing, str) else failing
        self.reserve = self

    def remote(self, request: Any, target_replica_id: str | None = None) -> Any:
        self.calls.append(target_replica_id)

        async def answer() -> str | None:
            if target_replica_id is not None and target_replica_id == self.wedged:
                await asyncio.sleep(3600)
            if target_replica_id in self.failing:
                raise RuntimeError("the replica is gone")
            has_room = target_replica_id is not None and target_replica_id == self.room
            return f"reserved on {target_replica_id}" if has_room else None  # else no room

        return answer()


def test_a_wedged_top_ranked_decode_replica_costs_the_queue_ttl_once_not_30_s_a_round() -> None:
    """Each round retried the router's top pick, waiting up to 30 s on it, past the request's queue_ttl_s (found in
    review). A call now waits at most until the deadline (at least 1 s), and a target that failed is not tried again
    for that request."""
    from types import SimpleNamespace

    from pdserve.api.backend import CapacityError
    from pdserve.serve.handoff import _reserve_within

    decode = _Reservations(wedged="d0")
    route = SimpleNamespace(decode_ranking=["d0", "d1"])

    async def run() -> tuple[BaseException | None, float]:
        start = time.monotonic()
        try:
            await _reserve_within(_request(), decode, route, 1.5, asyncio.Event())  # type: ignore[arg-type]
        except CapacityError as e:
            return e, time.monotonic() - start
        return None, time.monotonic() - start

    error, took_s = asyncio.run(run())
    assert isinstance(error, CapacityError) and took_s < 3.0, took_s
    assert decode.calls == ["d0", "d1", None]  # the wedged pick once, then the runner-up and Serve's pick

    decode = _Reservations(failing="d0")  # gone: every round asked it again
    error, took_s = asyncio.run(run())
    assert isinstance(error, CapacityError) and decode.calls.count("d0") == 1 and decode.calls.count("d1") > 2


def test_after_a_round_without_room_every_ranked_decode_replica_is_asked() -> None:
    """The ranking is the router's view when the request arrived: with 3 decode replicas, a request waited out its
    queue_ttl_s on the first two (full) while the third had room (found in review). The first round asks the top
    two; each later one also one more of the ranking, in turn (a bounded number of calls per round) — never Serve's
    blind pick while every known one is merely full. Serve's pick after a ranked one failed: its failure waits for
    the ranked ones that live (it failed the request)."""
    from types import SimpleNamespace

    from pdserve.serve.handoff import _reserve_within

    def reserve(decode: _Reservations, ranking: list[str]) -> object:
        route = SimpleNamespace(decode_ranking=ranking)
        return asyncio.run(_reserve_within(_request(), decode, route, 5.0, asyncio.Event()))  # type: ignore[arg-type]

    decode = _Reservations(room="d2")
    assert reserve(decode, ["d0", "d1", "d2"]) == "reserved on d2"
    assert decode.calls == ["d0", "d1", "d0", "d1", "d2"]
    decode = _Reservations(room="d3")
    assert reserve(decode, ["d0", "d1", "d2", "d3"]) == "reserved on d3"
    assert decode.calls == ["d0", "d1", "d0", "d1", "d2", "d0", "d1", "d3"]
    decode = _Reservations(room="d3", failing=("d2", None))  # d2 draining, Serve's pick failing
    assert reserve(decode, ["d0", "d1", "d2", "d3"]) == "reserved on d3"
    assert decode.calls == ["d0", "d1", "d0", "d1", "d2", None, "d0", "d1", "d3"]
    decode = _Reservations(room="d0")  # the top pick has room: one call
    assert reserve(decode, ["d0", "d1", "d2"]) == "reserved on d0"
    assert decode.calls == ["d0"]
