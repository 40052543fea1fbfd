"""A call cancelled on its replica's side — not by the ingress — is a server fault, not the client leaving.

Ray Serve raises a remote task that was cancelled (a replica's request timeout, its task cancelled) as a plain
`asyncio.CancelledError` at the caller. The ingress took every CancelledError for its client leaving: a 200 stream
ended short with no error event, and on the output channels the relay re-raised it without failing the request's
inbox, so the stream waited for outputs forever (found in review; both tests fail on the old code). Our own cancel
(the client left) still propagates as a cancellation."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from pdserve.engine import EngineRequest, RequestOutput, SamplingParams
from pdserve.serve.channels import IngressChannels
from pdserve.serve.failover import ReplicaCancelled, is_server_fault
from pdserve.serve.handoff import colocated_generate


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
