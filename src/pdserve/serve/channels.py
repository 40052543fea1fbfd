"""Output channels: one streamed message per engine step per (engine replica, ingress replica), not one per token.

Serve spends ~1-3 ms of CPU on every streamed message (DESIGN.md §5), so 16 streams of one token per step cost more
CPU than the model on a small box. Each ingress replica therefore holds one long-lived `outputs` stream per engine
replica it talks to (a channel); a request's own call still carries its control — where it landed, its errors, its
cancellation (closing the call aborts the request) — but its tokens travel with every other request's of the same
step, as plain tuples, in that step's one channel message.

A request's call, when the ingress names its channel, yields `StreamStart(replica_id, is_channeled)` first. If the
replica has no channel from that ingress yet, the outputs follow on the call itself (as without channels) and the
ingress opens a channel to that replica for later requests; if it has one, the outputs go to the channel and the
call ends with `StreamEnd(num_tokens)`. Nothing is ever lost silently: outputs carry their token index (a gap is
an error), a channel that breaks fails the requests it carried, and a call that ended with more tokens than arrived
fails after a grace period. Each such error is a server fault, so the failover rules apply (retry before the first
token, migration after it). A replica closes a channel that has carried nothing for `idle_close_s`: a replica
leaving the pool has then no stream left open, and Serve's graceful shutdown does not wait for one.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from pdserve.engine import FinishReason, RequestOutput
from pdserve.engine.request import TokenLogprob
from pdserve.serve.failover import foreign_cancel_as_fault

logger = logging.getLogger(__name__)
_MISSING_GRACE_S = 10.0  # a call ended: how long its last channeled outputs may still be on their way

# (request_id, index of its first new token, token ids, logprobs, finish reason, prompt tokens, cached, queue_s,
#  prompt logprobs)
Packed = tuple[str, int, list[int], list[TokenLogprob] | None, str | None, int, int, float, list[TokenLogprob] | None]


@dataclass(frozen=True)
class StreamStart:
    """A request's call reached `replica_id`; its outputs follow on the channel or, if not, on the call."""

    replica_id: str
    is_channeled: bool


@dataclass(frozen=True)
class StreamEnd:
    """A channeled call's last message: how many tokens, and outputs, it handed to its channel (a final output
    may carry no token: counting tokens alone, its loss went unnoticed and the request waited forever)."""

    num_tokens: int
    num_outputs: int


class ChannelLost(RuntimeError):
    """Outputs of a request went missing between its replica and this ingress (a server fault: failover applies)."""


def pack(out: RequestOutput, index: int) -> Packed:
    finish = out.finish_reason.value if out.finish_reason is not None else None
    return (out.request_id, index, out.new_token_ids, out.new_logprobs, finish, out.num_prompt_tokens,
            out.num_cached_tokens, out.queue_s, out.prompt_logprobs)  # fmt: skip


def unpack(packed: Packed) -> tuple[int, RequestOutput]:
    request_id, index, token_ids, logprobs, finish, num_prompt, num_cached, queue_s, prompt_logprobs = packed
    reason = FinishReason(finish) if finish is not None else None
    return index, RequestOutput(
        request_id, token_ids, logprobs, reason, num_prompt, num_cached, queue_s=queue_s,
        prompt_logprobs=prompt_logprobs,
    )  # fmt: skip


# ---- the engine replica's end ---------------------------------------------------------------------------------


class _Outbox:
    def __init__(self) -> None:
        self.items: list[Packed] = []
        self.num_users = 0  # requests whose outputs go here
        self.is_closed = False
        self._ready = asyncio.Event()

    def put(self, item: Packed) -> None:
        self.items.append(item)
        self._ready.set()

    async def take(self, timeout_s: float) -> list[Packed]:
        """Everything queued, waiting up to `timeout_s` for the first item ([] if none came). Requests woken by one
        engine step put their outputs in one event-loop turn, before this wakes: one step, one batch. What arrived
        while the timeout was being handled (wait_for takes loop turns to cancel its waiter) is returned too: the
        caller may close the channel on an empty batch, and an output left behind would be lost."""
        if not self.items:
            # Not wait_for: on Python 3.11 a cancel landing as an item arrives is swallowed there (gh-86296), and
            # the channel's stream outlived its own cancel, taking the ingress's next outputs unread.
            waiter = asyncio.ensure_future(self._ready.wait())
            try:
                await asyncio.wait({waiter}, timeout=timeout_s)
            finally:
                waiter.cancel()
        self._ready.clear()
        items, self.items = self.items, []
        return items


class ReplicaChannels:
    """An engine replica's channels, by the id of the ingress replica reading each."""

    def __init__(self, replica_id: str, idle_close_s: float = 2.0) -> None:
        self.replica_id = replica_id
        self.idle_close_s = idle_close_s
        self._open: dict[str, _Outbox] = {}

    async def serve(self, channel_id: str) -> AsyncGenerator[list[Packed], None]:
        """The channel's stream: `[]` once (it is open), then a batch per engine step that produced outputs for it;
        ends after `idle_close_s` without outputs or users (checked in the same loop turn as the batch was taken, so
        no user can have put anything unsent). A second stream for the same id replaces the first."""
        if (old := self._open.pop(channel_id, None)) is not None:
            old.is_closed = True
        outbox = self._open[channel_id] = _Outbox()
        try:
            yield []
            while True:
                batch = await outbox.take(self.idle_close_s)
                if batch:
                    yield batch
                elif outbox.num_users == 0:
                    return
        finally:
            outbox.is_closed = True
            if self._open.get(channel_id) is outbox:
                del self._open[channel_id]

    async def relay(
        self, channel_id: str | None, outputs: AsyncGenerator[RequestOutput, None]
    ) -> AsyncGenerator[RequestOutput | StreamStart | StreamEnd, None]:
        """A request call's stream: `outputs` as they are (no channel named), or StreamStart, then the outputs on
        the channel if it is open here (else on the call), then StreamEnd. However this ends, `outputs` is closed
        at once (the engine aborts an unfinished request then, not whenever the garbage collector gets to it)."""
        # The inner generator closed at once too: left to the garbage collector, its channel kept a user.
        async with aclosing(outputs), aclosing(self._relay(channel_id, outputs)) as items:
            async for item in items:
                yield item

    async def _relay(
        self, channel_id: str | None, outputs: AsyncIterator[RequestOutput]
    ) -> AsyncGenerator[RequestOutput | StreamStart | StreamEnd, None]:
        if channel_id is None:
            async for out in outputs:
                yield out
            return
        outbox = self._open.get(channel_id)
        if outbox is None:
            yield StreamStart(self.replica_id, is_channeled=False)
            async for out in outputs:
                yield out
            return
        outbox.num_users += 1
        num_tokens = num_outputs = 0
        try:
            yield StreamStart(self.replica_id, is_channeled=True)
            async for out in outputs:
                if outbox.is_closed:
                    raise ChannelLost(f"the channel carrying {out.request_id} closed")
                outbox.put(pack(out, num_tokens))
                num_tokens += len(out.new_token_ids)
                num_outputs += 1
        finally:
            outbox.num_users -= 1
        yield StreamEnd(num_tokens, num_outputs)


# ---- the ingress's end ----------------------------------------------------------------------------------------


class _Inbox:
    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.replica_id: str | None = None
        self.is_channeled = False
        self.num_tokens = 0  # tokens received so far
        self.num_outputs = 0  # outputs received so far
        self.queue: asyncio.Queue[RequestOutput | StreamStart | BaseException] = asyncio.Queue()

    def put_output(self, out: RequestOutput, index: int | None = None) -> None:
        if index is not None and index != self.num_tokens:
            self.fail(ChannelLost(f"{self.request_id}: tokens from {self.num_tokens} missing, got {index}"))
            return
        self.num_tokens += len(out.new_token_ids)
        self.num_outputs += 1
        self.queue.put_nowait(out)

    def fail(self, error: BaseException) -> None:
        self.queue.put_nowait(error)


class IngressChannels:
    """An ingress replica's channels to the engine replicas, and the requests waiting on them."""

    def __init__(self) -> None:
        self.channel_id = uuid.uuid4().hex
        self._inboxes: dict[str, _Inbox] = {}
        self._readers: dict[str, asyncio.Task[None]] = {}  # replica id -> its channel's reader (opening or open)

    @property
    def open_replicas(self) -> set[str]:
        return set(self._readers)

    async def stream(
        self, handle: Any, call: Any, request_id: str, yield_start: bool = False
    ) -> AsyncGenerator[RequestOutput, None]:
        """The outputs of `call` (a streaming call made with `channel_id=self.channel_id`), wherever they travel.
        `yield_start`: an empty output first, when the call has reached its replica (the handoff's acknowledgement).
        Closing this before the last output cancels the call (the replica aborts the request)."""
        if request_id in self._inboxes:
            raise ValueError(f"request id {request_id!r} is already streaming")
        inbox = self._inboxes[request_id] = _Inbox(request_id)
        relay = asyncio.ensure_future(self._relay(handle, call, inbox))
        is_done, is_started = False, not yield_start
        try:
            while not is_done:
                item = await inbox.queue.get()
                if isinstance(item, BaseException):
                    raise item
                if not is_started:  # the call's start or, on another stream and so maybe sooner, an output
                    is_started = True
                    yield RequestOutput(request_id, [], None, None, 0, 0)
                if isinstance(item, StreamStart):
                    continue
                is_done = item.finish_reason is not None
                yield item
        finally:
            del self._inboxes[request_id]
            relay.cancel()
            if not is_done:
                call.cancel()

    async def _relay(self, handle: Any, call: Any, inbox: _Inbox) -> None:
        """The request's own call: its start, its outputs when they come this way, its end or error."""
        try:
            with foreign_cancel_as_fault(f"the stream of {inbox.request_id}"):
                async for item in call:
                    if isinstance(item, StreamStart):
                        inbox.replica_id, inbox.is_channeled = item.replica_id, item.is_channeled
                        if item.replica_id not in self._readers:
                            self._open(handle, item.replica_id)  # for the requests after this one
                            if item.is_channeled:
                                # The replica still holds a channel of ours that nobody here read (its reader
                                # broke and the stream lives on there): the new one replaces it; this request,
                                # which has shown nothing yet, fails as a server fault (retried elsewhere).
                                raise ChannelLost(f"{inbox.request_id}: the channel from {item.replica_id} is not read")
                        inbox.queue.put_nowait(item)
                    elif isinstance(item, StreamEnd):
                        await self._await_delivery(inbox, item)
                        break
                    else:
                        inbox.put_output(item)
        except asyncio.CancelledError:  # stream() is done with it
            raise
        except BaseException as e:
            inbox.fail(e)
            return
        # Every output the call sent has arrived (stream() stops at a final one, before this): a stream without one
        # would otherwise wait for ever.
        inbox.fail(ChannelLost(f"{inbox.request_id}: the stream ended without a finish reason"))

    async def _await_delivery(self, inbox: _Inbox, end: StreamEnd) -> None:
        """The call ended after handing `end`'s outputs to the channel: they should arrive soon; if not, fail."""
        deadline = asyncio.get_running_loop().time() + _MISSING_GRACE_S
        while inbox.num_tokens < end.num_tokens or inbox.num_outputs < end.num_outputs:
            if asyncio.get_running_loop().time() > deadline:
                missing = f"{end.num_tokens - inbox.num_tokens} tokens ({end.num_outputs - inbox.num_outputs} outputs)"
                inbox.fail(ChannelLost(f"{inbox.request_id}: {missing} never arrived"))
                return
            await asyncio.sleep(0.05)

    def _open(self, handle: Any, replica_id: str) -> None:
        if replica_id in self._readers:
            return
        # Outside the request's context: Serve cancels every call made in a request's context when its client
        # leaves, and this channel outlives the request that opened it.
        task = contextvars.Context().run(asyncio.ensure_future, self._read(handle, replica_id))
        self._readers[replica_id] = task

    async def _read(self, handle: Any, replica_id: str) -> None:
        is_clean = False
        batches = None
        try:
            batches = handle.options(stream=True).outputs.remote(self.channel_id, target_replica_id=replica_id)
            with foreign_cancel_as_fault(f"the output channel from {replica_id}"):  # a replica's cancel: a break
                async for batch in batches:
                    for packed in batch:
                        if (inbox := self._inboxes.get(packed[0])) is not None:
                            index, out = unpack(packed)
                            inbox.put_output(out, index)
            is_clean = True
        except Exception as e:
            logger.warning("output channel from replica %s broke: %r", replica_id, e)
        finally:
            if not is_clean and batches is not None:  # dropping the stream here does not end it on the replica,
                batches.cancel()  # which would go on taking this channel's outputs, unread
            if self._readers.get(replica_id) is asyncio.current_task():
                del self._readers[replica_id]
            if not is_clean:
                for inbox in list(self._inboxes.values()):
                    if inbox.replica_id == replica_id and inbox.is_channeled:
                        inbox.fail(ChannelLost(f"the output channel from replica {replica_id} broke"))
