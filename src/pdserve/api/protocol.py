"""OpenAI request and response bodies (the subset pdserve serves), with vLLM's common extensions.

Requests are strict about types (a string where a number belongs is a 400, as with OpenAI). Every field either
works or is a 400 naming it: vLLM's fields that pdserve does not implement are accepted only with a value that
changes nothing (vllm_fields.py), and a field nobody defines is "unrecognized", as OpenAI answers. An explicit
`null` means the default, since many clients send one for every unset field.
Responses keep OpenAI's field names and nulls so that the official clients parse them.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from pdserve.api.vllm_fields import CHAT_ONLY, NO_EFFECT, has_no_effect, no_effect_values


class UnknownFieldError(ValueError):
    """A request field that neither pdserve nor vLLM defines (OpenAI: "Unrecognized request argument")."""

    def __init__(self, name: str) -> None:
        shown = name if is_plain_name(name) else None  # a plain name is echoed, anything else is not
        super().__init__(
            f"unrecognized request argument supplied: {shown}" if shown else "unrecognized request argument"
        )
        self.param = shown


class UnsupportedFieldError(ValueError):
    """A vLLM request field pdserve does not implement, sent with a value that would change the output."""

    def __init__(self, name: str) -> None:
        super().__init__(f"'{name}' is not supported by pdserve (only its default is accepted)")
        self.param = name


_REQUEST_CONFIG = ConfigDict(extra="forbid", strict=True)
_PLAIN_NAME = re.compile(r"[A-Za-z_]\w{0,63}", re.ASCII)


def is_plain_name(name: str) -> bool:
    """A field name safe to echo in an error: an identifier of at most 64 characters."""
    return _PLAIN_NAME.fullmatch(name) is not None


MAX_TOP_LOGPROBS = 20  # vLLM's default --max-logprobs
MAX_LOGIT_BIAS = 300  # OpenAI's limit
MAX_CHOICES = 128  # choices per request (n) by default, OpenAI's bound: each is a sequence in the engine
# Each stop token id is checked for every sequence at every engine step, and the cache salt is hashed into every
# prompt block: unbounded, one request's fields slowed every stream on its replica (review: 520k ids, 8x).
MAX_STOP_TOKEN_IDS = 256
MAX_CACHE_SALT_CHARS = 256


MAX_NESTING = 32  # lists and objects inside one another in a free-form field (chat_template_kwargs)


def _valid_text(value: Any, depth: int = 0) -> Any:
    """A string (or strings, at any depth of lists and objects up to MAX_NESTING, keys too) that is valid Unicode:
    JSON can carry a lone UTF-16 surrogate ("\\ud800"), which no tokenizer can encode. The depth is bounded because
    what renders it (the chat template's data conversion) recurses: a few hundred levels overflow Python's stack."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("the text holds a lone surrogate (invalid Unicode)") from None
    elif isinstance(value, list | dict):
        if depth >= MAX_NESTING:
            raise ValueError(f"lists and objects are nested deeper than {MAX_NESTING} levels")
        for key, item in value.items() if isinstance(value, dict) else enumerate(value):
            if isinstance(value, dict):
                _valid_text(key)
            _valid_text(item, depth + 1)
    return value


class StreamOptions(BaseModel):
    model_config = _REQUEST_CONFIG

    include_usage: bool = True  # as vLLM: a stream_options object asks for usage unless it says otherwise
    continuous_usage_stats: bool = False  # vLLM's: usage so far in every chunk (guidellm; aiperf --per-chunk-usage)

    @field_validator("*", mode="before")
    @classmethod
    def _null_means_default(cls, value: Any, info: ValidationInfo) -> Any:
        """An explicit null is the default here too, as at the top level (vLLM accepts it), except include_usage's:
        null is no usage, as in vLLM and OpenAI (an SDK sending unset fields as null got a chunk without choices)."""
        if value is None and info.field_name == "include_usage":
            return False
        return cls.model_fields[str(info.field_name)].default if value is None else value


class SamplingFields(BaseModel):
    """Fields both generation endpoints share."""

    model_config = ConfigDict(extra="allow", strict=True)  # extras are checked by _known_fields_only
    endpoint: ClassVar[str]

    model: str | None = None  # as vLLM: left out, the served model (its first name)
    # As vLLM, above OpenAI's 2 too (min_p's use); bounded far above any use (past float32's range the logits divided
    # by it read NaN)
    temperature: float = Field(1.0, ge=0.0, le=1e4, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int = Field(0, ge=-1)  # vLLM extension; 0 or -1 disables
    min_p: float = Field(0.0, ge=0.0, le=1.0, allow_inf_nan=False)  # vLLM: drop tokens under min_p x the top one
    include_stop_str_in_output: bool = False  # vLLM extension: keep the stop string that ended the text
    skip_special_tokens: bool = True  # vLLM extension
    seed: int | None = Field(None, ge=-(1 << 63), lt=1 << 64)  # what a 64-bit generator seed can hold
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    repetition_penalty: float = Field(1.0, gt=0.0, allow_inf_nan=False)  # vLLM's (HF's): > 1 discourages repeats
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool = False  # vLLM extension
    min_tokens: int = Field(0, ge=0)  # vLLM extension
    stop_token_ids: list[int] | None = None  # vLLM extension
    user: str | None = None
    cache_salt: str | None = None  # prefix-cache isolation between tenants
    return_token_ids: bool = False  # vLLM extension: each choice's output token ids, and the prompt's
    return_tokens_as_token_ids: bool = False  # vLLM extension: logprobs name each token "token_id:<id>"
    # vLLM extension: keep this many prompt tokens (-1: the context less one), the last ones unless "right"
    truncate_prompt_tokens: int | None = Field(None, ge=-1, lt=1 << 63)
    truncation_side: Literal["left", "right"] | None = None

    @model_validator(mode="before")
    @classmethod
    def _known_fields_only(cls, data: Any) -> Any:
        """vLLM's unimplemented fields pass only with a value that changes nothing (then dropped); others are
        400s naming them."""
        if not isinstance(data, dict):
            return data
        harmless = no_effect_values(cls.endpoint)
        for name in [k for k in data if k not in cls.model_fields]:
            if not isinstance(name, str) or name not in harmless:
                raise UnknownFieldError(str(name))
            if not has_no_effect(data[name], harmless[name]):
                raise UnsupportedFieldError(name)
        # An explicit null is the field left out (its default, or the model's generation_config default, which
        # applies only to fields the client did not set), except max_tokens, whose null means the context's limit.
        fields = cls.model_fields
        return {
            k: v
            for k, v in data.items()
            if k in fields and (v is not None or k == "max_tokens" or fields[k].is_required())
        }

    @field_validator("*", mode="before")
    @classmethod
    def _null_means_default(cls, value: Any, info: ValidationInfo) -> Any:
        if info.field_name == "max_tokens":  # null: no limit but the context's (a completion's default is 16)
            return value
        field = cls.model_fields[str(info.field_name)]
        return field.default if value is None and not field.is_required() else value

    @field_validator("n")
    @classmethod
    def _choices(cls, n: int) -> int:
        if n < 1:  # the upper bound is the server's (RequestLimits.max_choices)
            raise ValueError("n must be at least 1")
        return n

    @field_validator("seed")
    @classmethod
    def _seed(cls, seed: int | None) -> int | None:
        return None if seed == -1 else seed  # as vLLM: -1 asks for an unseeded draw (llama.cpp's "random")

    @field_validator("model", "stop", "user", "cache_salt")
    @classmethod
    def _text(cls, value: Any) -> Any:
        return _valid_text(value)

    @field_validator("stop_token_ids")
    @classmethod
    def _stop_token_ids(cls, ids: list[int] | None) -> list[int] | None:
        if ids and len(ids) > MAX_STOP_TOKEN_IDS:
            raise ValueError(f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids")
        return ids

    @field_validator("cache_salt")
    @classmethod
    def _cache_salt(cls, salt: str | None) -> str | None:
        if salt == "":  # as vLLM: "" would salt nothing, sharing the cache it was sent to keep apart
            raise ValueError("cache_salt must be a non-empty string if given")
        if salt and len(salt) > MAX_CACHE_SALT_CHARS:
            raise ValueError(f"cache_salt is at most {MAX_CACHE_SALT_CHARS} characters")
        return salt

    @field_validator("logit_bias")
    @classmethod
    def _biases(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        if bias and len(bias) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} tokens may be biased")
        if bias and not all(_is_token_id(key) and -100 <= value <= 100 for key, value in bias.items()):
            raise ValueError("logit_bias maps token ids (as strings) to biases in [-100, 100]")
        if bias and len({int(key) for key in bias}) < len(bias):
            raise ValueError('logit_bias names a token id twice (as "5" and "05")')
        return bias

    def logit_biases(self) -> tuple[tuple[int, float], ...]:
        return tuple((int(key), float(value)) for key, value in (self.logit_bias or {}).items())

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def continuous_usage(self) -> bool:
        # as vLLM: usage in every chunk only beside the usage chunk at the end (include_usage false: neither)
        return self.include_usage() and self.stream_options is not None and self.stream_options.continuous_usage_stats


class CompletionRequest(SamplingFields):
    endpoint = "completions"

    # One prompt (a text, token ids) or a batch of them (texts, lists of token ids): each prompt's n choices, at
    # indexes prompt * n + choice, as vLLM. A batch holding one prompt is served as that prompt.
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)  # OpenAI's default; null: up to the context length; 0: only with echo
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)  # the sampled token's and this many top ones
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    add_special_tokens: bool = True  # vLLM extension: false tokenizes a text prompt without the BOS and such

    @field_validator("prompt")
    @classmethod
    def _prompt_text(cls, prompt: Any) -> Any:
        return _valid_text(prompt)

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_kind(cls, prompt: Any) -> Any:
        if isinstance(prompt, list) and len({type(p) for p in prompt} & {str, list}) > 1:
            raise ValueError("a batch of prompts must be all texts or all lists of token ids")
        return prompt

    def prompts(self) -> list[str | list[int]]:
        """The request's prompts: one, or a batch's in order (a batch of one is that prompt; [] is an empty prompt,
        a 400 later, not an empty batch)."""
        prompt = self.prompt
        if isinstance(prompt, str) or not prompt or isinstance(prompt[0], int):
            return [prompt]  # type: ignore[list-item]
        return list(prompt)

    @field_validator("suffix")
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
    # A prompt-caching hint some OpenAI-compatible clients put on parts (LiteLLM, OpenRouter: Anthropic's
    # `{"type": "ephemeral"}`); ignored, as vLLM ignores it: pdserve's prefix cache needs no marking.
    cache_control: dict[str, Any] | None = None

    @field_validator("text")
    @classmethod
    def _text(cls, text: str) -> str:
        return _valid_text(text)  # type: ignore[no-any-return,unused-ignore]


# What an assistant message of OpenAI's (a client's `message.model_dump()` sent back) carries beside role and
# content: harmless when empty, so dropped then; anything else in them is a 400 (tools are not implemented).
_EMPTY_MESSAGE_FIELDS = (
    "tool_calls", "refusal", "function_call", "audio", "annotations", "reasoning_content", "reasoning",
)  # fmt: skip


def _is_token_id(key: str) -> bool:
    """A logit_bias key: ASCII digits only (str.isdigit() also takes "²", which int() refuses, and "٣", which it reads
    as 3), and no longer than any vocabulary's ids (int() refuses over 4,300 digits with a message about Python)."""
    return key.isascii() and key.isdigit() and len(key) <= 12


class ChatMessage(BaseModel):
    model_config = _REQUEST_CONFIG

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None  # passed to the chat template, which may show it

    @model_validator(mode="before")
    @classmethod
    def _without_empty_fields(cls, data: Any) -> Any:
        is_reply = isinstance(data, dict) and data.get("role") == "assistant"
        if is_reply and any(data.get(k, 0) in (None, []) for k in _EMPTY_MESSAGE_FIELDS):
            return {k: v for k, v in data.items() if not (k in _EMPTY_MESSAGE_FIELDS and v in (None, []))}
        return data

    @field_validator("content", "name")
    @classmethod
    def _text(cls, content: Any) -> Any:
        return _valid_text(content) if isinstance(content, str) else content

    @model_validator(mode="after")
    def _has_content(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":  # an empty array renders an empty turn, as in vLLM
            raise ValueError(f"a {self.role} message needs content")
        return self

    def to_template(self) -> dict[str, str]:
        """The message as chat templates expect it: one string of content."""
        content = self.content if not isinstance(self.content, list) else "\n".join(p.text for p in self.content)
        # OpenAI's newer name for the system role; Hugging Face chat templates only know "system".
        message = {"role": "system" if self.role == "developer" else self.role, "content": content or ""}
        return message if self.name is None else {**message, "name": self.name}


class ChatCompletionRequest(SamplingFields):
    endpoint = "chat"

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int = Field(0, ge=0, le=MAX_TOP_LOGPROBS)
    # vLLM's chat-template controls: extra template variables (e.g. enable_thinking), whether to open the
    # assistant's turn, or to continue the last (assistant) message instead
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False

    @field_validator("chat_template_kwargs")
    @classmethod
    def _template_text(cls, kwargs: dict[str, Any] | None) -> dict[str, Any] | None:
        return _valid_text(kwargs)  # what the template renders is text too

    def output_limit(self) -> tuple[int | None, str]:
        """The limit on generated tokens and the parameter that set it (max_completion_tokens wins)."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"


class InvalidFieldError(ValueError):
    """A field whose value the request's other fields rule out; the error names it."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.param = name


_CHAT_ONLY = ("add_generation_prompt", "continue_final_message", "chat_template_kwargs", "tools")
# vLLM's tokenize fields that pdserve does not implement, accepted where they change nothing (as in chat completions)
_TOKENIZE_NO_EFFECT = {
    "chat_template": CHAT_ONLY["chat_template"], "media_io_kwargs": CHAT_ONLY["media_io_kwargs"],
    "mm_processor_kwargs": NO_EFFECT["mm_processor_kwargs"],
}  # fmt: skip


def _without_nulls(data: Any, no_effect: dict[str, tuple[Any, ...]]) -> Any:
    """A body with its explicit nulls left out (a null is the field's default: vLLM's clients send every field of
    its models) and the unimplemented fields that change nothing dropped (any other value of them is a 400)."""
    if not isinstance(data, dict):
        return data
    for name, value in data.items():
        if name in no_effect and not has_no_effect(value, no_effect[name]):
            raise UnsupportedFieldError(name)
    return {k: v for k, v in data.items() if v is not None and k not in no_effect}


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: a completion's text prompt, or a chat's messages through the chat template, tokenized as the
    generation endpoints tokenize them."""

    model_config = _REQUEST_CONFIG

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    # A prompt: the tokenizer's special tokens (BOS) unless false, as vLLM. Messages: only false, the template places
    # them (as chat completions)
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[Any] | None = None  # none are ever offered: only empty
    return_token_strs: bool | None = False  # also each token's vocabulary piece

    @model_validator(mode="before")
    @classmethod
    def _nulls(cls, data: Any) -> Any:
        return _without_nulls(data, _TOKENIZE_NO_EFFECT)

    @field_validator("model", "prompt", "chat_template_kwargs")
    @classmethod
    def _text(cls, value: Any) -> Any:
        return _valid_text(value)  # the model's name comes back in a 404's message: it must encode

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise InvalidFieldError("prompt", "send either a prompt or messages")
        if self.prompt is not None:
            for name in _CHAT_ONLY:
                if name in self.model_fields_set:
                    raise InvalidFieldError(name, f"'{name}' applies to messages, not to a prompt")
        elif self.add_special_tokens:
            raise UnsupportedFieldError("add_special_tokens")
        if self.tools:
            raise UnsupportedFieldError("tools")
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(BaseModel):
    """vLLM's /detokenize: token ids back to text."""

    model_config = _REQUEST_CONFIG

    model: str | None = None
    tokens: list[int]

    @model_validator(mode="before")
    @classmethod
    def _nulls(cls, data: Any) -> Any:
        return _without_nulls(data, {})

    @field_validator("model")
    @classmethod
    def _text(cls, value: Any) -> Any:
        return _valid_text(value)


class DetokenizeResponse(BaseModel):
    prompt: str


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens whose KV came from a prefix cache


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]  # null for an echoed prompt's first token
    top_logprobs: list[dict[str, float] | None] | None = None
    text_offset: list[int]


def _is_none(value: Any) -> bool:
    return value is None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None  # vLLM's: the stop string or stop token id that ended it (EOS: null)
    # vLLM's, with return_token_ids (absent otherwise): the output's token ids (a chunk's: its own), and the prompt's
    # (a stream's: in each choice's first chunk)
    token_ids: list[int] | None = Field(None, exclude_if=_is_none)
    prompt_token_ids: list[int] | None = Field(None, exclude_if=_is_none)


class CompletionResponse(BaseModel):
    """A whole completion, and also each streamed chunk (OpenAI uses one shape for both)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None  # the serving configuration (api/app.py)


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
    stop_reason: str | int | None = None  # vLLM's: the stop string or stop token id that ended it (EOS: null)
    token_ids: list[int] | None = Field(None, exclude_if=_is_none)  # vLLM's, with return_token_ids


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None  # the serving configuration (api/app.py)
    prompt_token_ids: list[int] | None = Field(None, exclude_if=_is_none)  # vLLM's, with return_token_ids


class DeltaMessage(BaseModel):
    # Absent rather than null when unchanged: the first chunk carries the role, later ones only content.
    role: Literal["assistant"] | None = Field(None, exclude_if=_is_none)
    content: str | None = Field(None, exclude_if=_is_none)


class ChunkChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None  # vLLM's: the stop string or stop token id that ended it (EOS: null)
    token_ids: list[int] | None = Field(None, exclude_if=_is_none)  # vLLM's, with return_token_ids: this chunk's


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]  # empty in the final usage chunk
    usage: Usage | None = None
    system_fingerprint: str | None = None  # the serving configuration (api/app.py)
    # vLLM's, with return_token_ids: in the first chunk (the role's)
    prompt_token_ids: list[int] | None = Field(None, exclude_if=_is_none)


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
_REQUEST_MODELS = (
    CompletionRequest, ChatCompletionRequest, ChatMessage, TextPart, StreamOptions, TokenizeRequest, DetokenizeRequest,
)  # fmt: skip
REQUEST_FIELD_NAMES = frozenset(name for model in _REQUEST_MODELS for name in model.model_fields)
