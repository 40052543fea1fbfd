"""ASGI middleware: a request-body size limit, the last line of defence against unexpected exceptions, and the
request's span and HTTP metrics."""

from __future__ import annotations

import json
import logging
import time

from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode
from starlette.routing import get_route_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pdserve.api.errors import SERVER_ERROR, APIError, error_response
from pdserve.api.metrics import APIMetrics
from pdserve.telemetry import names

logger = logging.getLogger(__name__)


class _ClientGone(Exception):
    pass


class BodySizeLimit:
    """Answers 413 when a request body exceeds `max_bytes`, judged by Content-Length or, for chunked uploads, while
    reading. The body is read in full before the app runs (every route parses all of it anyway), then replayed."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        try:
            body = await self._read(receive)
        except _ClientGone:
            return  # nobody is left to answer
        if body is None:
            await self._refuse(scope, receive, send)
            return
        is_replayed = False

        async def replay() -> Message:
            nonlocal is_replayed
            if is_replayed:
                return await receive()  # later calls wait for the client's disconnect
            is_replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _read(self, receive: Receive) -> bytes | None:
        """The whole body, or None as soon as it is too large."""
        chunks: list[bytes] = []
        num_bytes = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone
            chunks.append(message.get("body", b""))
            num_bytes += len(chunks[-1])
            if num_bytes > self.max_bytes:
                return None
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = APIError(413, f"the request body exceeds {self.max_bytes} bytes", code="request_too_large")
        await error_response(error, headers={"Connection": "close"})(scope, receive, send)


class UnhandledErrors:
    """Logs an unexpected exception once and answers a generic 500, without re-raising it to the server (which
    would log it again, and under Ray Serve count the request twice). Sits outside every other middleware."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        is_started = False

        async def tracking_send(message: Message) -> None:
            nonlocal is_started
            is_started = is_started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            logger.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            if not is_started:  # once headers are out, the client can only see the connection end
                await error_response(APIError(500, "internal server error", SERVER_ERROR))(scope, receive, send)


class HTTPMetrics:
    """Request counts by route and status, end-to-end latency (to the response's last byte, so a stream counts
    whole) and errors by type, read from the OpenAI error body, or from an error event inside a stream. The error
    type also goes on the request's span (FastAPI's own SERVER span, current here), which FastAPI marks as an error
    for 5xx; an error event in a 200 stream marks it here."""

    def __init__(self, app: ASGIApp, metrics: APIMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        scope.setdefault("state", {})["arrived_at"] = start  # `request.state.arrived_at`: TTFT counts from it
        span = trace.get_current_span()
        status = 499  # nothing answered: the client left first (nginx's "client closed request"); UnhandledErrors,
        error_types: list[str] = []  # inside this middleware, answers every failure (500)

        async def observing_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                found = _error_types(message.get("body", b""), status)
                if found and not error_types:  # onto the span now: FastAPI ends it with the response's last byte
                    span.set_attribute(names.ERROR_TYPE, found[0])
                    if status < 400:
                        span.set_status(Status(StatusCode.ERROR, "error event in the stream"))
                error_types.extend(found)
            await send(message)

        try:
            await self.app(scope, receive, observing_send)
        finally:
            seconds = time.perf_counter() - start
            self.metrics.observe(scope.get("method", ""), get_route_path(scope), status, seconds, error_types)


def _error_types(body: bytes, status: int) -> list[str]:
    """The OpenAI error types in a response body chunk: the whole body of an error response, or the `error`
    events of a stream (an error after the headers arrives as an event)."""
    if status < 400 and b'"error"' not in body:
        return []
    found = []
    for line in body.split(b"\n") if status < 400 else [body]:
        payload = line.removeprefix(b"data: ").strip()
        if not payload.startswith(b"{"):
            continue
        try:
            error = json.loads(payload).get("error")
        except ValueError:
            continue
        if isinstance(error, dict):
            found.append(str(error.get("code") or error.get("type") or "error"))
    return found
