"""Several choices of one request (OpenAI's `n`, and a completion's batch of prompts): one backend generation per
choice, their deltas merged.

Choice 0 runs first; the others start once its first delta has come, when the prompt's KV blocks are in the
prefix cache, so they compute (and, disaggregated, move) only what the cache lacks: n choices share the prompt's
blocks. With a seed, choice i samples with seed + i (as vLLM does), so the choices differ and each is reproducible.
A batch's further prompts start then too (they hit what they share with the first one), each prompt's further
choices once its own first delta has come; choice j of prompt p has index p * n + j, as vLLM numbers them.

Every backend stream is closed on every path (a choice that finished early, an error, the client leaving): closing
is what aborts a request in the backend and frees its blocks.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace

import anyio

from pdserve.api.backend import Backend, GenerationDelta, GenerationRequest
from pdserve.api.generation import Generation, Piece, close_stream, first_delta, release_stream
from pdserve.api.protocol import PromptTokensDetails, Usage


def choice_requests(request: GenerationRequest, n: int) -> list[GenerationRequest]:
    """The backend requests of n choices: distinct ids, and seed + i when seeded."""
    if n == 1:
        return [request]
    first = f"{request.request_id}-0"
    return [
        replace(
            request,
            request_id=f"{request.request_id}-{i}",
            seed=None if request.seed is None else request.seed + i,
            shares_prompt_of=first if i > 0 else None,
        )
        for i in range(n)
    ]


def batch_requests(prompts: list[GenerationRequest], n: int) -> list[GenerationRequest]:
    """The backend requests of a batch of prompts (one request each, ids distinct), n choices each, in index order.
    The first prompt is admitted with room for the whole batch; the others are part of it (`batched_with`)."""
    groups = [choice_requests(prompt, n) for prompt in prompts]
    if len(groups) == 1:
        return groups[0]
    first = groups[0][0]
    total = sum(len(p.prompt_token_ids) for p in prompts)
    heads = [replace(first, batch_prompt_tokens=total)]
    heads += [replace(group[0], batched_with=first.request_id) for group in groups[1:]]
    return [request for head, group in zip(heads, groups, strict=True) for request in [head, *group[1:]]]


_END = object()


class ChoiceStreams:
    """The deltas of n backend streams, as (choice index, delta) in arrival order; a stream's end is (i, None)."""

    def __init__(self, backend: Backend, requests: list[GenerationRequest]) -> None:
        self._streams: list[AsyncIterator[GenerationDelta]] = [backend.generate(r) for r in requests]
        index = {r.request_id: i for i, r in enumerate(requests)}
        # The further choices of each prompt's first choice, which start once it has its first delta
        self._followers: dict[int, list[int]] = {}
        for i, r in enumerate(requests):
            if r.shares_prompt_of is not None:
                self._followers.setdefault(index[r.shares_prompt_of], []).append(i)
        self._queue: asyncio.Queue[tuple[int, object]] = asyncio.Queue()
        self._pumps: dict[int, asyncio.Task[None]] = {}
        self._closed: set[int] = set()
        self._first: asyncio.Task[GenerationDelta | None] | None = None  # `first()` running in a task of its own

    async def first(self) -> GenerationDelta | None:
        """Choice 0's first delta, pulled before any header goes out (its errors still get a status); then every
        other choice starts. Closes every stream if it raises."""
        try:
            delta = await first_delta(self._streams[0])
        except BaseException:
            self._first = None  # this task is ending: closing choice 0 must not wait for it
            await self.aclose()
            raise
        self._queue.put_nowait((0, delta if delta is not None else _END))
        if delta is not None:
            self._start(0, followers=False)
        followers = {i for group in self._followers.values() for i in group}
        for i in range(1, len(self._streams)):
            if i not in followers or i in self._followers.get(0, ()):
                self._start(i)
        return delta

    def first_soon(self) -> asyncio.Task[GenerationDelta | None]:
        """`first()` in a task of its own (a response may start before it ends), which `release` stops before it
        closes choice 0's stream."""
        self._first = asyncio.ensure_future(self.first())
        # Its failure is the response's error when a response reads it; with the client gone before that, nobody
        # does (a failed `first()` leaves the closing to no one waiting for it): retrieved here, never logged as lost.
        self._first.add_done_callback(lambda task: task.cancelled() or task.exception())
        return self._first

    async def next(self) -> tuple[int, GenerationDelta | None]:
        """The next delta of any open choice, or (i, None) at choice i's end. Raises what a backend stream raised."""
        while True:
            i, item = await self._queue.get()
            if i in self._closed:
                continue  # left over from a choice closed meanwhile
            if isinstance(item, BaseException):
                raise item
            return i, None if item is _END else item  # type: ignore[return-value]

    async def close(self, i: int) -> None:
        """Stop choice i (it finished, e.g. on a stop string): its backend request is aborted."""
        if i not in self._closed:
            self._closed.add(i)
            await close_stream(self._streams[i], self._pumps.pop(i, None))  # a pump still inside it stops first

    async def aclose(self) -> None:
        """Close every choice's stream and wait for that (a cancel stops only the waiting: see `release`)."""
        closings = self.release()
        if closings:
            with anyio.CancelScope(shield=True):
                await asyncio.shield(asyncio.gather(*closings))

    def release(self) -> list[asyncio.Task[None]]:
        """Start closing every choice not closed yet, each in a task of its own (`release_stream`): synchronous, so
        that no cancel of the caller's can land between two of them."""
        open_ = [i for i in range(len(self._streams)) if i not in self._closed]
        self._closed.update(open_)
        first, self._first = self._first, None  # still pulling choice 0's first delta, maybe
        return [
            release_stream(self._streams[i], self._pumps.pop(i, None) or (first if i == 0 else None)) for i in open_
        ]

    def _start(self, i: int, followers: bool = True) -> None:
        """Pump choice i's stream into the queue (unless it was closed meanwhile); with `followers`, its further
        choices start at its first delta."""
        if i not in self._closed:
            self._pumps[i] = asyncio.ensure_future(self._pump(i, followers and i in self._followers))

    async def _pump(self, i: int, lead: bool) -> None:
        stream = self._streams[i]
        try:
            async for delta in stream:
                self._queue.put_nowait((i, delta))
                if lead:  # its prompt's blocks are cached now
                    lead = False
                    for j in self._followers[i]:
                        self._start(j)
            self._queue.put_nowait((i, _END))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # handed to the reader, which answers it as the request's error
            self._queue.put_nowait((i, e))


async def collect_choices(streams: ChoiceStreams, generations: list[Generation]) -> list[Piece]:
    """Run every choice to its end (or its stop string) and return each one's output. Closes every stream."""
    try:
        if await streams.first() is None:
            raise RuntimeError("the backend's stream ended without output")
        running = set(range(len(generations)))
        while running:
            i, delta = await streams.next()
            if delta is None:
                raise RuntimeError("the backend's stream ended without a finish reason")
            generations[i].absorb(delta)
            if generations[i].is_finished:
                running.discard(i)
                await streams.close(i)
    finally:
        await streams.aclose()
    return [g.whole() for g in generations]


def prompt_heads(generations: list[Generation]) -> dict[str, Generation]:
    """Each prompt's first choice, by request id: the one that computed the prompt."""
    return {g.request.request_id: g for g in generations if g.request.shares_prompt_of is None}


def choice_usage(generations: list[Generation], index: int, heads: dict[str, Generation] | None = None) -> Usage:
    """Choice `index`'s usage so far (continuous usage stats), with its prompt's cache hit as the request reports it:
    the prompt's first choice's. The other choices start after its first token and hit the blocks it computed; their
    own hit (or the 0 of one not started yet, in its opening chunk) contradicted the final usage (found in review).
    `heads`: `prompt_heads(generations)`, computed once for a stream's chunks."""
    usage = generations[index].usage()
    head = generations[index].request.shares_prompt_of
    if head is None:
        return usage
    details = (heads or prompt_heads(generations))[head].usage().prompt_tokens_details
    return usage.model_copy(update={"prompt_tokens_details": details})


def total_usage(generations: list[Generation]) -> Usage:
    """The usage of n choices of each prompt: every prompt once (with its cache hit), every choice's completion
    tokens."""
    heads = [g.usage() for g in prompt_heads(generations).values()]
    prompt = sum(u.prompt_tokens for u in heads)
    cached = sum(u.prompt_tokens_details.cached_tokens for u in heads if u.prompt_tokens_details is not None)
    completion = sum(len(g.token_ids) for g in generations)
    return Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
    )  # fmt: skip
