"""The engine-holding deployments: PrefillServer, DecodeServer, and EngineServer (colocated baseline).

Each replica runs one `LLMEngine` on its own thread (`AsyncEngine`); blocking KV transfers run in worker threads.
Methods accept `target_replica_id` so the ingress can pin a call to a replica, and `generate` accepts
`avoid_replica_ids` so it can route around failed ones (see routing.py); they are unused here.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from dataclasses import replace
from functools import partial

import ray
import torch
from opentelemetry.trace import Span
from opentelemetry.util.types import AttributeValue
from ray import serve

from pdserve.api.intake import tokenizer_class
from pdserve.engine import EngineRequest, EngineStats, EngineUnavailableError, LLMEngine, RequestOutput
from pdserve.engine.async_engine import AsyncEngine
from pdserve.engine.cores import CoreShare
from pdserve.engine.request import LoadCounters, TokenLogprob
from pdserve.faults import fault_point
from pdserve.kvcache import KVEventBatch
from pdserve.planner import ReplicaSignals
from pdserve.router import ReplicaReport, SyncCursor
from pdserve.serve.channels import Packed, ReplicaChannels, StreamEnd, StreamStart
from pdserve.serve.cluster_store import replica_tracing_env, shared_kv_secret
from pdserve.serve.config import ServeConfig
from pdserve.serve.messages import (
    MisroutedCallError,
    ModelInfo,
    PrefillResult,
    PushAbandoned,
    ReplicaStats,
    ReplicaSync,
    Reservation,
)
from pdserve.serve.process import pin_process, set_niceness
from pdserve.serve.spans import end_unended, prompt_attributes, record_transfer, traced_outputs
from pdserve.telemetry import child_span, configure_tracing, flush, names, record_error, span_in, start_span
from pdserve.transfer import (
    Deadline,
    FencedError,
    KVEndpoint,
    LayerProgress,
    TransferSpec,
    TransferStats,
    make_receiver,
    make_sender,
    wire,
)

logger = logging.getLogger(__name__)

# The calls the ingress makes on a timer, whatever the load: Serve's access log printed one line per call ("CALL
# stats OK 0.4ms"), 4 a second on an idle 1P1D cluster's console. Their failures and cancels still print.
PERIODIC_CALLS = frozenset({"stats", "router_sync", "renew"})


class QuietPeriodicCalls(logging.Filter):
    """Drops Serve's access-log lines of successful `PERIODIC_CALLS`; every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "serve_access_log", False):
            return True
        words = record.getMessage().split()  # "[client] CALL method status latency"
        return not (len(words) >= 4 and words[-4] == "CALL" and words[-3] in PERIODIC_CALLS and words[-2] == "OK")


def quiet_periodic_calls() -> None:
    """Install `QuietPeriodicCalls` on Serve's logger in this process, once."""
    serve_logger = logging.getLogger("ray.serve")
    if not any(isinstance(f, QuietPeriodicCalls) for f in serve_logger.filters):
        serve_logger.addFilter(QuietPeriodicCalls())


class _EngineReplica:
    """What every engine-holding replica shares: the engine, its thread, identity and counters."""

    role = "engine"

    def __init__(self, config: ServeConfig, model_path: str, shared_kv: bool = False) -> None:
        self.config = config
        pool = getattr(config, self.role)
        quiet_periodic_calls()
        set_niceness(config.niceness)
        lendable = config.lendable_cores(self.role)
        if pool.cpus:
            # Lending, the engine's torch threads are pinned one per core each step (engine/cores.py). The rest of a
            # decode replica's threads (its event loop, streaming every step) may run on any core it may borrow: on
            # its own core they would preempt a thread of a two-core step, and both would wait. A prefill replica's
            # (KV pushes, bulk copies) stay on its own cores, away from the decode replica's.
            pin_process(sorted(set(pool.cpus) | set(lendable if self.role == "decode" else [])))
        # Ray starts workers with OMP_NUM_THREADS=num_cpus (1 for num_cpus=0): without this the engine would run on
        # one core whatever the machine has. Default: one thread per core of its own (its pool's, else any).
        num_threads = pool.num_threads or len(pool.cpus or os.sched_getaffinity(0))
        torch.set_num_threads(num_threads)
        cores = CoreShare(pool.cpus or [], lendable, num_threads, min_batch=config.lend_min_batch) if lendable else None
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        wire.set_cluster_secret(shared_kv_secret())
        configure_tracing(self.role, replica_tracing_env(config.tracing_env))
        self.node_id = ray.get_runtime_context().get_node_id()
        engine_config = config.engine_config(model_path)
        if shared_kv and config.device == "cpu":  # GPU caches move over CUDA IPC or NCCL, not host memory
            path = os.path.join(_shm_dir(), f"pdserve-kv-{self.replica_id}-{os.getpid()}")
            engine_config = replace(engine_config, cache=replace(engine_config.cache, shared_path=path))
        # Built on the engine thread, which then steps it (faster than one built here: see AsyncEngine).
        self.engine = AsyncEngine(partial(LLMEngine, engine_config), num_threads, config.stream_interval, cores)
        self.llm = self.engine.engine
        self.channels = ReplicaChannels(self.replica_id)
        self.model_path = model_path
        self._tokenizer_class: str | None = None
        self.prefix_hit_tokens = 0
        self.transfer_bytes = 0
        self.transfer_blocks = 0
        self.transfer_s = 0.0

    async def model_info(self) -> ModelInfo:
        if self._tokenizer_class is None:  # once, off the event loop (the tokenizer loads in ~0.3 s)
            self._tokenizer_class = await asyncio.to_thread(tokenizer_class, self.llm.config.model.path)
        layout = self.llm.layout
        return ModelInfo(
            self.model_path,
            self.llm.max_model_len,
            self.llm.eos_token_ids,
            layout.block_size,
            layout.bytes_per_token,
            self._tokenizer_class,
        )

    async def stats(self) -> ReplicaStats:
        s = await self.engine.stats()
        load = s.load or LoadCounters()
        return ReplicaStats(
            self.replica_id,
            self.role,
            s.num_blocks,
            s.num_used_blocks,
            s.num_cached_blocks,
            s.num_running,
            s.num_waiting,
            s.num_held,
            self.prefix_hit_tokens,
            self.transfer_bytes,
            self.transfer_blocks,
            self.transfer_s,
            s.num_reserved_blocks,
            s.num_fenced_blocks,
            s.num_reaped_leases,
            s.num_reaped_held,
            s.num_fenced_aborts,
            s.num_aborts,
            self._num_fenced_writes(),
            s.queued_prefill_tokens,
            load.prefill_tokens,
            load.step_s,
            load.decode_steps,
            load.decode_step_s,
            cores.borrowed_core_steps if (cores := self.engine.cores) else 0,
            cores.home_waits if cores else 0,
            load.steps,
        )

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's custom autoscaling metrics: this replica's `ReplicaSignals` for the planner
        (serve/autoscaling.py). Counters since start and gauges; the time is this process's monotonic clock."""
        s = await self.engine.stats()
        load = s.load or LoadCounters()
        return ReplicaSignals.from_counters(
            time.monotonic(), load, queued_prefill_tokens=s.queued_prefill_tokens, num_running=s.num_running,
            num_waiting=s.num_waiting, kv_blocks_total=s.num_blocks, kv_blocks_used=s.num_used_blocks,
            kv_blocks_reserved=s.num_reserved_blocks, num_waiting_with_kv=s.num_seated_waiting,
        ).as_metrics()  # fmt: skip

    async def router_sync(self, cursors: dict[str, SyncCursor]) -> ReplicaSync:
        """The ingress router's periodic pull: this replica's load and its KV events after its cursor."""
        cursor = cursors.get(self.replica_id, SyncCursor(None, 0))
        stats, events = await self.engine.call(self._sync_state, cursor)
        report = ReplicaReport(
            self.replica_id, self.role, self.node_id, stats.num_blocks, stats.num_free_blocks,
            stats.num_running, stats.num_waiting, stats.queued_prefill_tokens,
        )  # fmt: skip
        return ReplicaSync(report, events)

    async def outputs(self, channel_id: str, target_replica_id: str | None = None) -> AsyncIterator[list[Packed]]:
        """An ingress replica's output channel (channels.py): one message per engine step for all its requests."""
        self._check_pinned(target_replica_id)
        # Closed as soon as Serve closes this (its cancel lands at our `yield`): the channel must stop taking
        # outputs then, not whenever the garbage collector finalizes the inner generator.
        async with aclosing(self.channels.serve(channel_id)) as batches:
            async for batch in batches:
                yield batch

    async def generate(
        self,
        request: EngineRequest,
        target_replica_id: str | None = None,
        channel_id: str | None = None,
        avoid_replica_ids: tuple[str, ...] | None = None,
    ) -> AsyncIterator[RequestOutput | StreamStart | StreamEnd]:
        """Prefill and decode here: the colocated path, and a decode replica's local prefill. With `channel_id`,
        the outputs travel on that ingress's channel when it is open here (channels.py). An engine that cannot
        serve raises EngineUnavailableError naming this replica, which the ingress then routes around."""
        self._check_pinned(target_replica_id)
        span = start_span(names.SPAN_GENERATE, request.traceparent, self._span_attributes(request))
        relayed = self.channels.relay(channel_id, self._first_counted(span, self.engine.generate(request)))
        try:
            async with aclosing(relayed) as items:  # closed at once when Serve closes this: the engine aborts then
                async for item in items:
                    yield item
        except EngineUnavailableError as e:
            e.replica_id = self.replica_id
            raise
        finally:
            end_unended(span)

    async def _first_counted(
        self, span: Span, outputs: AsyncGenerator[RequestOutput, None]
    ) -> AsyncGenerator[RequestOutput, None]:
        is_first = True
        async with aclosing(traced_outputs(span, outputs)) as traced:
            async for out in traced:
                if is_first:
                    self._count_hits(out)
                    span.set_attributes(prompt_attributes(out))
                    is_first = False
                yield out

    async def abort(
        self,
        request_id: str,
        may_be_written: bool = False,
        is_writer_stopped: bool = False,
        target_replica_id: str | None = None,
    ) -> None:
        """Stop `request_id` here and free its blocks. `may_be_written` (a decode replica's reservation): its
        prefill replica's state is unknown (dead, unanswered): the reservation is fenced at once and its blocks
        freed once no write of it can land."""
        self._check_pinned(target_replica_id)
        self.engine.abort(request_id, may_be_written, is_writer_stopped)

    def __del__(self) -> None:
        """Serve calls this at replica shutdown (the process may then be killed before `atexit`): export the
        spans still buffered."""
        flush()

    def check_health(self) -> None:
        """Serve's health check: raises when the engine thread died or is wedged (Serve then replaces us)."""
        self.engine.check_health(self.config.engine_step_timeout_s)

    async def ready(self) -> bool:
        """The ingress's readiness probe: this replica can take work (raises like check_health otherwise)."""
        self.check_health()
        return True

    def _num_fenced_writes(self) -> int:
        """KV writes this replica stopped (prefill: its pushes) or refused (decode: its receivers) at the fence."""
        return 0

    def _check_pinned(self, target_replica_id: str | None) -> None:
        """A call pinned to another replica reached this one (its target vanished): refuse it, do nothing."""
        if target_replica_id is not None and target_replica_id != self.replica_id:
            raise MisroutedCallError(f"a call pinned to replica {target_replica_id} reached {self.replica_id}")

    def _sync_state(self, cursor: SyncCursor) -> tuple[EngineStats, KVEventBatch]:  # on the engine thread
        return self.llm.stats(), self.llm.kv_events_since(cursor.seq, cursor.incarnation)

    def _count_hits(self, out: RequestOutput) -> None:
        self.prefix_hit_tokens += out.num_cached_tokens

    def _span_attributes(self, request: EngineRequest) -> dict[str, AttributeValue]:
        return {names.REQUEST_ID: request.request_id, names.REPLICA_ID: self.replica_id}


class EngineServer(_EngineReplica):
    """Colocated: prefill and decode on one replica (the baseline)."""

    role = "engine"


class PrefillServer(_EngineReplica):
    """Computes a prompt's KV and first token, pushes the blocks the decode replica lacks, releases its own."""

    role = "prefill"

    def __init__(self, config: ServeConfig, model_path: str) -> None:
        super().__init__(config, model_path)
        self.sender = make_sender(config.kv_transport, model_path, self.node_id, config.kv_max_pairs)
        self.is_pipelined = config.kv_pipelined_push
        self.num_fenced = 0  # pushes stopped because the reservation was no longer open to them

    async def prefill(
        self, request: EngineRequest, reservation: Reservation, target_replica_id: str | None = None
    ) -> PrefillResult:
        """Compute the prompt and push the blocks the decode replica lacks — layer by layer while the prompt
        computes (layer-pipelined), else after it — then release ours (they stay cached). Whenever this returns
        or raises (cancelled included), no thread of it writes into the reservation any more."""
        self._check_pinned(target_replica_id)
        fault_point("prefill.compute")
        with span_in(request.traceparent, names.SPAN_PREFILL, self._span_attributes(request)) as span:
            progress = LayerProgress(self.llm.kv.flat.device) if self.is_pipelined else None
            transfer_span: Span | None = None  # begins when the push does: with the prompt, or after it
            push: asyncio.Future[TransferStats] | None = None
            # Set when this call ends unsuccessfully: a push still queued for a worker thread then never starts.
            abandoned = threading.Event()
            if progress is not None:
                transfer_span = child_span(span, names.SPAN_KV_TRANSFER, {names.PIPELINED: True})
                push = asyncio.ensure_future(asyncio.to_thread(self._push, reservation, progress, None, abandoned))
            start = time.perf_counter()
            first: RequestOutput | None = None
            # A task of its own: a cancel must not abort the prompt (freeing its blocks) before the push has ended.
            compute = asyncio.ensure_future(self._compute(request, progress))
            try:
                first = await asyncio.shield(compute)
                prefill_s = time.perf_counter() - start
                span.set_attributes({**prompt_attributes(first), names.COMPUTE_S: prefill_s - first.queue_s})
                if push is None:
                    transfer_span = child_span(span, names.SPAN_KV_TRANSFER, {names.PIPELINED: False})
                    push = asyncio.ensure_future(
                        asyncio.to_thread(self._push, reservation, None, first.kv_block_ids, abandoned)
                    )
                stats = await asyncio.shield(push)  # a cancel must not orphan the push thread
                wait_s = time.perf_counter() - start - prefill_s  # what the transfer adds to the prefill
                assert transfer_span is not None
                record_transfer(transfer_span, stats)
            except BaseException as e:
                abandoned.set()
                if progress is not None:
                    progress.fail(e)
                try:
                    if push is not None:  # its thread must stop writing theirs and reading our blocks
                        await _finish_uncancelled(push)
                finally:
                    # Only now may the prompt's blocks go: freed while a pipelined push still read them, they would
                    # be handed to the next request, and the push would send that request's KV as this one's.
                    if not compute.done():
                        compute.cancel()  # its stream's end aborts the prompt on the engine
                    elif first is None and not compute.cancelled() and compute.exception() is None:
                        first = compute.result()  # computed while we were cancelled: released below
                if isinstance(e, FencedError):
                    self.num_fenced += 1
                if transfer_span is not None:
                    record_error(transfer_span, e)
                raise
            finally:
                if transfer_span is not None:
                    transfer_span.end()
                if first is not None:
                    await self.engine.release(request.request_id)
        self.transfer_bytes += stats.num_bytes
        self.transfer_blocks += stats.num_blocks
        self.transfer_s += stats.sending_s  # the transport's time (a pipelined push also waits for the compute)
        return PrefillResult(
            first_token_id=first.new_token_ids[0],
            first_logprob=first.new_logprobs[0] if first.new_logprobs else None,
            finish_reason=first.finish_reason.value if first.finish_reason else None,
            num_prompt_tokens=first.num_prompt_tokens,
            num_cached_tokens=first.num_cached_tokens,
            num_blocks_sent=stats.num_blocks,
            num_bytes_sent=stats.num_bytes,
            transfer_s=stats.seconds,
            transfer_wait_s=wait_s,
            prefill_s=prefill_s,
            queue_s=first.queue_s,
            prompt_logprobs=first.prompt_logprobs,
        )

    def _num_fenced_writes(self) -> int:
        return self.num_fenced

    async def _compute(self, request: EngineRequest, progress: LayerProgress | None) -> RequestOutput:
        first: RequestOutput | None = None
        async for out in self.engine.generate(request, prefill_only=True, layer_sink=progress):
            first = out
        assert first is not None and first.kv_block_ids is not None
        self._count_hits(first)
        return first

    def _push(
        self,
        reservation: Reservation,
        progress: LayerProgress | None,
        src_block_ids: tuple[int, ...] | None = None,
        abandoned: threading.Event | None = None,
    ) -> TransferStats:
        """Send the blocks past the decode replica's cached prefix (runs in a worker thread); with `progress`, each
        layer as soon as it is computed (the block ids arrive with the first layer). A push whose call has ended
        (`abandoned`: timed out and cancelled, say) before a thread took it up sends nothing: under a storm of
        timeouts, queued pushes of calls nobody waits for would hold the threads the live ones need."""
        if abandoned is not None and abandoned.is_set():
            raise PushAbandoned(reservation.request_id)
        fault_point("prefill.push")
        if src_block_ids is None:
            assert progress is not None
            # Until the prompt's first layer it may queue behind others: that wait is the call's (the ingress ends
            # it within `prefill_timeout_s`, and `progress.fail` then ends this one), not the transfer's.
            src_block_ids = progress.wait_blocks(Deadline(self.config.prefill_timeout_s))
        # The decode replica's fence is what keeps a late write out of its blocks; this only stops trying early.
        deadline = Deadline(min(self.config.kv_transfer_timeout_s, reservation.lease_s))
        skip = reservation.num_cached_tokens // self.llm.layout.block_size
        spec = TransferSpec(
            epoch=reservation.epoch,
            src_block_ids=list(src_block_ids[skip:]),
            dst_block_ids=list(reservation.block_ids[skip:]),
            transfer_id=reservation.request_id,
        )
        timeout_s = deadline.at - time.monotonic()
        return self.sender.send(reservation.endpoint, spec, self.llm.kv, timeout_s, progress)


class DecodeServer(_EngineReplica):
    """Reserves blocks for prompts whose KV arrives from a prefill replica, then decodes them; prompts it already
    mostly caches it prefills itself (`generate`: conditional disaggregation)."""

    role = "decode"

    def __init__(self, config: ServeConfig, model_path: str) -> None:
        super().__init__(config, model_path, shared_kv=config.kv_transport in ("auto", "shm"))
        every_interface = config.kv_host in ("0.0.0.0", "::")
        advertise = ray.util.get_node_ip_address() if every_interface else None  # how other nodes reach us
        self.receiver = make_receiver(
            config.kv_transport,
            self.llm.kv,
            model_path,
            self.node_id,
            config.kv_host,
            advertise_host=advertise,
            max_pairs=config.kv_max_pairs,
        )
        self.endpoint: KVEndpoint = self.receiver.endpoint

    async def reserve(self, request: EngineRequest, target_replica_id: str | None = None) -> Reservation | None:
        """Hold blocks for the prompt (reusing cached ones); None when this replica has no room. The reservation
        lives `reservation_lease_s` unless renewed, committed (`decode`) or aborted."""
        self._check_pinned(target_replica_id)
        lease_s = self.config.reservation_lease_s
        with span_in(request.traceparent, names.SPAN_RESERVE, self._span_attributes(request)) as span:
            held = await self.engine.reserve(request, lease_s)  # cancelled meanwhile: the engine aborts it
            if held is None:
                span.set_attribute(names.ERROR_TYPE, "no_room")
                return None
            span.set_attributes(
                {names.RESERVED_BLOCKS: len(held.block_ids), names.CACHED_TOKENS: held.num_cached_tokens,
                 names.EPOCH: held.epoch}
            )  # fmt: skip
        self.prefix_hit_tokens += held.num_cached_tokens
        return Reservation(
            request.request_id, self.replica_id, held.epoch, held.block_ids, held.num_cached_tokens, self.endpoint,
            lease_s,
        )  # fmt: skip

    def _num_fenced_writes(self) -> int:
        return self.receiver.num_fenced

    async def renew(self, request_id: str, target_replica_id: str | None = None) -> bool:
        """Extend an open reservation's lease while its prefill is still working; False if it is gone."""
        self._check_pinned(target_replica_id)
        return await self.engine.renew(request_id, self.config.reservation_lease_s)

    async def decode(
        self,
        request_id: str,
        first_token_id: int,
        first_logprob: TokenLogprob | None,
        traceparent: str | None = None,
        target_replica_id: str | None = None,
        channel_id: str | None = None,
        may_be_written: bool = False,
        is_writer_stopped: bool = True,
    ) -> AsyncIterator[RequestOutput | StreamStart | StreamEnd]:
        """Commit the reservation (ValueError if it expired or its KV is incomplete) and stream the tokens. The
        first message (an output without tokens, or with `channel_id` the StreamStart) says the call reached this
        replica (the ingress shows the first token then). `may_be_written`: a prefill attempt abandoned for a retry
        may still land a layer (`LLMEngine.commit`)."""
        self._check_pinned(target_replica_id)
        fault_point("decode.commit")
        if channel_id is None:
            yield RequestOutput(request_id, [], None, None, 0, 0)
        attributes = {names.REQUEST_ID: request_id, names.REPLICA_ID: self.replica_id}
        span = start_span(names.SPAN_DECODE, traceparent, attributes)
        committed = self.engine.commit(request_id, first_token_id, first_logprob, may_be_written, is_writer_stopped)
        outputs = traced_outputs(span, committed)
        try:
            async with aclosing(self.channels.relay(channel_id, outputs)) as items:
                async for item in items:
                    yield item
        except ValueError:  # not committed (its KV incomplete: a writer may be mid-layer): fenced, then freed
            self.engine.abort(request_id, may_be_written=True, is_writer_stopped=is_writer_stopped)
            raise
        finally:
            end_unended(span)

    def __del__(self) -> None:
        """Serve calls this at replica shutdown: stop receiving and remove the shared-memory KV files."""
        self.receiver.close()
        self.llm.kv.close()
        super().__del__()


async def _finish_uncancelled(future: asyncio.Future[TransferStats]) -> None:
    """Wait for a push thread to end even if cancelled meanwhile (it stops at its deadline or the fence), then
    re-raise the cancellation: nothing may still write after the prefill call ended."""
    is_cancelled = False
    while not future.done():
        try:
            await asyncio.shield(future)
        except asyncio.CancelledError:
            is_cancelled = True
        except BaseException as e:  # the push failed: the caller raises its own error
            logger.debug("push ended with %r", e)
    if is_cancelled:
        raise asyncio.CancelledError


def _shm_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
