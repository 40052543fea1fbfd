"""The HTTP entry: an OpenAI-compatible API (pdserve.api) over the prefill/decode (or colocated) deployments."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from functools import partial
from pathlib import Path
from typing import Any

from opentelemetry import trace
from ray import serve
from ray.serve.exceptions import DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from pdserve.api import create_app
from pdserve.api.backend import CapacityError, GenerationDelta, GenerationRequest
from pdserve.api.intake import load_tokenizer, read_chat_template, sampling_defaults
from pdserve.engine import EngineRequest, RequestOutput, SamplingParams
from pdserve.router import RouteDecision
from pdserve.router.admission import Admission
from pdserve.serve.autoscaling import read_decision
from pdserve.serve.channels import IngressChannels
from pdserve.serve.cluster_store import replica_tracing_env
from pdserve.serve.config import ServeConfig, api_keys_of
from pdserve.serve.failover import BrokenReplicas, foreign_cancel_as_fault, raise_if_cancelling
from pdserve.serve.handoff import colocated_generate, disaggregated_generate
from pdserve.serve.ingress_router import IngressRouter, RouterCollector, broadcast
from pdserve.serve.messages import ModelInfo, ReplicaStats
from pdserve.serve.metrics import IngressMetrics
from pdserve.serve.process import level_http_front, pin_process, set_niceness
from pdserve.serve.spans import route_attributes
from pdserve.telemetry import configure_tracing, flush, names, span_in

logger = logging.getLogger(__name__)
_STATS_REFRESH_S = 1.0
_READY_TIMEOUT_S = 3.0
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


@serve.ingress()
class Ingress:
    """Implements `pdserve.api.backend.Backend` for the routes `create_app` defines."""

    async def __init__(  # type: ignore[misc]  # Serve awaits an async constructor
        self,
        config: ServeConfig,
        model_path: str,
        prefill: DeploymentHandle | None = None,
        decode: DeploymentHandle | None = None,
        engine: DeploymentHandle | None = None,
    ) -> None:
        self.config = config
        set_niceness(config.niceness)
        if config.ingress.cpus:  # e.g. off the engines' cores, on a node that hosts both
            pin_process(config.ingress.cpus)
        configure_tracing("ingress", replica_tracing_env(config.tracing_env))
        self.prefill, self.decode, self.engine = prefill, decode, engine
        self.mode = "colocated" if engine is not None else "disaggregated"
        model_path = config.model_dir(model_path)  # this node's copy (a hub id resolves again on another node)
        info: ModelInfo = await self._any_engine().model_info.remote()
        self.tokenizer = load_tokenizer(model_path, info.tokenizer_class)
        self.chat_template = read_chat_template(getattr(config, "chat_template", None))
        self.sampling_defaults = sampling_defaults(model_path, getattr(config, "generation_config", "auto"))
        # The first served name is the one responses carry; any of them is accepted. Without one: a local
        # directory's name, or the hub id / built-in name as given.
        given = config.model or DEFAULT_MODEL_NAME
        default_name = Path(given).name if Path(given).expanduser().is_dir() else given
        self.model_names = tuple(config.served_model_names) or (default_name,)
        self.model_name = self.model_names[0]
        self.max_model_len = info.max_model_len
        self.eos_token_ids = info.eos_token_ids
        self.channels = IngressChannels() if config.output_channels else None
        # colocated engine replicas whose engine died, routed around until Serve replaces them
        self.broken = BrokenReplicas.for_health_checks(config.health_check_period_s, config.health_check_timeout_s)
        self.router: IngressRouter | None = None
        if prefill is not None and decode is not None:
            cost = config.router.cost_config(info.block_size, info.kv_bytes_per_token)
            self.router = IngressRouter(config.router, cost, prefill, decode)
            await self.router.start()
        pool = config.engine if engine is not None else config.prefill
        self.admission = Admission(config.admission_budget(pool.num_replicas))
        self.metrics = IngressMetrics(RouterCollector(self.router, self.admission, self.broken if engine else None))
        self._stats_task = asyncio.get_running_loop().create_task(self._refresh_stats())
        self._front_task = asyncio.get_running_loop().create_task(level_http_front(config.niceness))

    def __del__(self) -> None:
        """Serve calls this at replica shutdown: export the spans still buffered."""
        flush()

    def __serve_build_asgi_app__(self) -> Any:
        return create_app(
            self, max_body_bytes=self.config.max_body_bytes, api_keys=api_keys_of(self.config),
            limits=self.config.limits.request_limits(), chat_template=self.chat_template,
            sampling_defaults=self.sampling_defaults,
        )  # fmt: skip

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        """Errors follow the Backend contract (pdserve.api.backend), translated by `classify_error`: whatever a
        replica or Ray raised reaches the API as InvalidRequest, CapacityError or a generic ServerError."""
        try:
            engine_request = to_engine_request(request)
            self._admit(engine_request, request)
            abandoned: list[asyncio.Task[Any]] = []  # a handoff its client left, still running on a prefill replica
            try:  # from admission on, whatever happens ends its count and the router's
                start = request.arrived_at if request.arrived_at is not None else time.perf_counter()
                first_at: float | None = None
                final_reason: str | None = None  # the backend's
                num_tokens = 0
                if self.engine is not None:
                    outputs = colocated_generate(engine_request, self.engine, self.channels, broken=self.broken)
                else:
                    assert self.prefill is not None and self.decode is not None
                    route = self._route(engine_request)
                    moved = None if self.router is None else partial(self.router.router.move, engine_request.request_id)
                    outputs = disaggregated_generate(
                        engine_request, self.prefill, self.decode, route, self.config.queue_ttl_s,
                        prefill_timeout_s=self.config.prefill_timeout_s, channels=self.channels, abandoned=abandoned,
                        moved=moved,
                    )  # fmt: skip
                async with aclosing(outputs):  # closed with this stream: never left to the garbage collector
                    async for out in outputs:
                        if first_at is None:
                            self.admission.started(engine_request.request_id)
                            first_at = time.perf_counter()
                            self._observe_first(engine_request, out, first_at - start, request)
                        num_tokens += len(out.new_token_ids)
                        if out.finish_reason is not None:
                            final_reason = out.finish_reason.value
                        yield to_delta(out)
            finally:
                # Counted once the API has read the output: a stop string (the API closed the stream, or matched on
                # the last output) is the API's reason; no reason at all is a client gone.
                if (reason := request.ended_by_api.finish_reason or final_reason) is not None:
                    self._observe_end(first_at, num_tokens, reason)
                # A prefill whose client left runs on to its end: until then it is still its replica's load, and
                # still holds its share of the admission budget.
                running = [task for task in abandoned if not task.done()]
                if running:
                    running[-1].add_done_callback(lambda _: self._finish(engine_request.request_id))
                else:
                    self._finish(engine_request.request_id)
        except Exception as e:  # not GeneratorExit or CancelledError: a closed or cancelled stream just ends
            error = classify_error(e, request.request_id)
            if error is e:
                raise
            raise error from None  # the original (Ray's text: traceback, addresses) stays in the server's log

    def _finish(self, request_id: str) -> None:
        """The request no longer loads any replica: its admission count and the router's load of it end."""
        self.admission.finish(request_id)
        if self.router is not None:
            self.router.router.finish(request_id)

    def _admit(self, request: EngineRequest, asked: GenerationRequest) -> None:
        """CapacityError (429 + Retry-After) when the pool's prompt-token budget is spent; nothing is allocated.
        A further choice of an n > 1 request is part of one admitted already, and computes only its prompt's last
        block (the rest is choice 0's, in the prefix cache): it counts that much, and is never refused. A batch of
        prompts is admitted whole, with its first prompt (room for all of them): the further prompts are parts."""
        num_tokens = len(request.prompt_token_ids)
        is_further_choice = asked.shares_prompt_of is not None
        if is_further_choice:
            block = self.config.block_size
            num_tokens -= block * ((num_tokens - 1) // block)
        is_part = is_further_choice or asked.batched_with is not None
        if not self.admission.admit(
            request.request_id, num_tokens, is_part_of_admitted=is_part, room_for=asked.batch_prompt_tokens
        ):
            raise CapacityError("the server is at capacity; retry shortly", retry_after_s=1.0)

    def _route(self, request: EngineRequest) -> RouteDecision | None:
        """The router's pair for `request` (None: Serve routes), recorded as a span of the request's trace."""
        assert self.router is not None
        with span_in(request.traceparent, names.SPAN_ROUTE, {names.REQUEST_ID: request.request_id}) as span:
            decision = self.router.route(request)
            if span.is_recording():  # the candidate arrays cost a few microseconds: only when traced
                span.set_attributes(route_attributes(decision, self.config.router.policy))
        return decision

    def _observe_first(
        self, request: EngineRequest, first: RequestOutput, ttft_s: float, asked: GenerationRequest
    ) -> None:
        """Every choice's first token counts in the TTFT histogram (each is a stream), but the request's span is its
        first choice's: that first token is the request's (the others start after it). A further choice of an
        n > 1 request shares its prompt, counted once (as `usage.prompt_tokens`); a batch's further prompt is a
        prompt of its own."""
        shares_prompt = asked.shares_prompt_of is not None
        if not shares_prompt and asked.batched_with is None:
            trace.get_current_span().set_attributes({names.TTFT_S: ttft_s, names.QUEUE_S: first.queue_s})  # request's
        if not shares_prompt:
            self.metrics.observe_prompt(self.mode, first.num_prompt_tokens, first.num_cached_tokens)
        self.metrics.ttft.labels(self.mode).observe(ttft_s)
        self.metrics.queue.labels(self.mode).observe(first.queue_s)
        if self.router is not None:
            self.router.router.prefill_done(request.request_id, first.num_cached_tokens)

    async def is_healthy(self) -> bool:
        """Liveness: this ingress answers (replicas are Serve's health checks' business)."""
        return True

    async def is_ready(self) -> bool:
        """Readiness: every pool a request needs has a replica whose engine is alive and not wedged."""
        pools = [self.engine] if self.engine is not None else [self.prefill, self.decode]
        for pool in pools:
            assert pool is not None
            try:
                results = await broadcast(pool, "ready", timeout_s=_READY_TIMEOUT_S)
            except DeploymentUnavailableError:  # no running replica
                return False
            if not any(r is True for r in results):
                return False
        return True

    def render_metrics(self) -> tuple[bytes, str]:
        return self.metrics.render()

    async def replica_stats(self) -> list[ReplicaStats]:
        """Every engine replica's stats, fresh (used by /metrics refresh and by tests)."""
        handles = [h for h in (self.prefill, self.decode, self.engine) if h is not None]
        stats: list[ReplicaStats] = []
        for handle in handles:
            with contextlib.suppress(DeploymentUnavailableError):  # a pool with no running replica has no stats
                results = await broadcast(handle, "stats")
                stats.extend(r for r in results if isinstance(r, ReplicaStats))
        return stats

    def _observe_end(self, first_at: float | None, num_tokens: int, finish_reason: str) -> None:
        self.metrics.requests.labels(self.mode, finish_reason).inc()
        self.metrics.generation_tokens.labels(self.mode).inc(num_tokens)
        if first_at is not None and num_tokens > 1 and finish_reason != "abort":  # an abort is no stream's pace
            self.metrics.tpot.labels(self.mode).observe((time.perf_counter() - first_at) / (num_tokens - 1))

    def _resize_admission(self, stats: list[ReplicaStats]) -> None:
        """The admission budget follows the prefill (or colocated) pool's live size, which scaling changes."""
        role = "engine" if self.engine is not None else "prefill"
        if num_replicas := sum(s.role == role for s in stats):
            self.admission.max_queued_tokens = self.config.admission_budget(num_replicas)

    def _any_engine(self) -> DeploymentHandle:
        handle = self.engine or self.decode
        assert handle is not None
        return handle

    async def _refresh_stats(self) -> None:
        while True:
            raise_if_cancelling()
            try:
                taken_at = time.time()
                with foreign_cancel_as_fault("a replica stats refresh"):  # only this task's own cancel ends the loop
                    stats = await self.replica_stats()
                self.metrics.replicas.update(stats, taken_at)
                self._resize_admission(stats)
                if self.config.autoscaling.enabled:
                    app_name = serve.get_replica_context().app_name
                    self.metrics.planner.decision = await asyncio.to_thread(read_decision, app_name)
            except Exception:
                logger.exception("refreshing replica stats failed")
            await asyncio.sleep(_STATS_REFRESH_S)


def to_engine_request(request: GenerationRequest) -> EngineRequest:
    sampling = SamplingParams(
        max_tokens=request.max_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        top_k=request.top_k,
        seed=request.seed,
        stop_token_ids=tuple(request.stop_token_ids),
        ignore_eos=request.ignore_eos,
        min_tokens=request.min_tokens,
        logprobs=request.logprobs,
        top_logprobs=request.top_logprobs,
        min_p=request.min_p,
        prompt_logprobs=request.prompt_logprobs,
        logit_bias=request.logit_bias,
        presence_penalty=request.presence_penalty,
        frequency_penalty=request.frequency_penalty,
        repetition_penalty=request.repetition_penalty,
    )
    return EngineRequest(
        request.request_id, tuple(request.prompt_token_ids), sampling, request.cache_salt, request.traceparent
    )


def to_delta(out: RequestOutput) -> GenerationDelta:
    return GenerationDelta(
        token_ids=list(out.new_token_ids),
        logprobs=out.new_logprobs,
        finish_reason=out.finish_reason.value if out.finish_reason else None,
        num_prompt_tokens=out.num_prompt_tokens,
        num_cached_tokens=out.num_cached_tokens,
        prompt_logprobs=out.prompt_logprobs,
    )


def classify_error(e: BaseException, request_id: str) -> BaseException:
    """The Backend-contract error (pdserve.api.backend) to raise for `e`, an exception out of a request's outputs.

    Ray re-raises a replica's exception as a RayTaskError that is also an instance of the original's type, and whose
    text is the remote traceback with the replica's address: only the original's type decides, and only the
    original's own message is ever kept. The engine's InvalidRequestError (the client's input) becomes
    InvalidRequest; CapacityError and ServerError keep their (client-safe) messages; anything else, including a
    ValueError such as "KV transfer incomplete", is the server's fault: a generic ServerError with the request id,
    worth a retry (another replica, a fresh transfer), the original logged here with its traceback.
    """
    from ray.exceptions import RayTaskError

    from pdserve.api.backend import CapacityError, InvalidRequest, ServerError
    from pdserve.engine import InvalidRequestError

    original = e
    for _ in range(8):  # a replica's error re-raised through another replica is wrapped twice
        cause = getattr(original, "cause", None) if isinstance(original, RayTaskError) else None
        if not isinstance(cause, BaseException):
            break
        original = cause
    if not isinstance(original, RayTaskError):  # (a wrapper still, only past 8 levels: a server fault then)
        if isinstance(original, InvalidRequestError | InvalidRequest):
            return InvalidRequest(str(original))
        if isinstance(original, CapacityError):
            return e if original is e else CapacityError(str(original), original.retry_after_s, original.status_code)
        if isinstance(original, ServerError):
            return e if original is e else ServerError(str(original), original.retry_after_s)
    logger.error("request %s failed", request_id, exc_info=e)
    return ServerError(f"internal error while generating; request id {request_id}", retry_after_s=1.0)
