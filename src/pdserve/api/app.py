"""The OpenAI-compatible routes over any `Backend` (see backend.py).

Each generation request is parsed (protocol.py), checked and tokenized (intake.py) before the backend sees it; its
output is detokenized with stop strings (generation.py) and shaped as a whole body or SSE chunks (formats.py, sse.py).
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from opentelemetry import trace
from opentelemetry.util.types import AttributeValue
from pydantic import BaseModel

import pdserve
from pdserve.api.auth import APIKeyAuth, APIKeys, tenant_salt
from pdserve.api.backend import Backend, GenerationDelta, GenerationRequest
from pdserve.api.choices import ChoiceStreams, batch_requests, collect_choices, total_usage
from pdserve.api.detokenizer import echo_overlap
from pdserve.api.errors import SERVER_ERROR, APIError, error_response, install_error_handlers
from pdserve.api.formats import ChatFormat, CompletionFormat, Echo, ResponseFormat, ResponseMeta
from pdserve.api.generation import Generation, collect, first_delta_within, usage_attributes
from pdserve.api.intake import (
    RequestLimits,
    Tokenization,
    check_limits,
    check_model,
    context_max_tokens,
    generation_request,
    truncate_prompt,
    with_defaults,
)
from pdserve.api.metrics import APIMetrics
from pdserve.api.middleware import BodySizeLimit, HTTPMetrics, UnhandledErrors
from pdserve.api.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    SamplingFields,
    TokenizeRequest,
    TokenizeResponse,
)
from pdserve.api.sse import EventStreamResponse, choice_events, stream_events
from pdserve.telemetry import names, span_in, traceparent

T = TypeVar("T")


@dataclass(frozen=True)
class APIState:
    """What the routes share, kept on `app.state`."""

    backend: Backend
    tokenization: Tokenization
    created: int  # unix seconds, reported as the model's creation time
    metrics: APIMetrics
    first_token_wait_s: float  # how long a stream holds its headers back for the first token (errors keep a status)
    sse_keepalive_s: float  # then, a keep-alive comment this often until the first token
    limits: RequestLimits
    fingerprint: str  # system_fingerprint: pdserve's version, the model and the chat template that serve
    sampling_defaults: dict[str, Any]  # the model's generation_config.json defaults


def system_fingerprint(backend: Backend, chat_template: str | None) -> str:
    """OpenAI's `system_fingerprint`: equal across responses exactly when the server's version, model and chat
    template are (seeded outputs are comparable then)."""
    parts = [pdserve.__version__, backend.model_name, str(backend.max_model_len), chat_template or ""]
    return "fp_" + hashlib.sha256("\0".join(parts).encode()).hexdigest()[:10]


def create_app(
    backend: Backend,
    *,
    max_body_bytes: int = 1 << 20,
    first_token_wait_s: float = 2.0,
    sse_keepalive_s: float = 5.0,
    api_keys: APIKeys | None = None,
    limits: RequestLimits | None = None,
    chat_template: str | None = None,
    sampling_defaults: dict[str, Any] | None = None,
) -> FastAPI:
    """The OpenAI-compatible app over `backend`: /v1/completions, /v1/chat/completions, /v1/models, vLLM's
    /tokenize, /detokenize and /version, /health, /ready, /metrics. Bodies over `max_body_bytes` are refused with
    413. A stream whose first token takes longer than `first_token_wait_s` starts anyway and sends a keep-alive
    comment every `sse_keepalive_s`. With
    `api_keys`, every route but /health and /ready needs a key (auth.py); `limits` bound what a request may ask.
    `chat_template` (Jinja) replaces the tokenizer's own; `sampling_defaults` (intake.sampling_defaults: the
    model's generation_config.json) are the defaults of the fields a request leaves unset."""
    # Bodies without a Content-Type are read as JSON, as OpenAI does (FastAPI's strict default refuses them).
    # FastAPI's native OpenTelemetry makes the request's SERVER span (continuing a client `traceparent`) whenever
    # a tracer provider is configured (pdserve.telemetry); our spans hang under it, without FastAPI's per-operation
    # spans in between.
    app = FastAPI(
        title="pdserve", docs_url=None, redoc_url=None, openapi_url=None, strict_content_type=False,
        telemetry={"operation_spans": False, "metrics": False, "logs": False},
    )  # fmt: skip
    metrics = APIMetrics()
    limits = limits or RequestLimits()
    app.state.pdserve = APIState(
        backend, Tokenization(backend.tokenizer, backend.max_model_len, chat_template), int(time.time()), metrics,
        first_token_wait_s, sse_keepalive_s, limits, system_fingerprint(backend, chat_template),
        dict(sampling_defaults or {}),
    )  # fmt: skip
    app.state.api_keys = api_keys
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)
    if api_keys is not None:  # outside the body limit: a request without a key is refused before its body is read
        app.add_middleware(APIKeyAuth, keys=api_keys)
    app.add_middleware(UnhandledErrors)
    app.add_middleware(HTTPMetrics, metrics=metrics)  # added last, so outermost: sees every answer
    install_error_handlers(app)
    app.include_router(router)
    return app


def _state(request: Request) -> APIState:
    state: APIState = request.app.state.pdserve
    return state


State = Annotated[APIState, Depends(_state)]
router = APIRouter()


@router.get("/health")
async def health(state: State) -> Response:
    """Liveness: 200 `{}` while the server answers, else 503."""
    if await state.backend.is_healthy():
        return JSONResponse({})
    return error_response(APIError(503, "the server is not healthy", SERVER_ERROR))


@router.get("/ready")
async def ready(state: State) -> Response:
    """Readiness: 200 `{}` when a request can be served now (a live replica in every pool it needs), else 503."""
    if await state.backend.is_ready():
        return JSONResponse({})
    return error_response(APIError(503, "the backend is not ready", SERVER_ERROR, retry_after_s=1.0))


@router.get("/v1/models")
async def list_models(state: State) -> Response:
    """The served model, once under each of its names."""
    names = getattr(state.backend, "model_names", (state.backend.model_name,))
    return _json(ModelList(data=[_model_card(state, name) for name in names]))


@router.get("/v1/models/{model:path}")
async def get_model(model: str, state: State) -> Response:
    """The served model by name; 404 for any other."""
    check_model(state.backend, model)
    return _json(_model_card(state, model if model in getattr(state.backend, "model_names", ()) else None))


@router.get("/version")
async def version() -> Response:
    """pdserve's version (vLLM's /version)."""
    return JSONResponse({"version": pdserve.__version__})


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, state: State) -> Response:
    """vLLM's /tokenize: a text prompt's token ids, or a chat's through the chat template, as the generation
    endpoints compute them (with `return_token_strs`, each token's vocabulary piece too); the context length beside
    them, for the client to compare: a prompt longer than the context is counted, not refused (as vLLM's)."""
    _model(body, state)
    if body.messages is not None:
        if len(body.messages) > state.limits.max_messages:
            raise APIError(400, f"at most {state.limits.max_messages} messages are allowed", param="messages")
        ids = await state.tokenization.chat_prompt(
            body.messages, body.chat_template_kwargs, body.add_generation_prompt, body.continue_final_message,
            check_context=False,  # as vLLM's: a count whatever the context (the client compares max_model_len)
        )  # fmt: skip
    else:
        assert body.prompt is not None
        ids = await state.tokenization.tokenize(body.prompt, body.add_special_tokens is not False)
    pieces = await state.tokenization.token_strs(ids) if body.return_token_strs else None
    return _json(TokenizeResponse(count=len(ids), max_model_len=state.backend.max_model_len, tokens=ids,
                                  token_strs=pieces))  # fmt: skip


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, state: State) -> Response:
    """vLLM's /detokenize: token ids' text (400 for an id outside the vocabulary)."""
    _model(body, state)
    return _json(DetokenizeResponse(prompt=await state.tokenization.detokenize(body.tokens)))


@router.get("/metrics")
async def metrics(state: State) -> Response:
    """The backend's Prometheus exposition, then the HTTP layer's."""
    body, content_type = state.backend.render_metrics()
    return Response(body + state.metrics.render(), media_type=content_type)


@dataclass(frozen=True)
class Prompt:
    """One prompt of a request, checked and tokenized: the tokens to generate for it, the format of its choices (a
    completion's echo is its prompt's), and the echoed text's last characters that the output's text starts with."""

    token_ids: list[int]
    max_tokens: int
    fmt: ResponseFormat
    echo_overlap: int = 0


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request, state: State) -> Response:
    """Completion of a text or token-id prompt, or of a batch of them (each prompt's n choices at indexes
    prompt * n + choice, as vLLM); SSE when `stream` is set. 400 for invalid input, 404 for an unknown model,
    429/503 when the backend has no room."""
    model = _model(body, state)
    body, default_max_tokens = with_defaults(body, state.sampling_defaults)
    check_limits(body, state.limits, "max_tokens")
    texts = body.prompts()
    if len(texts) * body.n > state.limits.max_choices:  # each is a sequence in the engine, as a choice is
        message = f"a request may ask for at most {state.limits.max_choices} choices in all (prompts times n)"
        raise APIError(400, message, param="prompt" if len(texts) > state.limits.max_choices else "n")
    # max_tokens 0 with echo scores the prompt (evaluation harnesses' log-likelihood): one token is generated for
    # the prompt's logprobs to come back with, and dropped.
    score_only = body.max_tokens == 0
    if score_only and not body.echo:
        raise APIError(400, "max_tokens may be 0 only with echo (to score the prompt)", param="max_tokens")
    with span_in(traceparent(), names.SPAN_TOKENIZE):
        truncates = body.truncate_prompt_tokens is not None  # a text too long for the context is cut, not refused
        token_ids = [
            await state.tokenization.completion_prompt(text, body.add_special_tokens, check_context=not truncates)
            for text in texts
        ]
    kept = [truncate_prompt(ids, body, state.backend.max_model_len) for ids in token_ids]
    # A truncated prompt is echoed as what is left of it
    texts = [
        text if len(ids) == len(all_ids) else ids for text, ids, all_ids in zip(texts, kept, token_ids, strict=True)
    ]
    token_ids = kept
    meta = ResponseMeta.new("cmpl", model, state.fingerprint)
    prompts = [
        _completion_prompt(state, body, meta, text, ids, score_only, default_max_tokens)
        for text, ids in zip(texts, token_ids, strict=True)
    ]
    prompt_logprobs = body.logprobs if body.echo and body.logprobs is not None else None
    return await _serve(state, body, request, prompts, body.logprobs or 0, prompt_logprobs, score_only)


def _completion_prompt(
    state: APIState,
    body: CompletionRequest,
    meta: ResponseMeta,
    text: str | list[int],
    token_ids: list[int],
    score_only: bool,
    default_max_tokens: int | None,
) -> Prompt:
    """One completion prompt: its context checked, its echo."""
    max_tokens = context_max_tokens(
        len(token_ids), state.backend.max_model_len, 1 if score_only else body.max_tokens, "prompt", "max_tokens",
        state.limits.max_tokens, None if score_only else default_max_tokens,
    )  # fmt: skip
    echo, overlap = None, 0
    if body.echo:
        tokenizer = state.backend.tokenizer
        shown = text if isinstance(text, str) else tokenizer.decode(token_ids)
        # A prompt of token ids may end inside a character (U+FFFD) that the output completes: the output carries it
        # (detokenizer.py), so the echo goes without it. A scored prompt has no output: its echo is whole.
        overlap = 0 if score_only else echo_overlap(tokenizer, token_ids, shown, body.skip_special_tokens)
        echo = Echo(shown[: len(shown) - overlap], token_ids)
    fmt = CompletionFormat(
        meta, state.backend.tokenizer, with_logprobs=body.logprobs is not None, echo=echo,
        prompt_token_ids=token_ids if body.return_token_ids else None, tokens_as_ids=body.return_tokens_as_token_ids,
    )  # fmt: skip
    return Prompt(token_ids, max_tokens, fmt, overlap)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request, state: State) -> Response:
    """Chat completion through the model's chat template; SSE when `stream` is set. Without a token limit the
    reply may fill the context. Errors as for /v1/completions."""
    model = _model(body, state)
    body, default_max_tokens = with_defaults(body, state.sampling_defaults)
    asked, param = body.output_limit()
    check_limits(body, state.limits, param)
    if body.top_logprobs and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    if len(body.messages) > state.limits.max_messages:
        raise APIError(400, f"at most {state.limits.max_messages} messages are allowed", param="messages")
    with span_in(traceparent(), names.SPAN_TOKENIZE):
        prompt_ids = await state.tokenization.chat_prompt(
            body.messages, body.chat_template_kwargs, body.add_generation_prompt, body.continue_final_message,
            check_context=body.truncate_prompt_tokens is None,  # a conversation too long for the context is cut
        )  # fmt: skip
    prompt_ids = truncate_prompt(prompt_ids, body, state.backend.max_model_len)
    max_tokens = context_max_tokens(
        len(prompt_ids), state.backend.max_model_len, asked, "messages", param, state.limits.max_tokens,
        default_max_tokens,
    )  # fmt: skip
    meta = ResponseMeta.new("chatcmpl", model, state.fingerprint)
    fmt = ChatFormat(
        meta, state.backend.tokenizer, with_logprobs=body.logprobs,
        prompt_token_ids=prompt_ids if body.return_token_ids else None, tokens_as_ids=body.return_tokens_as_token_ids,
    )  # fmt: skip
    return await _serve(state, body, request, [Prompt(prompt_ids, max_tokens, fmt)], body.top_logprobs)


async def _serve(
    state: APIState,
    body: SamplingFields,
    request: Request,
    prompts: list[Prompt],
    top_logprobs: int = 0,
    prompt_logprobs: int | None = None,
    discard_output: bool = False,
) -> Response:
    """Hand the request to the backend and answer with the whole output, or stream it."""
    span = trace.get_current_span()  # the request's SERVER span (FastAPI's)
    meta = prompts[0].fmt.meta
    gen_requests = [
        generation_request(
            body, state.tokenization.vocab_size, meta.id if len(prompts) == 1 else f"{meta.id}-{p}", prompt.token_ids,
            prompt.max_tokens, prompt.fmt.with_logprobs,
            traceparent(span) or request.headers.get("traceparent"),  # tracing off here: pass the client's on
            cache_salt=tenant_salt(getattr(request.state, "tenant", None), body.cache_salt),
            top_logprobs=top_logprobs, prompt_logprobs=prompt_logprobs,
            arrived_at=getattr(request.state, "arrived_at", None),
        )
        for p, prompt in enumerate(prompts)
    ]  # fmt: skip
    span.set_attributes(request_attributes(gen_requests, meta))
    if body.n > 1 or len(prompts) > 1:
        return await _serve_choices(state, body, request, gen_requests, prompts, discard_output)
    (gen_request,), (prompt,) = gen_requests, prompts
    generation = Generation(
        gen_request, state.backend.tokenizer, body.stop_strings(), discard_output, body.skip_special_tokens,
        body.include_stop_str_in_output, prompt.echo_overlap,
    )  # fmt: skip
    deltas = state.backend.generate(gen_request)
    if body.stream:
        # The first delta before the headers when it comes soon, so that "no room" is still a 429; past that
        # wait, the stream starts and keep-alive comments hold the connection open until it comes.
        first, pending = await first_delta_within(deltas, state.first_token_wait_s)
        events = stream_events(
            deltas, first, generation, prompt.fmt, body.include_usage(), pending, state.sse_keepalive_s,
            body.continuous_usage(),
        )  # fmt: skip
        return EventStreamResponse(events, deltas, pending)
    piece = await _unless_disconnected(request, collect(deltas, generation))
    if piece is None:
        return Response(status_code=499)  # nginx's "client closed request"; nobody is left to read it
    span.set_attributes(usage_attributes(generation))
    return _json(prompt.fmt.whole(piece, generation.usage()))


async def _serve_choices(
    state: APIState,
    body: SamplingFields,
    request: Request,
    gen_requests: list[GenerationRequest],
    prompts: list[Prompt],
    discard_output: bool,
) -> Response:
    """`n` choices of each prompt (choices.py): one backend request each, a prompt's choices sharing its cached
    blocks."""
    requests = batch_requests(gen_requests, body.n)
    of_choice = [prompt for prompt in prompts for _ in range(body.n)]  # each choice's prompt, in index order
    generations = [
        Generation(
            r, state.backend.tokenizer, body.stop_strings(), discard_output, body.skip_special_tokens,
            body.include_stop_str_in_output, prompt.echo_overlap,
        )
        for r, prompt in zip(requests, of_choice, strict=True)
    ]  # fmt: skip
    fmts = [copy.copy(prompt.fmt) for prompt in of_choice]  # a format keeps per-choice state (echo, text offsets)
    streams = ChoiceStreams(state.backend, requests)
    if body.stream:
        # As one choice's stream: choice 0's first delta before the headers when it comes soon, else keep-alives.
        pulling = streams.first_soon()
        try:
            done, _ = await asyncio.wait({pulling}, timeout=state.first_token_wait_s)
        except asyncio.CancelledError:  # the client left before the headers: stop the pull, close every choice
            streams.release()
            raise
        first: GenerationDelta | None = None
        pending: asyncio.Task[GenerationDelta | None] | None = pulling
        if done:
            pending, first = None, pulling.result()  # the backend's error, answered with its status
            if first is None:
                await streams.aclose()
                raise RuntimeError("the backend's stream ended without output")
        events = choice_events(
            streams, generations, fmts, first, body.include_usage(), body.continuous_usage(), pending,
            state.sse_keepalive_s,
        )  # fmt: skip
        return EventStreamResponse(events, streams)
    pieces = await _unless_disconnected(request, collect_choices(streams, generations))
    if pieces is None:
        return Response(status_code=499)
    usage = total_usage(generations)
    trace.get_current_span().set_attributes(usage_attributes(*generations))
    # Each format once: a format is spent by its choice (a completion's echo goes out once, its text offsets move on).
    bodies = [f.whole(p, usage) for f, p in zip(fmts, pieces, strict=True)]
    whole = bodies[0]
    whole.choices = [body.choices[0] for body in bodies]  # type: ignore[attr-defined]
    for i, choice in enumerate(whole.choices):  # type: ignore[attr-defined]
        choice.index = i
    return _json(whole)


def _model(body: SamplingFields | TokenizeRequest | DetokenizeRequest, state: APIState) -> str:
    """The served model a request names: as vLLM, one that names none asks for the served model (its first name);
    an unknown one is a 404."""
    if body.model is None:
        return state.backend.model_names[0]
    check_model(state.backend, body.model)
    return body.model


async def _unless_disconnected(request: Request, work: Coroutine[Any, Any, T]) -> T | None:
    """Run `work`, cancelling it if the client hangs up first (None then). Cancelled, `collect` closes the backend
    stream, which aborts the request and frees its blocks instead of generating for nobody."""
    task = asyncio.ensure_future(work)
    hangup = asyncio.ensure_future(_hangup(request))
    try:
        await asyncio.wait((task, hangup), return_when=asyncio.FIRST_COMPLETED)
    finally:
        hangup.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait((task,))
        if not task.cancelled():
            task.exception()  # retrieved: a failure as the client left is not logged again as "never retrieved"
    return None if task.cancelled() else task.result()


async def _hangup(request: Request) -> None:
    # The body was read in full, so the next message the server sends is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


def request_attributes(requests: list[GenerationRequest], meta: ResponseMeta) -> dict[str, AttributeValue]:
    """The request (the backend's request of each prompt: their sampling fields are the same) as OpenTelemetry
    GenAI attributes."""
    request = requests[0]
    attributes: dict[str, AttributeValue | None] = {
        names.GEN_AI_OPERATION: "chat" if meta.id.startswith("chatcmpl") else "text_completion",
        names.GEN_AI_PROVIDER: "pdserve",
        names.GEN_AI_REQUEST_MODEL: meta.model,
        names.GEN_AI_RESPONSE_ID: meta.id,
        names.GEN_AI_MAX_TOKENS: request.max_tokens,
        names.GEN_AI_TEMPERATURE: request.temperature,
        names.GEN_AI_TOP_P: request.top_p,
        names.GEN_AI_SEED: request.seed if request.seed is None or request.seed < 2**63 else None,  # OTLP: int64
        names.GEN_AI_INPUT_TOKENS: sum(len(r.prompt_token_ids) for r in requests),
        names.REQUEST_ID: meta.id,
    }
    return {k: v for k, v in attributes.items() if v is not None}


def _model_card(state: APIState, name: str | None = None) -> ModelCard:
    model_id = name or state.backend.model_name
    return ModelCard(id=model_id, created=state.created, max_model_len=state.backend.max_model_len)


def _json(body: BaseModel) -> Response:
    return Response(body.model_dump_json(), media_type="application/json")
