"""The OpenAI-compatible routes, over any `Backend` (see backend.py).

Every request is validated and tokenized here; only a `GenerationRequest` that passed reaches the backend.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from pdserve.api.backend import Backend, GenerationDelta, GenerationRequest
from pdserve.api.detokenizer import IncrementalDetokenizer
from pdserve.api.errors import APIError, BodySizeLimit, install_error_handlers
from pdserve.api.protocol import ChatCompletionRequest, CompletionRequest, Usage, _Request

TRACEPARENT = "traceparent"


def create_app(backend: Backend, *, max_body_bytes: int = 1 << 20) -> FastAPI:
    app = FastAPI(title="pdserve", docs_url=None, redoc_url=None)
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)
    install_error_handlers(app)

    @app.get("/health")
    async def health() -> Response:
        """200 when the backend can serve, else 503."""
        ok = await backend.is_healthy()
        return JSONResponse({}, status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {
            "id": backend.model_name,
            "object": "model",
            "created": 0,
            "owned_by": "pdserve",
            "max_model_len": backend.max_model_len,
        }
        return {"object": "list", "data": [card]}

    @app.get("/metrics")
    async def metrics() -> Response:
        body, content_type = backend.render_metrics()
        return Response(body, media_type=content_type)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        """Text completion of a string or token-id prompt; streams SSE when `stream` is set."""
        _check_common(backend, body)
        if body.echo:
            raise APIError(400, "echo is not supported", "echo")
        prompt = _completion_prompt(backend, body)
        run = _prepare(backend, body, prompt, body.max_tokens, bool(body.logprobs), request, "cmpl")
        return await _respond(backend, run, body, _CompletionFormat(run))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        """Chat completion through the model's chat template; streams SSE when `stream` is set."""
        _check_common(backend, body)
        prompt = _chat_prompt(backend, body)
        max_tokens = body.max_completion_tokens or body.max_tokens
        run = _prepare(backend, body, prompt, max_tokens, body.logprobs, request, "chatcmpl")
        return await _respond(backend, run, body, _ChatFormat(run))

    return app


@dataclass
class _Run:
    """One request's generation state, shared by the streaming and non-streaming paths."""

    request: GenerationRequest
    detokenizer: IncrementalDetokenizer
    created: int = field(default_factory=lambda: int(time.time()))
    model: str = ""
    num_tokens: int = 0
    num_cached_tokens: int = 0
    finish_reason: str | None = None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)

    def usage(self) -> Usage:
        n = len(self.request.prompt_token_ids)
        return Usage(
            prompt_tokens=n,
            completion_tokens=self.num_tokens,
            total_tokens=n + self.num_tokens,
            prompt_tokens_details={"cached_tokens": self.num_cached_tokens},
        )

    def absorb(self, delta: GenerationDelta) -> str:
        """Take one backend delta; return the text it made final."""
        self.num_tokens += len(delta.token_ids)
        self.num_cached_tokens = max(self.num_cached_tokens, delta.num_cached_tokens)
        self.token_ids.extend(delta.token_ids)
        self.logprobs.extend(delta.logprobs or [])
        text = self.detokenizer.add(delta.token_ids)
        if self.detokenizer.is_stopped:
            self.finish_reason = "stop"
        elif delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason
            text += self.detokenizer.flush()
        return text


def _check_common(backend: Backend, body: _Request) -> None:
    if body.model not in (backend.model_name, backend.model_name.rsplit("/", 1)[-1]):
        raise APIError(
            404,
            f"the model {body.model!r} does not exist; this server serves {backend.model_name!r}",
            "model",
            "model_not_found",
        )
    if body.n != 1:
        raise APIError(400, "only n=1 is supported", "n")
    if len(body.stop_strings()) > 4:
        raise APIError(400, "at most 4 stop sequences are allowed", "stop")


def _completion_prompt(backend: Backend, body: CompletionRequest) -> list[int]:
    prompt: Any = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
        if len(prompt) != 1:
            raise APIError(400, "batched prompts are not supported; send one prompt per request", "prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        return list(backend.tokenizer(prompt, add_special_tokens=True)["input_ids"])
    vocab = len(backend.tokenizer)
    if any(not 0 <= t < vocab for t in prompt):
        raise APIError(400, f"prompt token ids must be in [0, {vocab})", "prompt")
    return list(prompt)


def _chat_prompt(backend: Backend, body: ChatCompletionRequest) -> list[int]:
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    try:
        ids = backend.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False
        )
    except Exception as e:  # a template that refuses the conversation (roles out of order, ...)
        raise APIError(400, f"the chat template rejected the messages: {e}", "messages") from e
    return list(ids)


def _prepare(
    backend: Backend,
    body: _Request,
    prompt: list[int],
    max_tokens: int | None,
    logprobs: bool,
    request: Request,
    prefix: str,
) -> _Run:
    limit = backend.max_model_len
    if not prompt:
        raise APIError(400, "the prompt is empty", "prompt")
    if len(prompt) >= limit:
        raise APIError(
            400,
            f"this model's maximum context length is {limit} tokens; the prompt has {len(prompt)}",
            "prompt",
            "context_length_exceeded",
        )
    max_tokens = max_tokens if max_tokens is not None else limit - len(prompt)
    if len(prompt) + max_tokens > limit:
        raise APIError(
            400,
            f"this model's maximum context length is {limit} tokens; the prompt has {len(prompt)} "
            f"and max_tokens is {max_tokens}",
            "max_tokens",
            "context_length_exceeded",
        )
    if body.min_tokens > max_tokens:
        raise APIError(400, "min_tokens must not exceed max_tokens", "min_tokens")
    generation = GenerationRequest(
        request_id=f"{prefix}-{uuid.uuid4().hex}",
        prompt_token_ids=prompt,
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=max(body.top_k, 0),
        seed=body.seed,
        stop_token_ids=list(body.stop_token_ids or []),
        ignore_eos=body.ignore_eos,
        min_tokens=body.min_tokens,
        logprobs=logprobs,
        cache_salt=body.cache_salt,
        traceparent=request.headers.get(TRACEPARENT),
    )
    detokenizer = IncrementalDetokenizer(backend.tokenizer, body.stop_strings())
    return _Run(generation, detokenizer, model=body.model)


async def _respond(backend: Backend, run: _Run, body: _Request, fmt: _Format) -> Response:
    deltas = backend.generate(run.request)
    if not body.stream:
        try:
            text = "".join([run.absorb(d) async for d in _until_done(deltas, run)])
        finally:
            with anyio.CancelScope(shield=True):
                await deltas.aclose()  # type: ignore[attr-defined]
        return JSONResponse(fmt.whole(text))
    first = await anext(deltas)  # errors before the first token still get a proper status
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return StreamingResponse(_sse(deltas, first, run, fmt, include_usage), media_type="text/event-stream")


async def _until_done(deltas: AsyncIterator[GenerationDelta], run: _Run) -> AsyncIterator[GenerationDelta]:
    async for delta in deltas:
        yield delta
        if run.detokenizer.is_stopped or delta.finish_reason is not None:
            return


async def _sse(
    deltas: AsyncIterator[GenerationDelta], first: GenerationDelta, run: _Run, fmt: _Format, include_usage: bool
) -> AsyncIterator[str]:
    try:
        opening = fmt.opening()
        if opening is not None:
            yield _event(opening)
        delta: GenerationDelta | None = first
        while delta is not None:
            start = len(run.token_ids)
            text = run.absorb(delta)
            if text or run.finish_reason is not None:
                yield _event(fmt.chunk(text, start, run.finish_reason))
            if run.finish_reason is not None:
                break
            delta = await anext(deltas, None)
        if include_usage:
            yield _event(fmt.usage_chunk())
        yield "data: [DONE]\n\n"
    finally:
        with anyio.CancelScope(shield=True):  # the client may be gone (scope cancelled): still free the blocks
            await deltas.aclose()  # type: ignore[attr-defined]


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


class _Format:
    def __init__(self, run: _Run) -> None:
        self.run = run

    def base(self, kind: str) -> dict[str, Any]:
        return {"id": self.run.request.request_id, "object": kind, "created": self.run.created, "model": self.run.model}

    def opening(self) -> dict[str, Any] | None:
        return None

    def whole(self, text: str) -> dict[str, Any]:
        raise NotImplementedError

    def chunk(self, text: str, start: int, finish_reason: str | None) -> dict[str, Any]:
        raise NotImplementedError

    def usage_chunk(self) -> dict[str, Any]:
        raise NotImplementedError

    def tokens(self, start: int = 0) -> list[str]:
        return [str(t) for t in self.run.detokenizer.tokenizer.convert_ids_to_tokens(self.run.token_ids[start:])]


class _CompletionFormat(_Format):
    def whole(self, text: str) -> dict[str, Any]:
        choice = {"index": 0, "text": text, "finish_reason": self.run.finish_reason, "logprobs": self.logprobs(0)}
        return {**self.base("text_completion"), "choices": [choice], "usage": self.run.usage().model_dump()}

    def chunk(self, text: str, start: int, finish_reason: str | None) -> dict[str, Any]:
        choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": self.logprobs(start)}
        return {**self.base("text_completion"), "choices": [choice]}

    def usage_chunk(self) -> dict[str, Any]:
        return {**self.base("text_completion"), "choices": [], "usage": self.run.usage().model_dump()}

    def logprobs(self, start: int) -> dict[str, Any] | None:
        if not self.run.request.logprobs:
            return None
        return {
            "tokens": self.tokens(start),
            "token_logprobs": self.run.logprobs[start:],
            "top_logprobs": None,
            "text_offset": None,
        }


class _ChatFormat(_Format):
    def whole(self, text: str) -> dict[str, Any]:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": self.run.finish_reason,
            "logprobs": self.logprobs(0),
        }
        return {**self.base("chat.completion"), "choices": [choice], "usage": self.run.usage().model_dump()}

    def opening(self) -> dict[str, Any]:
        choice = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
        return {**self.base("chat.completion.chunk"), "choices": [choice]}

    def chunk(self, text: str, start: int, finish_reason: str | None) -> dict[str, Any]:
        choice = {
            "index": 0,
            "delta": {"content": text} if text else {},
            "finish_reason": finish_reason,
            "logprobs": self.logprobs(start),
        }
        return {**self.base("chat.completion.chunk"), "choices": [choice]}

    def usage_chunk(self) -> dict[str, Any]:
        return {**self.base("chat.completion.chunk"), "choices": [], "usage": self.run.usage().model_dump()}

    def logprobs(self, start: int) -> dict[str, Any] | None:
        if not self.run.request.logprobs:
            return None
        pairs = zip(self.tokens(start), self.run.logprobs[start:], strict=False)
        return {
            "content": [{"token": t, "logprob": lp, "bytes": list(t.encode()), "top_logprobs": []} for t, lp in pairs]
        }
