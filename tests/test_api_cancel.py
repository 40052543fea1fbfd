"""Every backend stream the HTTP layer opens is closed, however the request ends: a plain `task.cancel()` of the
ASGI call (what Ray Serve's proxy and Starlette do when a client leaves) at any await, a second cancel landing in
the cleanup itself, or the client's disconnect message. Closing is what aborts the request in the engine and ends
its entry in the router's in-flight table, so a stream left to the garbage collector is a leak (it once was: a
cancel landing just as the first token came, in `first_delta_within`, left the stream open — the storm test saw the
router count a request in flight seconds after the last one ended).

The app runs in-process as an ASGI callable on one event loop, so a seeded schedule places each cancel at an exact
step: thousands of random cases (stream or not, n of 1 or 2, first token in time or late, cancels at every step).
The backend keeps a strong reference to every stream it made and the collector is off, so nothing but an explicit
close can end one."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import random
from collections.abc import AsyncGenerator, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi import FastAPI

from pdserve.api import GenerationDelta, GenerationRequest, create_app
from tiny_models import EOS_ID, build_tokenizer

NUM_CASES = 3000


class StepBackend:
    """Streams a few deltas, each after a given number of event-loop steps; remembers every stream it opened and
    whether its `finally` ran (it closed)."""

    model_name = "fake-model"
    model_names: tuple[str, ...] = ("fake-model",)
    max_model_len = 128
    eos_token_ids: tuple[int, ...] = (EOS_ID,)

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.streams: list[AsyncGenerator[GenerationDelta, None]] = []  # strong references: no finalizer closes one
        self.open: set[int] = set()  # streams started and not closed, by number
        self.first_after_steps = 0
        self.steps_between = 0
        self.num_deltas = 1

    def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationDelta, None]:
        stream = self._generate(len(self.streams))  # numbered when made: n choices are all made before any starts
        self.streams.append(stream)
        return stream

    async def _generate(self, number: int) -> AsyncGenerator[GenerationDelta, None]:
        self.open.add(number)
        try:
            for i in range(self.num_deltas):
                for _ in range(self.first_after_steps if i == 0 else self.steps_between):
                    await asyncio.sleep(0)
                is_last = i == self.num_deltas - 1
                yield GenerationDelta([EOS_ID if is_last else 40 + i], None, "stop" if is_last else None, 3, 0)
        finally:
            self.open.discard(number)

    async def is_healthy(self) -> bool:
        return True

    async def is_ready(self) -> bool:
        return True

    def render_metrics(self) -> tuple[bytes, str]:
        return b"", "text/plain"


@dataclass
class Case:
    stream: bool
    n: int
    late_first: bool  # the app's first-token wait is 0: the stream starts before its first token (keep-alives)
    first_after_steps: int
    steps_between: int
    num_deltas: int
    cancel_after_steps: int | None  # None: the client disconnects instead (after 5 steps)
    is_left_alone: bool  # neither: the response must then be whole and right
    second_cancel_after_steps: int | None  # a second cancel, landing in the cleanup of the first


def random_case(rng: random.Random) -> Case:
    return Case(
        stream=rng.random() < 0.6,
        n=rng.choice([1, 1, 2]),
        late_first=rng.random() < 0.4,
        first_after_steps=rng.choice([0, 0, 1, 2, rng.randint(3, 12)]),
        steps_between=rng.choice([0, 1, rng.randint(2, 6)]),
        num_deltas=rng.randint(1, 5),
        cancel_after_steps=None if rng.random() < 0.15 else rng.randint(0, 40),
        second_cancel_after_steps=rng.randint(0, 6) if rng.random() < 0.3 else None,
        is_left_alone=rng.random() < 0.1,
    )


async def run_case(app: FastAPI, case: Case) -> list[dict[str, Any]]:
    body = json.dumps({"model": "fake-model", "prompt": [5, 6, 7], "max_tokens": 8, "stream": case.stream, "n": case.n})
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": "/v1/completions", "raw_path": b"/v1/completions", "root_path": "", "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 1234), "server": ("127.0.0.1", 8000),
    }  # fmt: skip
    gone = asyncio.Event()
    is_read = False
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal is_read
        if not is_read:
            is_read = True
            return {"type": "http.request", "body": body.encode(), "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if gone.is_set():
            raise OSError("the client is gone")
        sent.append(message)

    call = asyncio.ensure_future(app(scope, receive, send))
    if case.is_left_alone:
        await asyncio.wait_for(call, 5)
        return sent
    for _ in range(case.cancel_after_steps if case.cancel_after_steps is not None else 5):
        await asyncio.sleep(0)
    gone.set()
    if case.cancel_after_steps is not None:
        call.cancel()
        if case.second_cancel_after_steps is not None:
            for _ in range(case.second_cancel_after_steps):
                await asyncio.sleep(0)
            call.cancel()
    with contextlib.suppress(BaseException):
        await asyncio.wait_for(asyncio.shield(call), 2)
    if not call.done():
        raise AssertionError("the request's call did not end 2 s after its cancel")
    for _ in range(20):  # whatever closing was handed to a task of its own finishes in a few steps
        await asyncio.sleep(0)
    return sent


@pytest.fixture(scope="module")
def apps(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[bool, tuple[FastAPI, StepBackend]]]:
    tokenizer = build_tokenizer(tmp_path_factory.mktemp("tokenizer"))
    result = {}
    for late in (False, True):
        backend = StepBackend(tokenizer)
        result[late] = (create_app(backend, first_token_wait_s=0.0 if late else 5.0, sse_keepalive_s=0.001), backend)
    yield result


def test_every_stream_is_closed_whenever_the_request_is_cancelled(
    apps: dict[bool, tuple[FastAPI, StepBackend]],
) -> None:
    rng = random.Random(20261201)

    errors: list[str] = []  # whatever the loop saw go unhandled (a task's exception nobody retrieved)
    outcomes = {"cut after the stream opened": 0, "cut before": 0, "whole": 0}

    async def main() -> list[str]:
        asyncio.get_running_loop().set_exception_handler(lambda _loop, context: errors.append(context["message"]))
        failures = []
        for number in range(NUM_CASES):
            case = random_case(rng)
            app, backend = apps[case.late_first]
            backend.first_after_steps, backend.steps_between = case.first_after_steps, case.steps_between
            backend.num_deltas = case.num_deltas
            num_streams = len(backend.streams)
            try:
                sent = await run_case(app, case)
            except AssertionError as e:
                failures.append(f"case {number} {case}: {e}")
                continue
            if backend.open:
                failures.append(f"case {number} {case}: {len(backend.open)} stream(s) open")
                backend.open.clear()
            if case.is_left_alone:
                outcomes["whole"] += 1
                if (problem := whole_response_problem(case, sent)) is not None:
                    failures.append(f"case {number} {case}: {problem}")
            else:
                outcomes["cut after the stream opened" if len(backend.streams) > num_streams else "cut before"] += 1
        return failures

    gc.disable()  # only an explicit close may end a stream, not a finalizer after a collection
    try:
        failures = asyncio.run(main())
    finally:
        gc.enable()
    assert not failures, f"{len(failures)} of {NUM_CASES} cases left a backend stream open:\n" + "\n".join(
        failures[:10]
    )
    assert not errors, errors[:5]
    print(outcomes)
    assert min(outcomes.values()) > NUM_CASES // 20, outcomes  # every phase is reached often


def whole_response_problem(case: Case, sent: list[dict[str, Any]]) -> str | None:
    """What is wrong with an uncancelled response (None: it is a 200 carrying every choice's tokens)."""
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body").decode()
    if status != 200:
        return f"status {status}: {body}"
    if case.stream:
        events = [json.loads(line[6:]) for line in body.splitlines() if line.startswith("data: {")]
        if not body.rstrip().endswith("data: [DONE]"):
            return f"no [DONE]: {body[-200:]}"
        finishes = [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"] is not None]
    else:
        finishes = [c["finish_reason"] for c in json.loads(body)["choices"]]
    return None if finishes == ["stop"] * case.n else f"finish reasons {finishes}"


async def _turns(n: int) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


def test_a_failure_as_the_client_leaves_is_not_logged_as_never_retrieved() -> None:
    """The backend fails in the loop turn the client leaves (a non-streamed request's collect, a stream's wait for its
    first delta): the failed task's exception was never read, and asyncio logged "Task exception was never
    retrieved" with its traceback beside the error already handled (found in review)."""
    from pdserve.api.app import _unless_disconnected
    from pdserve.api.generation import first_delta_within

    class Connected:
        async def receive(self) -> None:
            await asyncio.Event().wait()

    async def main() -> list[str]:
        unretrieved: list[str] = []
        asyncio.get_running_loop().set_exception_handler(lambda _, context: unretrieved.append(context["message"]))
        caller: asyncio.Future[Any] | None = None

        async def work() -> None:
            await asyncio.sleep(0)
            assert caller is not None
            caller.cancel()  # the client leaves in the turn the backend fails
            raise RuntimeError("backend failed")

        async def deltas() -> AsyncGenerator[GenerationDelta, None]:
            await asyncio.sleep(0)
            assert caller is not None
            caller.cancel()
            raise RuntimeError("backend failed")
            yield  # an async generator

        async def failing_when_cancelled() -> AsyncGenerator[GenerationDelta, None]:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:  # the stream's own cleanup fails as the caller leaves
                raise RuntimeError("backend failed while closing") from None
            yield  # an async generator

        async def left_while_waiting() -> None:
            nonlocal caller
            caller = asyncio.ensure_future(first_delta_within(failing_when_cancelled(), 5.0))
            await _turns(3)
            caller.cancel()
            await asyncio.wait({caller})

        await left_while_waiting()  # its pending first-delta task ends failed: read by the stream's closing
        for call in (lambda: _unless_disconnected(Connected(), work()), lambda: first_delta_within(deltas(), 5.0)):
            caller = asyncio.ensure_future(call())  # type: ignore[no-untyped-call]
            with contextlib.suppress(asyncio.CancelledError):
                await caller
            for _ in range(5):
                await asyncio.sleep(0)
            gc.collect()
            await asyncio.sleep(0)
        return unretrieved

    assert asyncio.run(main()) == []
