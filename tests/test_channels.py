"""Output channels (serve/channels.py) between fake replicas and one ingress, in one event loop: every stream gets
exactly its tokens or an error, never a wrong or missing token with a normal end; one channel message per step.

The fake replica steps all its requests at once (as AsyncEngine delivers a step's outputs in one callback); a call
is a task whose yields cross a queue, as Serve's streams do, and its cancellation cancels that task. Randomized
schedules: arrivals, lengths from 1 token, consumers that leave, channels that break, replicas that die."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import pytest

from pdserve.engine import FinishReason, RequestOutput
from pdserve.serve import channels as channels_module
from pdserve.serve.channels import ChannelLost, IngressChannels, ReplicaChannels, StreamEnd, StreamStart


class FakeCall:
    """A streaming call: the replica's generator runs in its own task; items cross a queue."""

    def __init__(self, agen: AsyncGenerator[Any, None], hop_s: float = 0.0, first_hop_s: float = 0.0) -> None:
        self._items: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._hop_s, self._first_hop_s = hop_s, first_hop_s
        self.task = asyncio.ensure_future(self._pump(agen))

    async def _pump(self, agen: AsyncGenerator[Any, None]) -> None:
        try:
            async for item in agen:
                self._items.put_nowait(("item", item))
                await asyncio.sleep(self._hop_s)
            self._items.put_nowait(("end", None))
        except BaseException as e:
            self._items.put_nowait(("error", RuntimeError(f"call failed: {e!r}")))
            if isinstance(e, asyncio.CancelledError):  # cancelled between two items: close the generator, as its
                await agen.aclose()  # finalizer does once Serve drops it
            raise

    def __aiter__(self) -> FakeCall:
        return self

    async def __anext__(self) -> Any:
        if self._first_hop_s:  # the call's messages lag behind the channel's (the replica runs ahead)
            await asyncio.sleep(self._first_hop_s)
            self._first_hop_s = 0.0
        kind, value = await self._items.get()
        if kind == "item":
            return value
        if kind == "end":
            raise StopAsyncIteration
        raise value

    def cancel(self) -> None:
        self.task.cancel()


class FakeReplica:
    """Steps every running request each tick; request i yields its planned tokens, then finishes."""

    def __init__(self, replica_id: str, tick_s: float = 0.002) -> None:
        self.replica_id = replica_id
        self.channels = ReplicaChannels(replica_id, idle_close_s=0.05)
        self.tick_s = tick_s
        self._queues: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self._plans: dict[str, list[int]] = {}
        self.aborted: set[str] = set()
        self.is_dead = False
        self.channel_calls: list[FakeCall] = []
        self._stepper = asyncio.ensure_future(self._step_forever())

    async def _step_forever(self) -> None:
        while True:
            await asyncio.sleep(self.tick_s)
            outputs = []
            for request_id, plan in list(self._plans.items()):
                token = plan.pop(0)
                finish = FinishReason.LENGTH if not plan else None
                outputs.append(RequestOutput(request_id, [token], None, finish, 3, 0))
                if not plan:
                    del self._plans[request_id]
            for out in outputs:  # one step's outputs, delivered together
                self._queues[out.request_id].put_nowait(out)

    async def _engine(self, request_id: str, tokens: list[int]) -> AsyncIterator[RequestOutput]:
        if self.is_dead:  # a call that reaches a dead actor fails
            raise RuntimeError("replica died")
        queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._queues[request_id], self._plans[request_id] = queue, list(tokens)
        is_finished = False
        try:
            while not is_finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                is_finished = item.finish_reason is not None
                yield item
        finally:
            if not is_finished:
                self._plans.pop(request_id, None)
                self.aborted.add(request_id)
            del self._queues[request_id]

    async def generate(self, request_id: str, tokens: list[int], channel_id: str | None) -> AsyncIterator[Any]:
        async for item in self.channels.relay(channel_id, self._engine(request_id, tokens)):
            yield item

    def die(self) -> None:
        self.is_dead = True
        self._stepper.cancel()
        for queue in self._queues.values():
            queue.put_nowait(RuntimeError("replica died"))
        for call in self.channel_calls:
            call.cancel()


class FakeHandle:
    """`handle.options(stream=True).outputs.remote(channel_id, target_replica_id=...)` as the ingress calls it."""

    def __init__(self, replicas: dict[str, FakeReplica]) -> None:
        self.replicas = replicas
        self.outputs = self

    def options(self, stream: bool) -> FakeHandle:
        return self

    def remote(self, channel_id: str, target_replica_id: str) -> FakeCall:
        replica = self.replicas[target_replica_id]
        call = FakeCall(replica.channels.serve(channel_id))
        if replica.is_dead:
            call.cancel()
        replica.channel_calls.append(call)
        return call


async def _with_open_channel() -> tuple[FakeReplica, FakeHandle, IngressChannels]:
    """A replica, and an ingress whose channel to it is open (a first request opened it)."""
    replica = FakeReplica("r0")
    handle, ingress = FakeHandle({"r0": replica}), IngressChannels()
    await _collect(ingress.stream(handle, FakeCall(replica.generate("w", [1], ingress.channel_id)), "w"))
    await asyncio.sleep(0.01)
    return replica, handle, ingress


async def _collect(stream: AsyncIterator[RequestOutput]) -> tuple[list[int], str | None]:
    tokens: list[int] = []
    finish = None
    async for out in stream:
        tokens.extend(out.new_token_ids)
        finish = out.finish_reason.value if out.finish_reason else None
    return tokens, finish


def test_the_first_request_opens_the_channel_and_later_ones_use_it() -> None:
    async def main() -> None:
        replica = FakeReplica("r0")
        handle, ingress = FakeHandle({"r0": replica}), IngressChannels()
        tokens = [5, 6, 7]
        first = FakeCall(replica.generate("a", tokens, ingress.channel_id))
        assert await _collect(ingress.stream(handle, first, "a")) == (tokens, "length")
        await asyncio.sleep(0.01)
        assert ingress.open_replicas == {"r0"}
        sent: list[int] = []
        original = replica.channels._open[ingress.channel_id].put
        replica.channels._open[ingress.channel_id].put = lambda item: (sent.append(1), original(item))  # type: ignore
        calls = [FakeCall(replica.generate(f"b{i}", list(range(i, i + 9)), ingress.channel_id)) for i in range(4)]
        results = await asyncio.gather(*[_collect(ingress.stream(handle, c, f"b{i}")) for i, c in enumerate(calls)])
        assert results == [(list(range(i, i + 9)), "length") for i in range(4)]
        assert len(sent) == 4 * 9  # every output went through the channel, none on the calls
        await asyncio.sleep(0.2)
        assert ingress.open_replicas == set()  # idle: the replica closed it

    asyncio.run(main())


def test_one_channel_message_per_step(monkeypatch: pytest.MonkeyPatch) -> None:
    batches: list[int] = []
    take = channels_module._Outbox.take

    async def counted(self: Any, timeout_s: float) -> list[Any]:
        batch = await take(self, timeout_s)
        if batch:
            batches.append(len(batch))
        return batch

    monkeypatch.setattr(channels_module._Outbox, "take", counted)

    async def main() -> None:
        replica = FakeReplica("r0", tick_s=0.01)
        handle, ingress = FakeHandle({"r0": replica}), IngressChannels()
        await _collect(ingress.stream(handle, FakeCall(replica.generate("w", [1], ingress.channel_id)), "w"))
        await asyncio.sleep(0.02)
        calls = [FakeCall(replica.generate(f"s{i}", [i] * 6, ingress.channel_id)) for i in range(16)]
        await asyncio.gather(*[_collect(ingress.stream(handle, c, f"s{i}")) for i, c in enumerate(calls)])
        assert sum(batches) == 16 * 6
        assert len(batches) <= 6 + 2, batches  # a step's 16 outputs in one message (start skew: a step or two)

    asyncio.run(main())


def test_the_acknowledgement_comes_first_even_when_tokens_overtake_it() -> None:
    """The handoff takes the first item as the call's acknowledgement: an output that arrives on the channel before
    the call's StreamStart must not be taken for it (a token lost with a 200 otherwise)."""

    async def main() -> None:
        replica, handle, ingress = await _with_open_channel()
        call = FakeCall(replica.generate("a", [7, 8, 9], ingress.channel_id), first_hop_s=0.05)
        items = [out async for out in ingress.stream(handle, call, "a", yield_start=True)]
        assert items[0].new_token_ids == [] and items[0].finish_reason is None
        assert [t for out in items[1:] for t in out.new_token_ids] == [7, 8, 9]

    asyncio.run(main())


def test_a_gap_is_an_error_never_a_short_stream() -> None:
    async def main() -> None:
        replica, handle, ingress = await _with_open_channel()
        outbox = replica.channels._open[ingress.channel_id]
        original = outbox.put
        dropped: list[int] = []

        def lossy(item: Any) -> None:
            if item[1] == 2 and not dropped:  # lose the output starting at token 2
                dropped.append(1)
                return
            original(item)

        outbox.put = lossy  # type: ignore[method-assign]
        call = FakeCall(replica.generate("g", [1, 2, 3, 4, 5], ingress.channel_id))
        seen: list[int] = []
        with pytest.raises(ChannelLost):
            async for out in ingress.stream(handle, call, "g"):
                seen.extend(out.new_token_ids)
        assert seen == [1, 2]

    asyncio.run(main())


def test_missing_last_tokens_fail_after_the_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(channels_module, "_MISSING_GRACE_S", 0.1)

    async def main() -> None:
        replica, handle, ingress = await _with_open_channel()
        outbox = replica.channels._open[ingress.channel_id]
        original = outbox.put
        outbox.put = lambda item: None if item[4] is not None else original(item)  # type: ignore[method-assign]
        call = FakeCall(replica.generate("g", [1, 2, 3], ingress.channel_id))
        with pytest.raises(ChannelLost, match="never arrived"):
            await asyncio.wait_for(_collect(ingress.stream(handle, call, "g")), 5)

    asyncio.run(main())


def test_an_output_put_as_the_idle_timeout_fires_is_sent_before_the_channel_closes() -> None:
    """A request's last output put while `take`'s timeout was being handled (wait_for needs loop turns to cancel
    its waiter), its user gone in the same turn: the channel closed with the output unsent, and the request failed
    10 s later (found in review: lost at 34 of 400 offsets). Swept across the timeout in 10 µs steps."""

    async def trial(offset_s: float) -> bool:
        channels = ReplicaChannels("r0", idle_close_s=0.01)
        stream = channels.serve("c")
        assert await anext(stream) == []
        outbox = channels._open["c"]
        outbox.num_users = 1  # a request relayed on the channel, silent until its final output
        loop = asyncio.get_running_loop()
        start = loop.time()
        got: list[Any] = []

        async def read() -> None:
            async for batch in stream:
                got.extend(batch)

        def final_output() -> None:  # what `relay` does in one turn: put the final output, then leave
            outbox.put(("q", 0, [42], None, "length", 3, 0, 0.0, None))
            outbox.num_users -= 1

        loop.call_at(start + 0.01 + offset_s, final_output)
        await asyncio.wait_for(read(), 5)
        return bool(got)

    async def main() -> None:
        lost = [offset for i in range(200) if not await trial(offset := (i - 100) * 1e-5)]
        assert not lost, f"lost at offsets {lost}"

    asyncio.run(main())


def test_a_channel_cancelled_as_an_output_arrives_ends() -> None:
    """The channel's stream cancelled (the ingress dropped it) 0-3 loop turns after an output was put: on Python 3.11
    `wait_for` swallowed a cancel landing as its waiter completed (gh-86296), so the stream went on, registered,
    taking the ingress's next outputs unread (found in review)."""

    async def trial(turns: int) -> None:
        channels = ReplicaChannels("r0", idle_close_s=5.0)
        got: list[Any] = []

        async def read() -> None:
            async for batch in channels.serve("c"):
                got.append(batch)

        task = asyncio.ensure_future(read())
        while not got:
            await asyncio.sleep(0)
        outbox = channels._open["c"]
        outbox.num_users = 1
        outbox.put(("q", 0, [42], None, None, 3, 0, 0.0, None))
        for _ in range(turns):
            await asyncio.sleep(0)
        task.cancel()
        await asyncio.wait({task}, timeout=1.0)
        assert task.cancelled(), f"{turns} turns after the output: the stream outlived its cancel"
        assert "c" not in channels._open

    async def main() -> None:
        for turns in range(4):
            await trial(turns)

    asyncio.run(main())


def test_a_relay_closed_after_its_start_leaves_the_channel_at_once() -> None:
    """A request call closed right after its StreamStart: its inner generator was left to the garbage collector,
    the channel counting the request as a user until then (for ever while anything held it)."""

    async def outputs() -> AsyncGenerator[RequestOutput, None]:
        await asyncio.sleep(0)
        yield RequestOutput("a", [1], None, None, 1, 0)

    async def main() -> None:
        channels = ReplicaChannels("r0", idle_close_s=5.0)
        stream = channels.serve("c")
        assert await anext(stream) == []
        relay = channels.relay("c", outputs())
        assert isinstance(await anext(relay), StreamStart) and channels._open["c"].num_users == 1
        await relay.aclose()
        assert channels._open["c"].num_users == 0
        await stream.aclose()

    asyncio.run(main())


class _ScriptedCall:
    """A call whose messages are `items`, then its end; the outputs it claims went to a channel never come."""

    def __init__(self, items: list[Any]) -> None:
        self.items = list(items)
        self.cancelled = False

    def __aiter__(self) -> _ScriptedCall:
        return self

    async def __anext__(self) -> Any:
        await asyncio.sleep(0.001)
        if not self.items:
            raise StopAsyncIteration
        return self.items.pop(0)

    def cancel(self) -> None:
        self.cancelled = True


@pytest.mark.parametrize(
    ("items", "error"),
    [
        # a final output without tokens (a commit's immediate finish, an abort) lost on the channel: counting tokens
        # alone, the call's end matched what had arrived, and the request waited for ever
        ([StreamStart("r0", True), StreamEnd(0, 1)], "never arrived"),
        ([StreamStart("r0", True), StreamEnd(0, 0)], "without a finish reason"),  # nothing ever sent
        ([StreamStart("r0", False), RequestOutput("q", [4], None, None, 3, 0)], "without a finish reason"),
    ],
)
def test_a_stream_that_can_no_longer_finish_fails_instead_of_waiting_for_ever(
    monkeypatch: pytest.MonkeyPatch, items: list[Any], error: str
) -> None:
    monkeypatch.setattr(channels_module, "_MISSING_GRACE_S", 0.1)

    async def main() -> None:
        ingress = IngressChannels()
        ingress._readers["r0"] = asyncio.ensure_future(asyncio.sleep(100))  # open, and delivering nothing
        ingress._open = lambda handle, replica_id: None  # type: ignore[method-assign]
        seen: list[int] = []
        with pytest.raises(ChannelLost, match=error):
            async for out in ingress.stream(None, _ScriptedCall(items), "q"):
                seen.extend(out.new_token_ids)
        assert seen == ([4] if not items[0].is_channeled else [])
        ingress._readers["r0"].cancel()

    asyncio.run(asyncio.wait_for(main(), 5))


@pytest.mark.parametrize("cancel_reaches_the_replica", [True, False])
def test_a_channel_broken_on_the_ingress_side_is_replaced(cancel_reaches_the_replica: bool) -> None:
    """The ingress's read of a channel fails while the replica lives on (a transient error in transit): the stream
    must be cancelled there too, else the replica goes on taking this channel's outputs, unread, and tells every
    later request it is channeled — each then failed after the grace, for as long as traffic kept it open (found
    in review). If the cancel does not reach it, the next request fails at once (it has shown nothing: retried) and
    the channel is reopened for those after it."""

    async def main() -> None:
        replica, handle, ingress = await _with_open_channel()
        broken = replica.channel_calls[-1]
        if not cancel_reaches_the_replica:
            broken.cancel = lambda: None  # type: ignore[method-assign]
        broken._items.put_nowait(("error", RuntimeError("lost in transit")))  # the replica's side runs on
        await asyncio.sleep(0.01)
        assert ingress.open_replicas == set()
        if cancel_reaches_the_replica:
            assert ingress.channel_id not in replica.channels._open, "the replica still holds the broken channel"
        else:
            call = FakeCall(replica.generate("a", [1, 2], ingress.channel_id))
            with pytest.raises(ChannelLost, match="not read"):
                await asyncio.wait_for(_collect(ingress.stream(handle, call, "a")), 1)  # not after the grace
        for i in range(3):
            tokens = [i, i + 1, i + 2]
            call = FakeCall(replica.generate(f"b{i}", tokens, ingress.channel_id))
            assert await asyncio.wait_for(_collect(ingress.stream(handle, call, f"b{i}")), 1) == (tokens, "length")
        assert ingress.open_replicas == {"r0"}

    asyncio.run(main())


@pytest.mark.parametrize("seed", range(40))
def test_random_schedules(seed: int) -> None:
    """Arrivals, lengths from 1, consumers leaving, channels breaking, a replica dying: every stream that ends
    normally has exactly its tokens; one that fails has a prefix of them, and only on a replica that died or whose
    channel broke (any error counted as an allowed failure before; found in review); every stream ends; nothing
    stays open."""
    rng = random.Random(seed)

    async def main() -> None:
        replicas = {f"r{i}": FakeReplica(f"r{i}", tick_s=rng.choice([0.001, 0.003])) for i in range(3)}
        handle, ingress = FakeHandle(replicas), IngressChannels()
        outcomes: dict[str, str] = {}
        failed_on: dict[str, str] = {}  # request id -> the replica its stream failed on
        disturbed: set[str] = set()  # replicas that died or had their channel cut

        async def one(i: int) -> None:
            await asyncio.sleep(rng.uniform(0, 0.1))
            replica = replicas[rng.choice(list(replicas))]
            request_id = f"q{i}"
            tokens = [rng.randrange(1000) for _ in range(rng.choice([1, 1, 2, 5, 17, 40]))]
            leave_after = rng.choice([None, None, None, 0, 1, 3])
            if replica.is_dead:
                return
            call = FakeCall(
                replica.generate(request_id, tokens, ingress.channel_id),
                hop_s=rng.choice([0, 0.001]), first_hop_s=rng.choice([0, 0, 0.01]),
            )  # fmt: skip
            yield_start = rng.random() < 0.5  # the handoff's decode call: an empty acknowledgement first
            seen: list[int] = []
            stream = ingress.stream(handle, call, request_id, yield_start=yield_start)
            try:
                async for out in stream:
                    if yield_start:
                        assert not out.new_token_ids and out.finish_reason is None, "the acknowledgement first"
                        yield_start = False
                        continue
                    seen.extend(out.new_token_ids)
                    if leave_after is not None and len(seen) > leave_after:
                        outcomes[request_id] = "left"
                        break
                else:
                    assert seen == tokens, (request_id, seen, tokens)
                    outcomes[request_id] = "done"
            except (ChannelLost, RuntimeError):
                outcomes[request_id] = "failed"
                failed_on[request_id] = replica.replica_id
            finally:
                await stream.aclose()  # type: ignore[attr-defined]
            assert seen == tokens[: len(seen)]

        async def chaos() -> None:
            for _ in range(rng.choice([0, 1, 3])):
                await asyncio.sleep(rng.uniform(0.01, 0.1))
                victim = replicas[rng.choice(list(replicas))]
                disturbed.add(victim.replica_id)
                if rng.random() < 0.3:
                    victim.die()
                else:
                    for call in victim.channel_calls:
                        call.cancel()  # the channel breaks; the replica lives on

        await asyncio.wait_for(asyncio.gather(chaos(), *[one(i) for i in range(60)]), 30)
        await asyncio.sleep(0.3)
        assert "done" in outcomes.values()
        assert set(failed_on.values()) <= disturbed, (failed_on, disturbed)
        for replica in replicas.values():
            assert not replica._queues, f"{replica.replica_id} still streams {list(replica._queues)}"
        assert not ingress._inboxes

    asyncio.run(main())
