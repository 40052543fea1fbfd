"""Server-sent events: the chunks of one streamed response, framed as OpenAI streams them, ending in [DONE]."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator

import anyio
from opentelemetry import trace
from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from pdserve.api.backend import CapacityError, GenerationDelta, InvalidRequest, ServerError
from pdserve.api.choices import ChoiceStreams, choice_usage, prompt_heads, total_usage
from pdserve.api.errors import APIError, backend_error
from pdserve.api.formats import ResponseFormat
from pdserve.api.generation import Generation, close_stream, release_stream, usage_attributes

logger = logging.getLogger(__name__)
DONE = "data: [DONE]\n\n"
KEEP_ALIVE = ": keep-alive\n\n"  # an SSE comment: clients ignore it, proxies see the connection is alive


def sse_event(body: BaseModel) -> str:
    return f"data: {body.model_dump_json()}\n\n"


async def stream_events(
    deltas: AsyncIterator[GenerationDelta],
    first: GenerationDelta | None,
    generation: Generation,
    fmt: ResponseFormat,
    include_usage: bool,
    pending: asyncio.Task[GenerationDelta | None] | None = None,
    keepalive_s: float = 5.0,
    continuous_usage: bool = False,
) -> AsyncGenerator[str, None]:
    """Yield the events of one streamed response; `first` is the delta pulled before the headers went out, or
    `pending` the task still waiting for it — meanwhile a keep-alive comment goes out every `keepalive_s`.
    An error after the headers cannot change the status, so it is sent as an error event (as vLLM does), then
    [DONE]. The backend stream is closed as soon as output ends (a stop string aborts the request) or in `finally`
    when the client is gone. `continuous_usage`: every chunk also carries the usage so far (vLLM's
    `continuous_usage_stats`)."""

    def event(chunk: BaseModel) -> str:
        if continuous_usage:
            chunk.usage = generation.usage()  # type: ignore[attr-defined]  # every chunk model has one
        return sse_event(chunk)

    try:
        if pending is not None:
            while not (await asyncio.wait({pending}, timeout=keepalive_s))[0]:
                yield KEEP_ALIVE
            first = pending.result()
        generation.begin(first)  # the opening chunk's usage (continuous_usage) shows the prompt's cache hit
        for chunk in fmt.opening():
            yield event(chunk)
        delta = first
        while delta is not None:
            piece = generation.absorb(delta)
            if piece is not None:
                yield event(fmt.chunk(piece))
            if generation.is_finished:
                break
            delta = await anext(deltas, None)
        await close_stream(deltas)
        if not generation.is_finished:
            raise RuntimeError("the backend's stream ended without a finish reason")
        trace.get_current_span().set_attributes(usage_attributes(generation))  # the request's span
        if include_usage:
            yield sse_event(fmt.usage_chunk(generation.usage()))
    except Exception as e:
        yield sse_event(_stream_error(e).body())
    finally:
        await close_stream(deltas, pending)  # a `pending` still waiting (the client left meanwhile) is stopped first
    yield DONE


async def choice_events(
    streams: ChoiceStreams,
    generations: list[Generation],
    fmts: list[ResponseFormat],
    first: GenerationDelta | None,
    include_usage: bool,
    continuous_usage: bool = False,
    pending: asyncio.Task[GenerationDelta | None] | None = None,
    keepalive_s: float = 5.0,
) -> AsyncGenerator[str, None]:
    """The events of a streamed response with several choices (n > 1), after choice 0's `first` delta came (or
    `pending`, the task still waiting for it: keep-alive comments meanwhile, as `stream_events`): each chunk carries
    one choice's piece under its index, as OpenAI interleaves them; then the usage of all of them."""

    heads = prompt_heads(generations)

    def event(chunk: BaseModel, index: int) -> str:
        for choice in chunk.choices:  # type: ignore[attr-defined]  # every chunk model has choices
            choice.index = index
        if continuous_usage:  # the chunk's own choice so far, as vLLM; the final usage chunk sums them all
            chunk.usage = choice_usage(generations, index, heads)  # type: ignore[attr-defined]
        return sse_event(chunk)

    try:
        if pending is not None:
            while not (await asyncio.wait({pending}, timeout=keepalive_s))[0]:
                yield KEEP_ALIVE
            if pending.result() is None:
                raise RuntimeError("the backend's stream ended without output")
            first = pending.result()
        generations[0].begin(first)
        for i, fmt in enumerate(fmts):
            for chunk in fmt.opening():
                yield event(chunk, i)
        running = set(range(len(generations)))
        while running:
            i, delta = await streams.next()
            if delta is None:
                raise RuntimeError("the backend's stream ended without a finish reason")
            piece = generations[i].absorb(delta)
            if piece is not None:
                yield event(fmts[i].chunk(piece), i)
            if generations[i].is_finished:
                running.discard(i)
                await streams.close(i)
        trace.get_current_span().set_attributes(usage_attributes(*generations))  # the request's span
        if include_usage:
            yield sse_event(fmts[0].usage_chunk(total_usage(generations)))
    except Exception as e:
        yield sse_event(_stream_error(e).body())
    finally:
        await streams.aclose()
    yield DONE


def _stream_error(e: Exception) -> APIError:
    """The error event for `e`, as errors.py answers it before the headers (generic for anything unexpected)."""
    trace.get_current_span().record_exception(e)
    if not isinstance(e, APIError | CapacityError | InvalidRequest | ServerError):
        logger.exception("streamed generation failed")  # the backend's own errors are its to log
    return backend_error(e)


class EventStreamResponse(StreamingResponse):
    """An SSE response that, however it ends (done, client disconnect, error), closes its event generator and the
    backend stream. Starlette only stops iterating on disconnect; and a generator cancelled before its first step
    never runs its `finally`, so the backend stream is closed here too."""

    def __init__(
        self,
        events: AsyncGenerator[str, None],
        deltas: AsyncIterator[GenerationDelta] | ChoiceStreams,
        pending: asyncio.Task[GenerationDelta | None] | None = None,
    ) -> None:
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._events, self._deltas, self._pending = events, deltas, pending

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:  # the events' own `finally` closes the stream when they started; else (or cut short) this does
                with anyio.CancelScope(shield=True):
                    await self._events.aclose()
            finally:
                self.release()

    def release(self) -> None:
        """Close the backend stream(s) in the background, whatever the events generator did (it may never have
        started: the headers could not go out). Synchronous, so a cancel cannot land before it."""
        if isinstance(self._deltas, ChoiceStreams):
            self._deltas.release()
        else:
            release_stream(self._deltas, self._pending)
