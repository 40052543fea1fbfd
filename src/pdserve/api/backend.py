"""The contract between the HTTP layer and whatever serves the tokens (Ray Serve deployments, or a fake in tests).

The API validates and tokenizes; a backend only ever sees a `GenerationRequest` that passed validation.

Errors are typed by whose fault they are, and a backend raises only these: `InvalidRequest` (the client's input:
400), `CapacityError` (no room now: 429/503), `ServerError` (a fault of the server: 503 with Retry-After when a retry
may succeed, else 500). The messages of these three reach the client, so a backend writes them for clients: no
traceback, no internal address. Anything else is a bug answered with a generic 500, its message never shown.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

# A token's log-probability and its top alternatives: (logprob, ((token_id, logprob), ...)), most likely first
TokenLogprob = tuple[float, tuple[tuple[int, float], ...]]


@dataclass
class RequestEnd:
    finish_reason: str | None = None  # set before the API closes the stream


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int  # already capped so that prompt + max_tokens <= max_model_len
    temperature: float  # 0: greedy
    top_p: float
    top_k: int  # 0: disabled
    seed: int | None
    stop_token_ids: list[int]  # token-level stops (EOS is the backend's business unless ignore_eos)
    ignore_eos: bool
    min_tokens: int
    logprobs: bool
    top_logprobs: int = 0  # with logprobs: the most likely alternatives of each token, this many
    min_p: float = 0.0
    prompt_logprobs: int | None = None  # each prompt token's logprob (all but the first), with this many top ones
    logit_bias: tuple[tuple[int, float], ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    cache_salt: str | None = None  # tenants that must not share prefix-cache blocks
    traceparent: str | None = None  # W3C trace context of the HTTP request, carried across every hop
    # A further choice of an n > 1 request: choice 0's request id. It starts after choice 0's first token, when its
    # prompt's blocks are cached, and belongs to a request already admitted: the backend must not refuse it for
    # capacity (charged n times the prompt, a request the server took would fail on its own choices).
    shares_prompt_of: str | None = None
    # A further prompt of a batched completion (a list of prompts): the first prompt's request id. It starts after
    # that prompt's first token and belongs to the request admitted with it: counted in full, never refused.
    batched_with: str | None = None
    # The first prompt of a batched completion: the prompt tokens of the whole batch, the room admission checks for
    # (the further prompts join as parts of it: a batch is taken or refused whole).
    batch_prompt_tokens: int | None = None
    # time.perf_counter() when the API took the request (TTFT counts from it: a choice of n > 1 starts after the
    # first choice's first token, yet its client waited from the start); None: from the backend's call
    arrived_at: float | None = field(default=None, compare=False)
    # How the API ended the request itself, closing the backend's stream (a stop string matched): the backend then
    # counts it as finished, not as a client gone. Each request its own (never copied by `dataclasses.replace`).
    ended_by_api: RequestEnd = field(default_factory=RequestEnd, init=False, compare=False, repr=False)


@dataclass(frozen=True)
class GenerationDelta:
    """New tokens of one request since the previous delta."""

    token_ids: list[int]
    logprobs: list[TokenLogprob] | None  # parallel to token_ids when asked for
    finish_reason: str | None  # "stop" | "length" | "abort"; None while running
    num_prompt_tokens: int
    num_cached_tokens: int  # prompt tokens the computing replica took from its prefix cache (read from the first)
    prompt_logprobs: list[TokenLogprob] | None = None  # in the first delta, when asked for: prompt tokens 1..


class CapacityError(Exception):
    """No replica can take the request now; the API answers 429 (or 503 when nothing is up) with Retry-After."""

    def __init__(self, message: str, retry_after_s: float = 1.0, status_code: int = 429) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.status_code = status_code


class InvalidRequest(ValueError):
    """The client's input is what failed (e.g. the engine rejected it): 400 `invalid_request_error` with this
    message, which must be safe to show."""


class ServerError(RuntimeError):
    """The server failed the request (a replica died, a KV transfer broke, ...), not the client: 503 with
    Retry-After when `retry_after_s` is set (retrying may well succeed), else 500. The message reaches the client:
    generic (a request id helps), never the underlying exception's text."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Backend(Protocol):
    model_name: str  # what responses name (the first of model_names)
    model_names: tuple[str, ...]  # every name a request may use (vLLM's several --served-model-name)
    max_model_len: int
    tokenizer: Any  # a transformers PreTrainedTokenizerBase (chat template, decode)
    eos_token_ids: tuple[int, ...]

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        """Stream deltas until one carries a finish_reason. Closing the iterator early (client gone) aborts the
        request and frees its blocks. Raises CapacityError before the first delta when no replica has room,
        InvalidRequest for input the engine rejects, ServerError for the server's own failures."""
        ...

    async def is_healthy(self) -> bool:
        """Liveness: the serving layer answers at all (`/health`)."""
        ...

    async def is_ready(self) -> bool:
        """Readiness: a request can be served now — every pool it needs has a live replica (`/ready`)."""
        ...

    def render_metrics(self) -> tuple[bytes, str]:
        """Prometheus exposition of this process's metrics: (body, content type)."""
        ...
