"""OpenAI request and response bodies (the subset pdserve serves), with vLLM's common extensions.

Requests are strict about types (a string where a number belongs is a 400, as with OpenAI) and ignore unknown
fields (as vLLM does). An explicit `null` means the default, since many clients send one for every unset field.
Parameters pdserve cannot honour are refused with a 400 naming them, never silently ignored.
Responses keep OpenAI's field names and nulls so that the official clients parse them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

_REQUEST_CONFIG = ConfigDict(extra="ignore", strict=True)


def _valid_text(value: Any) -> Any:
    """A string (or strings, at any depth of lists) that is valid Unicode: JSON can carry a lone UTF-16 surrogate
    ("\\ud800"), which no tokenizer can encode."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("the text holds a lone surrogate (invalid Unicode)") from None
    elif isinstance(value, list):
        for item in value:
            _valid_text(item)
    return value


class StreamOptions(BaseModel):
    model_config = _REQUEST_CONFIG

    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: usage so far in every chunk (guidellm and aiperf ask for it)


class SamplingFields(BaseModel):
    """Fields both generation endpoints share."""

    model_config = _REQUEST_CONFIG

    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)  # vLLM extension; 0 or -1 disables
    seed: int | None = Field(None, ge=-(1 << 63), lt=1 << 64)  # what a 64-bit generator seed can hold
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool = False  # vLLM extension
    min_tokens: int = Field(0, ge=0)  # vLLM extension
    stop_token_ids: list[int] | None = None  # vLLM extension
    user: str | None = None
    cache_salt: str | None = None  # prefix-cache isolation between tenants

    @field_validator("*", mode="before")
    @classmethod
    def _null_means_default(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields[str(info.field_name)]
        return field.default if value is None and not field.is_required() else value

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported; send one request per choice")
        return n

    @field_validator("model", "stop", "user", "cache_salt")
    @classmethod
    def _text(cls, value: Any) -> Any:
        return _valid_text(value)

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, penalty: float) -> float:
        if penalty:
            raise ValueError("penalties are not supported; send 0 or leave it out")
        return penalty

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        if bias:
            raise ValueError("logit_bias is not supported")
        return bias

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def continuous_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.continuous_usage_stats


class CompletionRequest(SamplingFields):
    prompt: str | list[int]  # a batch holding one prompt is accepted too, and unwrapped
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default; null: up to the context length
    logprobs: int | None = Field(None, ge=0, le=1)  # only the sampled token's logprob exists
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt_text(cls, prompt: Any) -> Any:
        return _valid_text(prompt)

    @field_validator("prompt", mode="before")
    @classmethod
    def _unbatch(cls, prompt: Any) -> Any:
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
            if len(prompt) != 1:
                raise ValueError("batched prompts are not supported; send one prompt per request")
            return prompt[0]
        return prompt

    @field_validator("echo", "suffix")
    @classmethod
    def _unsupported(cls, value: Any, info: ValidationInfo) -> Any:
        if value:
            raise ValueError(f"{info.field_name} is not supported")
        return value

    @field_validator("best_of")
    @classmethod
    def _one_candidate(cls, best_of: int | None) -> int | None:
        if best_of not in (None, 1):
            raise ValueError("only best_of=1 is supported")
        return best_of


class TextPart(BaseModel):
    model_config = _REQUEST_CONFIG

    type: Literal["text"]
    text: str

    @field_validator("text")
    @classmethod
    def _text(cls, text: str) -> str:
        return _valid_text(text)  # type: ignore[no-any-return,unused-ignore]


class ChatMessage(BaseModel):
    model_config = _REQUEST_CONFIG

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    @field_validator("content")
    @classmethod
    def _text(cls, content: Any) -> Any:
        return _valid_text(content) if isinstance(content, str) else content

    @model_validator(mode="after")
    def _has_content(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content")
        return self

    def to_template(self) -> dict[str, str]:
        """The message as chat templates expect it: one string of content."""
        content = self.content if not isinstance(self.content, list) else "\n".join(p.text for p in self.content)
        # OpenAI's newer name for the system role; Hugging Face chat templates only know "system".
        return {"role": "system" if self.role == "developer" else self.role, "content": content or ""}


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = None

    def output_limit(self) -> tuple[int | None, str]:
        """The limit on generated tokens and the parameter that set it (max_completion_tokens wins)."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"

    @field_validator("top_logprobs")
    @classmethod
    def _no_alternatives(cls, top: int | None) -> int | None:
        if top:
            raise ValueError("only the sampled token's logprob is available: top_logprobs must be 0")
        return top


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens whose KV came from a prefix cache


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None = None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    """A whole completion, and also each streamed chunk (OpenAI uses one shape for both)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatTokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[dict[str, Any]] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


def _is_none(value: Any) -> bool:
    return value is None


class DeltaMessage(BaseModel):
    # Absent rather than null when unchanged: the first chunk carries the role, later ones only content.
    role: Literal["assistant"] | None = Field(None, exclude_if=_is_none)
    content: str | None = Field(None, exclude_if=_is_none)


class ChunkChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]  # empty in the final usage chunk
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "pdserve"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


# Every field name a request body can have: error messages name these, never a key the client made up.
REQUEST_FIELD_NAMES = frozenset(
    name
    for model in (CompletionRequest, ChatCompletionRequest, ChatMessage, TextPart, StreamOptions)
    for name in model.model_fields
)
