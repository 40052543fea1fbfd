"""Drives an `LLMEngine` from one dedicated thread, for callers on an asyncio event loop.

The engine is not thread-safe, so every call into it runs on the engine thread: the event loop submits commands
that run between two steps, and each step's outputs are handed back to per-request asyncio queues. A step can
take ~100 ms on CPU; nothing here blocks the event loop for that long.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from dataclasses import replace
from functools import partial
from typing import Any, TypeVar

import torch

from pdserve.engine import native
from pdserve.engine.cores import CoreShare
from pdserve.engine.engine import LLMEngine
from pdserve.engine.errors import EngineDeadError, EngineWedgedError
from pdserve.engine.request import (
    EngineRequest,
    EngineStats,
    FinishReason,
    KVReservation,
    LayerSink,
    RequestOutput,
    TokenLogprob,
)
from pdserve.faults import fault_point

logger = logging.getLogger(__name__)
T = TypeVar("T")
_IDLE_WAIT_S = 0.05
_REAP_PERIOD_S = 0.25


class AsyncEngine:
    def __init__(
        self,
        engine: LLMEngine | Callable[[], LLMEngine],
        num_threads: int | None = None,
        stream_interval: int = 1,
        cores: CoreShare | None = None,
    ) -> None:
        """`engine`: the engine, or a function that builds it — then it is built on the engine thread itself (this
        waits for it), which steps it ~15-20% faster on CPU than an engine built on another thread (measured:
        SmolLM2 bf16, 16 x (256 -> 64): 4.9-5.2 s vs 4.1-4.3 s; weights prepacked, and oneDNN's and OpenMP's
        per-thread state made, on the thread that uses them).
        `num_threads`: torch's intra-op threads for the engine thread (None: torch's default for a new thread).
        torch's thread count is per calling thread under OpenMP: set on another thread, it never reaches ours.
        `stream_interval`: a stream's outputs after its first carry at least this many tokens (or the end): fewer,
        larger messages downstream (vLLM's --stream-interval).
        `cores`: the node's core sharing (engine/cores.py): each step runs with the threads it gets there (its own
        cores plus those it borrowed from idle peers), and an idle engine lends its own."""
        self.num_threads = num_threads
        self.cores = cores
        self._team: list[int] = []  # the cores the engine thread's torch threads were last pinned to
        self._pin_threads: Callable[[list[int]], int] | None = None
        self.stream_interval = stream_interval
        self._loop: asyncio.AbstractEventLoop | None = None
        self._commands: queue.SimpleQueue[Callable[[], object]] = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._streams: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}  # open streams, by request id
        # The stream each request the engine knows sends to — touched on the engine thread only. Outputs are routed
        # by it, not by id: an id reused the moment its first attempt was cancelled (a prefill retried on the same
        # replica) must never get that attempt's last outputs, which may still be on their way to the loop.
        self._stream_of: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self._stopped = False
        self._error: BaseException | None = None
        self._pending: set[asyncio.Future[Any]] = set()  # calls awaiting their command: failed if the thread dies
        self._busy_since: float | None = None  # time.monotonic() the current step or command began (watchdog)
        self._thread = threading.Thread(target=self._main, name="pdserve-engine", daemon=True)
        self._loop_set = threading.Event()  # the thread waits for the event loop before its first step
        if isinstance(engine, LLMEngine):
            self.engine = engine
            return
        built: list[LLMEngine | BaseException] = []
        is_built = threading.Event()

        def build(error: BaseException | None = None) -> bool:
            try:
                if error is not None:  # the engine thread failed before it could build
                    raise error
                built.append(engine())
                return True
            except BaseException as e:  # raised to the constructor's caller below
                built.append(e)
                return False
            finally:
                is_built.set()

        self._build = build
        self._thread.start()
        is_built.wait()
        if isinstance(built[0], BaseException):
            raise built[0]
        self.engine = built[0]

    # ---- called from the event loop ---------------------------------------------------------------------------

    async def call(self, fn: Callable[..., T], *args: Any, undo: Callable[[T], object] | None = None) -> T:
        """Run `fn(*args)` on the engine thread between two steps and return its result.
        `undo(result)`: what compensates `fn` when the caller is cancelled before it gets the result — `fn` may
        have run or still run (the command is queued), so the undo is queued behind it and runs on the engine
        thread only if `fn` succeeded. Every call that allocates passes one: a cancelled caller leaks nothing."""
        loop = self._ensure_started()
        future: asyncio.Future[T] = loop.create_future()
        results: list[T] = []  # touched on the engine thread only

        def run() -> None:
            try:
                result = fn(*args)
            except BaseException as e:  # handed to the caller, not swallowed
                loop.call_soon_threadsafe(_set_exception, future, e)
            else:
                results.append(result)
                loop.call_soon_threadsafe(_set_result, future, result)

        self._pending.add(future)
        self._submit(run)
        if self._error is not None:  # died between the check above and the submit: nobody will run it
            _set_exception(future, EngineDeadError("the engine thread has failed"))
        try:
            return await future
        except asyncio.CancelledError:
            if undo is not None:
                self._submit(lambda: [undo(r) for r in results])  # FIFO: after `run`, whenever that runs
            raise
        finally:
            self._pending.discard(future)

    async def generate(
        self, request: EngineRequest, prefill_only: bool = False, layer_sink: LayerSink | None = None
    ) -> AsyncGenerator[RequestOutput, None]:
        """Add a request and stream its outputs. Closing the iterator before the last output aborts the request.
        `layer_sink`: see `LLMEngine.add_request` (it is called on the engine thread)."""
        stream = self._open_stream(request.request_id)
        try:
            undo = partial(self._abort_quietly, request.request_id)
            await self.call(self._add, request, prefill_only, layer_sink, stream, undo=undo)
        except BaseException:
            self._streams.pop(request.request_id, None)
            raise
        async with aclosing(self._drain(request.request_id, stream)) as outputs:  # closed with this one: abort now
            async for out in outputs:
                yield out

    async def commit(
        self,
        request_id: str,
        first_token_id: int,
        first_logprob: TokenLogprob | None,
        may_be_written: bool = False,
        is_writer_stopped: bool = True,
    ) -> AsyncGenerator[RequestOutput, None]:
        """Commit a reservation and stream the decoded tokens that follow `first_token_id` (the writer flags: see
        `LLMEngine.commit`; a cancelled commit's undo fences the same way)."""
        stream = self._open_stream(request_id)
        try:
            undo = partial(
                self._abort_quietly, request_id, may_be_written=may_be_written, is_writer_stopped=is_writer_stopped
            )
            final = await self.call(
                self._commit, request_id, first_token_id, first_logprob, may_be_written, is_writer_stopped, stream,
                undo=undo,
            )  # fmt: skip
        except BaseException:
            self._streams.pop(request_id, None)
            raise
        if final is not None:
            self._streams.pop(request_id, None)
            yield final
            return
        async with aclosing(self._drain(request_id, stream)) as outputs:
            async for out in outputs:
                yield out

    async def reserve(self, request: EngineRequest, lease_s: float) -> KVReservation | None:
        """A reservation; if the caller is cancelled meanwhile, it is aborted (no writer ever learned of it). A reserve
        refused for room holds nothing, and its undo aborts nothing: the id may be another's by then."""

        def undo(reservation: KVReservation | None) -> None:
            if reservation is not None:
                self._abort_quietly(request.request_id, reservation)

        return await self.call(self.engine.reserve, request, lease_s, undo=undo)

    async def renew(self, request_id: str, lease_s: float) -> bool:
        return await self.call(self.engine.renew, request_id, lease_s)

    async def release(self, request_id: str) -> None:
        await self.call(self.engine.release, request_id)

    def abort(self, request_id: str, may_be_written: bool = False, is_writer_stopped: bool = False) -> None:
        """Abort without waiting (safe from `finally` blocks of cancelled tasks); see `LLMEngine.abort`. A stream
        still open for the request ends with an ABORT output (nobody else would end it)."""

        def abort() -> None:
            if self.engine.abort(request_id, may_be_written, is_writer_stopped):
                self._publish([RequestOutput(request_id, [], None, FinishReason.ABORT, 0, 0)])

        self._submit(abort)

    async def stats(self) -> EngineStats:
        return await self.call(self.engine.stats)

    def check_health(self, step_timeout_s: float) -> None:
        """EngineDeadError if the engine thread died, EngineWedgedError if one step or command has run longer than
        `step_timeout_s`; returns otherwise (an engine not started yet is healthy)."""
        if self._error is not None or (self._loop is not None and not self._thread.is_alive() and not self._stopped):
            raise EngineDeadError("the engine thread has failed") from self._error
        busy_since = self._busy_since
        if busy_since is not None and time.monotonic() - busy_since > step_timeout_s:
            raise EngineWedgedError(f"the engine thread has been busy for over {step_timeout_s:.0f} s")

    def shutdown(self) -> None:
        self._stopped = True
        self._wakeup.set()
        self._loop_set.set()

    # ---- internals --------------------------------------------------------------------------------------------

    def _ensure_started(self) -> asyncio.AbstractEventLoop:
        if self._error is not None:
            raise EngineDeadError("the engine thread has failed") from self._error
        if self._stopped:
            raise EngineDeadError("the engine was shut down")
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            if not self._thread.is_alive() and self._thread.ident is None:
                self._thread.start()
            self._loop_set.set()
        return self._loop

    def _submit(self, command: Callable[[], object]) -> None:
        self._commands.put(command)
        self._wakeup.set()

    def _open_stream(self, request_id: str) -> asyncio.Queue[RequestOutput | BaseException]:
        self._ensure_started()
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        stream: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._streams[request_id] = stream
        return stream

    async def _drain(
        self, request_id: str, stream: asyncio.Queue[RequestOutput | BaseException]
    ) -> AsyncGenerator[RequestOutput, None]:
        is_finished, is_first = False, True
        held: RequestOutput | None = None  # outputs not yet handed out (fewer tokens than the stream interval)
        try:
            while not is_finished:
                item = await stream.get()
                while not isinstance(item, BaseException) and not item.is_finished and not stream.empty():
                    later = stream.get_nowait()  # the consumer fell behind: one output for what is queued
                    if isinstance(later, BaseException):
                        held = item if held is None else merged(held, item)
                        item = later
                        break
                    item = merged(item, later)
                if isinstance(item, BaseException):
                    if held is not None:
                        yield held  # what was computed before the failure
                    raise item
                held = item if held is None else merged(held, item)
                is_finished = held.is_finished
                if is_first or is_finished or len(held.new_token_ids) >= self.stream_interval:
                    out, held, is_first = held, None, False
                    yield out
        finally:
            self._streams.pop(request_id, None)
            if not is_finished:
                self.abort(request_id)

    def _main(self) -> None:
        build: Callable[..., bool] | None = getattr(self, "_build", None)
        try:
            if self.num_threads is not None:
                torch.set_num_threads(self.num_threads)
        except BaseException as e:
            if build is None:
                raise
            build(e)  # the constructor waits for the build: it raises this instead of waiting forever
            return
        if self.cores is not None:
            self._pin_threads = native.pin_threads_op()
            if self._pin_threads is None:  # a worker would inherit the engine thread's cores: no use borrowing
                logger.warning("lending idle cores needs the native kernels (to pin threads to cores): off")
                self.cores.close()
                self.cores = None
        if build is not None and not build():
            return  # the constructor raises the build's error
        self._loop_set.wait()
        if not self._stopped:
            self._run()

    def _run(self) -> None:
        next_reap = 0.0
        try:
            while not self._stopped:
                self._run_commands()
                if time.monotonic() >= next_reap:
                    self.engine.reap()
                    next_reap = time.monotonic() + _REAP_PERIOD_S
                if self.engine.has_unfinished():
                    self._busy_since = time.monotonic()
                    self._publish(self._step())
                    self._busy_since = None
                    if self.engine.last_step_ran:
                        continue
                    # Nothing could run (prompts waiting for held blocks): wait for a command (they set the
                    # wakeup) or the next reap, instead of a full schedule() per spin holding the GIL and a core.
                elif self.cores is not None:
                    self.cores.idle()
                self._wakeup.wait(min(_IDLE_WAIT_S, max(0.0, next_reap - time.monotonic())))
                self._wakeup.clear()
            # Shut down: whoever still waits (a stream, a queued call) hears it, and later calls fail at once.
            self._error = EngineDeadError("the engine was shut down")
            self._fail_all(self._error)
        except BaseException as e:
            logger.exception("engine thread failed")
            self._error = e
            self._fail_all(e)
        finally:
            if self.cores is not None:  # the peers may have the cores back
                self.cores.close()

    def _step(self) -> list[RequestOutput]:
        if self.cores is None:
            fault_point("engine.step")
            return self.engine.step()
        # A prompt chunk can take 10-100x a decode step: only decode steps borrow, so an owner waits little; and
        # only batches large enough that another thread pays for its barrier waits (CoreShare.min_batch).
        self.cores.begin_step(borrow=self.engine.decode_batch() >= self.cores.min_batch)
        try:
            team = self.cores.team()
            if team != self._team:  # each thread to its core: the OS would not keep two engines' threads apart
                torch.set_num_threads(len(team))
                if self._pin_threads is not None:
                    self._pin_threads(team)
                self._team = team
            fault_point("engine.step")
            return self.engine.step()
        finally:
            self.cores.end_step()

    def _run_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            self._busy_since = time.monotonic()
            try:
                command()
            except Exception:  # a compensation (undo, abort) that fails must not take the engine thread down
                logger.exception("engine command failed")
            finally:
                self._busy_since = None

    # ---- on the engine thread: a request's outputs go to the stream of the attempt that produced them ----------

    def _add(
        self,
        request: EngineRequest,
        prefill_only: bool,
        layer_sink: LayerSink | None,
        stream: asyncio.Queue[RequestOutput | BaseException],
    ) -> None:
        self.engine.add_request(request, prefill_only, layer_sink)
        self._stream_of[request.request_id] = stream

    def _commit(
        self,
        request_id: str,
        first_token_id: int,
        first_logprob: TokenLogprob | None,
        may_be_written: bool,
        is_writer_stopped: bool,
        stream: asyncio.Queue[RequestOutput | BaseException],
    ) -> RequestOutput | None:
        final = self.engine.commit(request_id, first_token_id, first_logprob, may_be_written, is_writer_stopped)
        if final is None:
            self._stream_of[request_id] = stream
        return final

    def _abort_quietly(
        self, request_id: str, _result: object, may_be_written: bool = False, is_writer_stopped: bool = False
    ) -> None:
        """The undo of a cancelled add, commit or reserve (a commit's with its writer flags)."""
        self._stream_of.pop(request_id, None)
        self.engine.abort(request_id, may_be_written, is_writer_stopped)

    def _publish(self, outputs: list[RequestOutput]) -> None:
        """Hand a step's outputs to the event loop, each with its attempt's stream: one wakeup per step, not one
        per request. A request's last output unbinds its id."""
        assert self._loop is not None
        if not outputs:
            return
        routed = []
        of = self._stream_of
        for out in outputs:
            stream = of.pop(out.request_id, None) if out.is_finished else of.get(out.request_id)
            if stream is not None:
                routed.append((stream, out))
        if routed:
            self._loop.call_soon_threadsafe(_deliver, routed)

    def _fail_all(self, error: BaseException) -> None:
        assert self._loop is not None
        if self._loop.is_closed():  # nobody is left to hear it
            return
        for stream in list(self._streams.values()):
            self._loop.call_soon_threadsafe(stream.put_nowait, EngineDeadError(str(error)))
        for future in list(self._pending):
            self._loop.call_soon_threadsafe(_set_exception, future, EngineDeadError(str(error)))


def merged(first: RequestOutput, then: RequestOutput) -> RequestOutput:
    """Two consecutive outputs of one request as one: the tokens of both, the later one's end."""
    logprobs = None if first.new_logprobs is None else first.new_logprobs + (then.new_logprobs or [])
    return replace(
        first,
        new_token_ids=first.new_token_ids + then.new_token_ids,
        new_logprobs=logprobs,
        finish_reason=then.finish_reason,
        kv_block_ids=then.kv_block_ids,
    )


def _deliver(routed: list[tuple[asyncio.Queue[RequestOutput | BaseException], RequestOutput]]) -> None:
    """On the event loop: a stream its consumer closed meanwhile gets it too, and nobody reads it."""
    for stream, out in routed:
        stream.put_nowait(out)


def _set_result(future: asyncio.Future[T], result: T) -> None:
    if not future.done():
        future.set_result(result)


def _set_exception(future: asyncio.Future[Any], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
