"""One request's output as the backend streams it: final text, tokens and logprobs to report, finish reason.

The streaming and non-streaming paths share this state, so the same greedy request yields the same text either way.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import anyio
from opentelemetry.util.types import AttributeValue

from pdserve.api.backend import GenerationDelta, GenerationRequest, TokenLogprob
from pdserve.api.detokenizer import IncrementalDetokenizer
from pdserve.api.errors import SERVER_ERROR, APIError
from pdserve.api.protocol import PromptTokensDetails, Usage
from pdserve.telemetry import names

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Piece:
    """Output that became final: text, the tokens not reported before (with their logprobs), finish reason."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob]
    finish_reason: str | None
    prompt_logprobs: list[TokenLogprob] | None = None  # in the first piece, when asked for
    stop_reason: str | int | None = None  # vLLM's: the stop string or stop_token_ids id that ended it (EOS: None)


class Generation:
    def __init__(
        self,
        request: GenerationRequest,
        tokenizer: Any,
        stop: list[str],
        discard_output: bool = False,
        skip_special_tokens: bool = True,
        include_stop_str: bool = False,
        echo_overlap: int = 0,
    ) -> None:
        self.request = request
        self.discard_output = (
            discard_output  # scoring a prompt (echo, max_tokens 0): the one token generated is dropped
        )
        self.prompt_logprobs: list[TokenLogprob] | None = None
        self.detokenizer = IncrementalDetokenizer(
            tokenizer,
            stop,
            skip_special_tokens,
            request.prompt_token_ids,
            include_stop_str,
            request.min_tokens,
            echo_overlap,  # the echoed prompt's last characters that the output's text starts with (detokenizer.py)
        )
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.num_reported = 0  # tokens already handed out in a Piece
        self.num_cached_tokens = 0
        self.finish_reason: str | None = None

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None

    def begin(self, first: GenerationDelta | None) -> None:
        """What the first delta fixes before any output is reported (a stream's opening chunk shows it)."""
        if first is not None and not self.token_ids:
            self.num_cached_tokens = first.num_cached_tokens
            if first.prompt_logprobs is not None:  # only the first delta has them: an empty one before the first
                self.prompt_logprobs = first.prompt_logprobs  # token (a commit's ack) must not erase them

    def absorb(self, delta: GenerationDelta) -> Piece | None:
        """Take one backend delta; return what it made final, or None when nothing did (text still held back).
        Raises APIError when the backend aborted the request on its own: a truncated answer is not a success."""
        assert not self.is_finished, "delta after the finish"
        if delta.finish_reason == "abort":
            raise aborted_error()
        self.begin(delta)  # the prompt's cache hit is fixed where it was computed: the first delta says it
        if self.discard_output:
            self.finish_reason = "length"
            return self._piece("")
        # The token that ended the request as a stop token (EOS, stop_token_ids) is reported, but its text is not
        # output unless asked (vLLM's include_stop_str_in_output).
        is_stop_token = delta.finish_reason == "stop" and not self.detokenizer.include_stop_str
        taken_before = self.detokenizer.num_tokens
        text = self.detokenizer.add(delta.token_ids[:-1] if is_stop_token else delta.token_ids)
        # A stop string's last token ends the output: the delta's tokens after it are not reported (nor counted in
        # usage), so that what a request reports does not depend on how many tokens each delta carries.
        kept = self.detokenizer.num_tokens - taken_before if self.detokenizer.is_stopped else len(delta.token_ids)
        self.token_ids.extend(delta.token_ids[:kept])
        self.logprobs.extend((delta.logprobs or [])[:kept])
        if not self.detokenizer.is_stopped and delta.finish_reason is not None:
            text += self.detokenizer.flush()
            self.finish_reason = delta.finish_reason
        if self.detokenizer.is_stopped:
            self.finish_reason = "stop"  # a stop string matched, whatever ended the backend's stream
            # The backend is told why: it sees its stream closed (or, on the stream's last output, ended for
            # another reason — a stop string completing on the last token counted as "length"; found in review).
            self.request.ended_by_api.finish_reason = "stop"
        return self._piece(text) if text or self.is_finished else None

    def whole(self) -> Piece:
        """All the output, for a non-streaming response."""
        assert self.is_finished
        return Piece(
            self.detokenizer.text, self.token_ids, self.logprobs, self.finish_reason, self.prompt_logprobs,
            self.stop_reason(),
        )  # fmt: skip

    def stop_reason(self) -> str | int | None:
        """As vLLM: the stop string that ended the output, or the token of the request's stop_token_ids; None for
        EOS, a length or a running request."""
        if self.detokenizer.is_stopped:
            return self.detokenizer.stop_string
        is_stop_token = self.finish_reason == "stop" and self.token_ids
        return self.token_ids[-1] if is_stop_token and self.token_ids[-1] in self.request.stop_token_ids else None

    def usage(self) -> Usage:
        num_prompt_tokens = len(self.request.prompt_token_ids)
        return Usage(
            prompt_tokens=num_prompt_tokens,
            completion_tokens=len(self.token_ids),
            total_tokens=num_prompt_tokens + len(self.token_ids),
            prompt_tokens_details=PromptTokensDetails(cached_tokens=self.num_cached_tokens),
        )

    def _piece(self, text: str) -> Piece:
        start, self.num_reported = self.num_reported, len(self.token_ids)
        prompt_logprobs = self.prompt_logprobs if start == 0 else None  # with the first piece that goes out
        return Piece(
            text, self.token_ids[start:], self.logprobs[start:], self.finish_reason, prompt_logprobs, self.stop_reason()
        )


def aborted_error() -> APIError:
    """The backend aborted the request on its own (a replica drained or failed): 503, retry."""
    return APIError(
        503, "the server aborted the request; retry it", SERVER_ERROR, code="service_unavailable", retry_after_s=1.0
    )


async def first_delta(deltas: AsyncIterator[GenerationDelta]) -> GenerationDelta | None:
    """The backend's first delta, pulled before any response header is sent so that its errors get a status: they
    propagate to the app's handlers (errors.py: CapacityError 429/503, InvalidRequest 400, ServerError 503/500,
    anything else a generic 500), and so does an abort before any output (503, as `Generation.absorb` answers it
    unstreamed; a stream's client would otherwise get it as an error event after a 200, which SDKs do not retry).
    Closes the stream when it raises (without waiting: this may run as the `pending` task that a closing waits
    for)."""
    try:
        delta = await anext(deltas, None)
        if delta is not None and delta.finish_reason == "abort":
            raise aborted_error()
        return delta
    except BaseException:
        release_stream(deltas)
        raise


async def first_delta_within(
    deltas: AsyncIterator[GenerationDelta], wait_s: float
) -> tuple[GenerationDelta | None, asyncio.Task[GenerationDelta | None] | None]:
    """The first delta if it comes within `wait_s` (its errors then still get a status, as `first_delta`'s), else
    (None, the task still waiting for it): the response then starts, and its errors become stream events."""
    pending = asyncio.ensure_future(first_delta(deltas))
    try:
        done, _ = await asyncio.wait({pending}, timeout=wait_s)
    except asyncio.CancelledError:  # the client left — maybe just as the first delta came: close the stream
        release_stream(deltas, pending)
        raise
    return (pending.result(), None) if done else (None, pending)


async def collect(deltas: AsyncIterator[GenerationDelta], generation: Generation) -> Piece:
    """Run a request to its end (or its stop string) and return all its output. Always closes the stream."""
    try:
        delta = await first_delta(deltas)
        while delta is not None:
            generation.absorb(delta)
            if generation.is_finished:
                break
            delta = await anext(deltas, None)
    finally:
        await close_stream(deltas)
    if not generation.is_finished:
        raise RuntimeError("the backend's stream ended without a finish reason")
    return generation.whole()


async def close_stream(deltas: AsyncIterator[GenerationDelta], pending: asyncio.Task[Any] | None = None) -> None:
    """Close a backend stream (after stopping `pending`, a task inside it) and wait for that; the closing itself
    survives the caller's cancellation (`release_stream`), which then only stops the waiting."""
    closing = release_stream(deltas, pending)
    with anyio.CancelScope(shield=True):  # anyio's scopes (Starlette's) re-cancel at every await; this holds them
        await asyncio.shield(closing)  # a plain task.cancel() passes anyio's shield: this one holds the close


def release_stream(
    deltas: AsyncIterator[GenerationDelta], pending: asyncio.Task[Any] | None = None
) -> asyncio.Task[None]:
    """Start closing a backend stream in a task of its own: closing is what aborts the request in the backend,
    frees its KV blocks and ends its count in the router, so no cancellation of the caller's may cut it short, and
    a stream must never be left to the garbage collector (a reference cycle can keep it for minutes). Synchronous,
    for `except CancelledError:` and `finally:` blocks, where an await is where a second cancel lands. `pending`, a
    task pulling from the stream, is cancelled and waited for first (a running generator cannot be closed)."""
    if pending is not None:
        pending.cancel()
    closing = _closing.get(deltas)  # one closing per stream: a second would find the generator running
    if closing is None:
        closing = _closing[deltas] = asyncio.ensure_future(_close(deltas, pending))
        closing.add_done_callback(partial(_closed, deltas))
    return closing


_closing: dict[AsyncIterator[GenerationDelta], asyncio.Task[None]] = {}  # closings under way, by stream


async def _close(deltas: AsyncIterator[GenerationDelta], pending: asyncio.Task[Any] | None) -> None:
    if pending is not None:
        await asyncio.wait({pending})
        if not pending.cancelled():
            pending.exception()  # retrieved: its failure as the caller left is not logged as "never retrieved"
    if isinstance(deltas, AsyncGenerator):
        await deltas.aclose()


def _closed(deltas: AsyncIterator[GenerationDelta], closing: asyncio.Task[None]) -> None:
    del _closing[deltas]
    if not closing.cancelled() and (error := closing.exception()) is not None:
        logger.error("closing a backend stream failed", exc_info=error)


def usage_attributes(*generations: Generation) -> dict[str, AttributeValue]:
    """What the response carried, once it is complete: every choice's tokens, each choice's finish reason, the
    prompts' cache hits (each prompt's first choice's: the others reuse its blocks)."""
    return {
        names.GEN_AI_OUTPUT_TOKENS: sum(len(g.token_ids) for g in generations),
        names.GEN_AI_FINISH_REASONS: [g.finish_reason or "unknown" for g in generations],
        names.CACHED_TOKENS: sum(g.num_cached_tokens for g in generations if g.request.shares_prompt_of is None),
    }
