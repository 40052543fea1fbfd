"""Cancellation at random points of the whole ingress path, without Ray: the real API (`create_app`), the real
`Ingress.generate` with its admission, the real handoff and output channels, over an in-process stand-in cluster whose
replica calls run as tasks of their own, as Serve's do (a streaming call's generator is cancelled by a
CancelledError thrown in, as Serve 2.60 does). Each seeded case sends one request (streamed or not, n = 1 or 2, over
the call or an output channel, disaggregated or colocated), injects faults (no room on D, prefill failing or slow, a
commit refused, a decode replica failing mid-stream), then hangs up and cancels the ASGI call at a random loop step
(and Serve's child calls of the request), sometimes twice. Afterwards nothing may be held anywhere: no reservation or
decoding request on the replica, no admitted prompt tokens, no router in-flight entry, no detached handoff task, no
inbox, no replica call still running, no channel user — and no "never retrieved" error on the loop.

The storm modules run the same through real HTTP on a real Ray cluster with real engines; this one reaches each
await of the path thousands of times in seconds (found in review, as a harness: the first runs showed only the
unretrieved exceptions since fixed)."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import random
from collections import Counter
from collections.abc import AsyncGenerator
from contextlib import aclosing
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from pdserve.api import create_app
from pdserve.engine import FinishReason, RequestOutput
from pdserve.router import RouteDecision, RouteMode
from pdserve.router.admission import Admission
from pdserve.serve import handoff
from pdserve.serve.channels import IngressChannels, ReplicaChannels
from pdserve.serve.config import ServeConfig
from pdserve.serve.failover import BrokenReplicas
from pdserve.serve.ingress import Ingress
from pdserve.serve.ingress_router import RouterCollector
from pdserve.serve.messages import PrefillResult, Reservation
from pdserve.serve.metrics import IngressMetrics
from tiny_models import EOS_ID, build_tokenizer

NUM_CASES = 500  # per (mode, channels) pair: 2,000 cases, ~10 s of CPU
FAULTS = ("noroom", "prefill", "slowprefill", "midstream", "commit")

_REQUEST: contextvars.ContextVar[int | None] = contextvars.ContextVar("request", default=None)


async def _turns(n: int) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


class _Cluster:
    """One prefill and one decode (or colocated engine) replica's methods, as tasks of their own per call."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.tasks: set[asyncio.Task[Any]] = set()
        self.held: dict[str, str] = {}  # the decode replica's requests: id -> "reserved" | "decoding"
        self.channels = ReplicaChannels("d1", idle_close_s=0.05)
        self.delay = 2  # loop turns per replica step
        self.num_tokens = 3
        self.faults: set[str] = set()

    def start(self, coro: Any, method: str) -> asyncio.Task[Any]:
        task = contextvars.Context().run(asyncio.ensure_future, coro)
        task.owner, task.method = _REQUEST.get(), method  # type: ignore[attr-defined]
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def calls(self) -> list[str]:
        return [t.method for t in self.tasks if t.method != "outputs"]  # type: ignore[attr-defined]

    def cancel_calls_of(self, owner: int) -> None:
        """Serve cancels the calls made in a request's context when its client leaves (not the channel's)."""
        for task in list(self.tasks):
            if task.owner == owner and task.method != "outputs":  # type: ignore[attr-defined]
                task.cancel()

    def _fails(self, fault: str, p: float) -> bool:
        return fault in self.faults and self.rng.random() < p

    async def reserve(self, request: Any, target_replica_id: str | None = None) -> Reservation | None:
        await _turns(self.delay)
        if self._fails("noroom", 0.5):
            return None
        self.held[request.request_id] = "reserved"
        return Reservation(request.request_id, "d1", 1, (0,), 0, None, 10.0)  # type: ignore[arg-type]

    async def renew(self, request_id: str, target_replica_id: str | None = None) -> bool:
        return self.held.get(request_id) == "reserved"

    async def abort(self, request_id: str, *_: Any, target_replica_id: str | None = None) -> None:
        self.held.pop(request_id, None)

    async def prefill(self, request: Any, reservation: Any, target_replica_id: str | None = None) -> PrefillResult:
        await _turns(self.delay)
        if self._fails("prefill", 0.6):
            raise RuntimeError("prefill failed")
        if self._fails("slowprefill", 0.5):
            await asyncio.sleep(0.1)  # past the prefill timeout
        return PrefillResult(40, None, None, len(request.prompt_token_ids), 0, 0, 0, 0.0, 0.0, 0.0, 0.0)

    async def _tokens(self, request_id: str, is_commit: bool) -> AsyncGenerator[RequestOutput, None]:
        if is_commit:
            if self.held.get(request_id) != "reserved":
                raise ValueError("no open reservation")
            if self._fails("commit", 0.3):
                raise ValueError("KV transfer incomplete")
        self.held[request_id] = "decoding"
        try:
            for i in range(self.num_tokens):
                await _turns(self.delay)
                if self._fails("midstream", 0.2):
                    raise RuntimeError("decode replica failed")
                is_last = i == self.num_tokens - 1
                reason = FinishReason.STOP if is_last else None
                yield RequestOutput(request_id, [EOS_ID if is_last else 41 + i], None, reason, 3, 0)
        finally:
            self.held.pop(request_id, None)

    async def decode(
        self, request_id: str, first_token_id: int, first_logprob: Any, traceparent: Any = None,
        target_replica_id: str | None = None, channel_id: str | None = None, **_: Any,
    ) -> AsyncGenerator[Any, None]:  # fmt: skip
        if channel_id is None:
            yield RequestOutput(request_id, [], None, None, 0, 0)  # the commit's acknowledgement
        async with aclosing(self.channels.relay(channel_id, self._tokens(request_id, True))) as items:
            async for item in items:
                yield item

    async def generate(
        self, request: Any, target_replica_id: str | None = None, channel_id: str | None = None
    ) -> AsyncGenerator[Any, None]:
        async with aclosing(self.channels.relay(channel_id, self._tokens(request.request_id, False))) as items:
            async for item in items:
                yield item

    async def outputs(self, channel_id: str, target_replica_id: str | None = None) -> AsyncGenerator[Any, None]:
        async with aclosing(self.channels.serve(channel_id)) as batches:
            async for batch in batches:
                yield batch


class _Call:
    """A unary call's response: awaited, or cancelled."""

    def __init__(self, cluster: _Cluster, coro: Any, method: str) -> None:
        self.task = cluster.start(coro, method)

    def __await__(self) -> Any:
        return self._result().__await__()

    async def _result(self) -> Any:
        await asyncio.wait({self.task})
        return self.task.result()

    def cancel(self) -> None:
        self.task.cancel()


class _StreamCall:
    """A streaming call's response: the replica's generator runs in a task of its own; cancelled, a CancelledError
    is thrown into it (Serve 2.60's)."""

    def __init__(self, cluster: _Cluster, outputs: Any, method: str) -> None:
        self.items: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.task = cluster.start(self._pump(outputs), method)

    async def _pump(self, outputs: Any) -> None:
        try:
            async for item in outputs:
                self.items.put_nowait(("item", item))
            self.items.put_nowait(("end", None))
        except asyncio.CancelledError:
            with contextlib.suppress(BaseException):
                await outputs.athrow(asyncio.CancelledError())
            raise
        except Exception as e:
            self.items.put_nowait(("error", e))

    def __aiter__(self) -> _StreamCall:
        return self

    async def __anext__(self) -> Any:
        kind, value = await self.items.get()
        if kind == "item":
            return value
        if kind == "end":
            raise StopAsyncIteration
        raise value

    def cancel(self) -> None:
        self.task.cancel()


class _Handle:
    def __init__(self, cluster: _Cluster, stream: bool = False) -> None:
        self.cluster, self.stream = cluster, stream

    def options(self, stream: bool = False) -> _Handle:
        return _Handle(self.cluster, stream)

    def __getattr__(self, method: str) -> Any:
        bound = getattr(self.cluster, method)

        def remote(*args: Any, **kwargs: Any) -> Any:
            result = bound(*args, **kwargs)
            if self.stream:
                return _StreamCall(self.cluster, result, method)
            return _Call(self.cluster, result, method)

        return SimpleNamespace(remote=remote)


class _Router:
    """The router's surface the ingress uses: a random route (none, local, disaggregated), in-flight counted."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.in_flight: set[str] = set()
        self.router = self

    def route(self, request: Any) -> RouteDecision | None:
        self.in_flight.add(request.request_id)
        kind = self.rng.choice(["none", "local", "disaggregated"])
        if kind == "none":
            return None
        mode = RouteMode.LOCAL if kind == "local" else RouteMode.DISAGGREGATED
        prefill = None if kind == "local" else "p1"
        terms = (("p1", "prefill", 0, 0, 0, 10, 0.0, 0.1, 0.0, 0.1, True),)
        num_tokens = len(request.prompt_token_ids)
        return RouteDecision(request.request_id, mode, "d1", prefill, num_tokens, 0, 0, (), ("d1",), (), terms)  # type: ignore[arg-type]

    def move(self, request_id: str, **_: Any) -> None:
        pass

    def prefill_done(self, request_id: str, num_cached_tokens: int) -> None:
        pass

    def finish(self, request_id: str) -> None:
        self.in_flight.discard(request_id)


class _Ingress:
    """An ingress replica with its real request path (generate, admission, routing, metrics) over the stand-ins."""

    generate = Ingress.generate
    render_metrics = Ingress.render_metrics
    _admit, _finish, _route = Ingress._admit, Ingress._finish, Ingress._route
    _observe_first, _observe_end = Ingress._observe_first, Ingress._observe_end
    model_name, model_names, max_model_len, eos_token_ids = "fake-model", ("fake-model",), 128, (EOS_ID,)

    def __init__(self, tokenizer: Any, cluster: _Cluster, colocated: bool, channels: bool, rng: random.Random) -> None:
        self.tokenizer = tokenizer
        self.prefill = self.decode = _Handle(cluster)
        self.engine: _Handle | None = _Handle(cluster) if colocated else None
        self.router: _Router | None = None if colocated else _Router(rng)
        self.mode = "colocated" if colocated else "disaggregated"
        self.channels = IngressChannels() if channels else None
        self.broken = BrokenReplicas()  # the colocated path's, real (no stand-in replica names itself)
        self.admission = Admission(1 << 30)
        self.metrics = IngressMetrics(RouterCollector(None, self.admission))
        self.config = ServeConfig(queue_ttl_s=1.0, prefill_timeout_s=0.05)

    async def is_healthy(self) -> bool:
        return True

    async def is_ready(self) -> bool:
        return True


async def _send(app: Any, cluster: _Cluster, number: int, body: dict[str, Any], cancel_at: int | None,
                second_cancel: int | None) -> int | None:  # fmt: skip
    """One request over ASGI; unless `cancel_at` is None, the client hangs up after that many loop turns and the
    call is cancelled (and Serve's calls of the request), again `second_cancel` turns later if given. Returns the
    response's status if it started."""
    raw = json.dumps(body).encode()
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": "/v1/completions", "raw_path": b"/v1/completions", "root_path": "", "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())],
        "client": ("127.0.0.1", 1234), "server": ("127.0.0.1", 8000),
    }  # fmt: skip
    gone = asyncio.Event()
    is_read = False
    status: int | None = None

    async def receive() -> dict[str, Any]:
        nonlocal is_read
        if not is_read:
            is_read = True
            return {"type": "http.request", "body": raw, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if gone.is_set():
            raise OSError("the client is gone")
        if message["type"] == "http.response.start":
            status = message["status"]

    async def asgi() -> None:
        _REQUEST.set(number)
        await app(scope, receive, send)

    call = asyncio.ensure_future(asgi())
    if cancel_at is None:
        await asyncio.wait_for(call, 8)
        return status
    await _turns(cancel_at)
    gone.set()
    call.cancel()
    cluster.cancel_calls_of(number)
    if second_cancel is not None:
        await _turns(second_cancel)
        call.cancel()
    with contextlib.suppress(BaseException):
        await asyncio.wait_for(asyncio.shield(call), 3)
    assert call.done(), "the request's call did not end"
    return status


def _held(ingress: _Ingress, cluster: _Cluster) -> dict[str, Any]:
    state = {
        "decode replica": dict(cluster.held),
        "admitted": ingress.admission.num_queued,
        "admitted tokens": ingress.admission.num_queued_tokens,
        "router in flight": set(ingress.router.in_flight) if ingress.router else set(),
        "detached handoff tasks": len(handoff._background),
        "inboxes": list(ingress.channels._inboxes) if ingress.channels else [],
        "replica calls": cluster.calls(),
        "channel users": {k: o.num_users for k, o in cluster.channels._open.items() if o.num_users},
    }
    return {name: value for name, value in state.items() if value}


async def _fuzz(seed: int, colocated: bool, channels: bool, tmp: Path) -> list[str]:
    rng = random.Random(seed)
    unretrieved: list[str] = []
    loop = asyncio.get_running_loop()  # what was lost, named: the task (its coroutine and its exception)
    loop.set_exception_handler(lambda _, context: unretrieved.append(f"{context['message']}: {context.get('future')}"))
    cluster = _Cluster(rng)
    ingress = _Ingress(build_tokenizer(tmp), cluster, colocated, channels, rng)
    app = create_app(ingress, first_token_wait_s=rng.choice([0.0, 5.0]), sse_keepalive_s=0.001)  # type: ignore[arg-type]
    failures: list[str] = []
    statuses: Counter[int | None] = Counter()
    for number in range(NUM_CASES):
        cluster.delay = rng.choice([0, 1, 2, 5])
        cluster.num_tokens = rng.randint(1, 4)
        cluster.faults = {fault for fault in FAULTS if rng.random() < 0.25}
        prompt = [5, 6, 7] if rng.random() < 0.8 else [[5, 6, 7], [5, 6, 8, 9]]  # a batch of prompts too
        body = {"model": "fake-model", "prompt": prompt, "max_tokens": 8, "stream": rng.random() < 0.6,
                "n": rng.choice([1, 1, 2])}  # fmt: skip
        cancel_at = None if rng.random() < 0.1 else rng.randint(0, 80)
        second_cancel = rng.randint(0, 8) if rng.random() < 0.3 else None
        case = f"case {number}: {body}, faults {sorted(cluster.faults)}, cancel at {cancel_at}/{second_cancel}"
        try:
            statuses[await _send(app, cluster, number, body, cancel_at, second_cancel)] += 1
        except AssertionError as e:
            failures.append(f"{case}: {e}")
            continue
        # Detached work (a reservation's abort, a push's end, a channel's idle close) settles within moments.
        deadline = asyncio.get_running_loop().time() + 1.0
        while (held := _held(ingress, cluster)) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.005)
        if held:
            failures.append(f"{case}: held {held}")
            cluster.held.clear()  # the next cases start clean
            ingress.admission = Admission(1 << 30)
            if ingress.router:
                ingress.router.in_flight.clear()
    await asyncio.sleep(0.1)  # the channels idle out
    # The schedules reach every phase: cut before the response started, answered (200) or refused (5xx) by faults.
    if not (statuses[None] > 50 and statuses[200] > 50 and sum(n for s, n in statuses.items() if s and s >= 500)):
        failures.append(f"the cases did not reach every phase: {dict(statuses)}")
    return failures + [f"on the loop: {message}" for message in unretrieved]


@pytest.mark.parametrize("channels", [False, True], ids=["call", "channel"])
@pytest.mark.parametrize("colocated", [False, True], ids=["disaggregated", "colocated"])
def test_a_request_cancelled_anywhere_leaves_nothing_held(colocated: bool, channels: bool, tmp_path: Path) -> None:
    failures = asyncio.run(_fuzz(7 + 2 * colocated + channels, colocated, channels, tmp_path))
    assert not failures, f"{len(failures)} failures; first: " + "\n".join(failures[:5])
