"""From a parsed OpenAI body to a `GenerationRequest`: model check, tokenization, context-length and cross-field
checks. Everything here raises APIError (400/404) before the backend sees anything."""

from __future__ import annotations

import asyncio
import inspect
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from jinja2 import TemplateError, TemplateSyntaxError

from pdserve.api.backend import Backend, GenerationRequest
from pdserve.api.errors import APIError
from pdserve.api.protocol import MAX_CHOICES, ChatMessage, SamplingFields

T = TypeVar("T")
B = TypeVar("B", bound=SamplingFields)
# apply_chat_template's own arguments, and those of the functions it passes its keyword arguments to (with the
# tokenizer's own signature, read at start): chat_template_kwargs may not set them — they would change how the
# prompt is built (sanitize_control_tokens, tokenize, ...) or collide with what the server passes (a 500)
RENDER_ARGUMENTS = frozenset(
    {"self", "conversation", "conversations", "messages", "chat_template", "add_generation_prompt",
     "continue_final_message", "tokenize", "return_dict", "tools", "documents", "padding", "truncation", "max_length",
     "return_tensors", "return_assistant_tokens_mask", "tokenizer_kwargs", "sanitize_control_tokens", "kwargs"}
)  # fmt: skip


@dataclass(frozen=True)
class RequestLimits:
    """What one request may ask for; over a limit is a 400 naming the parameter, before anything is allocated."""

    max_stop_strings: int = 16  # OpenAI takes 4, vLLM any number: eval harnesses send 5 or more
    max_choices: int = MAX_CHOICES  # n, times the prompts of a completion's batch
    max_stop_string_chars: int = 256  # every output token is checked against every stop string
    max_messages: int = 1024
    max_tokens: int | None = None  # the server's cap on tokens generated per request (None: the context's room)
    allow_ignore_eos: bool = True  # vLLM's ignore_eos: generate past EOS up to max_tokens (benchmarks use it)


def check_limits(body: SamplingFields, limits: RequestLimits, max_tokens_param: str) -> None:
    if body.n > limits.max_choices:
        raise APIError(400, f"n must be between 1 and {limits.max_choices}", param="n")
    stops = body.stop_strings()
    if len(stops) > limits.max_stop_strings:
        raise APIError(400, f"at most {limits.max_stop_strings} stop sequences are allowed", param="stop")
    if any(len(s) > limits.max_stop_string_chars for s in stops):
        message = f"a stop sequence may have at most {limits.max_stop_string_chars} characters"
        raise APIError(400, message, param="stop")
    if body.ignore_eos and not limits.allow_ignore_eos:
        raise APIError(400, "ignore_eos is not allowed on this server", param="ignore_eos")
    asked = getattr(body, max_tokens_param, None)
    # The client's own value over the cap is refused; a default (OpenAI's 16, the model's) is capped instead.
    is_clients = max_tokens_param in body.model_fields_set
    if limits.max_tokens is not None and is_clients and asked is not None and asked > limits.max_tokens:
        message = f"{max_tokens_param} may be at most {limits.max_tokens} on this server"
        raise APIError(400, message, param=max_tokens_param)


class Tokenization:
    """Turns prompts into token ids on one worker thread: a long prompt must not stall the event loop (and the
    streams of every other request), and one thread keeps the tokenizer out of concurrent use. A prompt certain
    to exceed the context is refused before it is tokenized: no token covers more characters than the longest
    token of the vocabulary, so a text of C characters has at least C / that many tokens."""

    def __init__(self, tokenizer: Any, max_model_len: int | None = None, chat_template: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.chat_template: str | None = chat_template or getattr(tokenizer, "chat_template", None)
        self.vocab_size = len(tokenizer)
        self.max_model_len = max_model_len
        self.max_token_chars = max((len(t) for t in tokenizer.get_vocab()), default=1) or 1
        self.render_arguments = RENDER_ARGUMENTS | _parameters(getattr(tokenizer, "apply_chat_template", None))
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pdserve-tokenize")

    def check_length(self, num_chars: int, param: str) -> None:
        """400 (context_length_exceeded) when `num_chars` of text cannot fit in the context whatever it says."""
        if self.max_model_len is None:
            return
        at_least = -(-num_chars // self.max_token_chars)
        if at_least >= self.max_model_len:
            message = (
                f"this model's maximum context length is {self.max_model_len} tokens; the {param} has at least "
                f"{at_least} (from its {num_chars} characters)"
            )
            raise APIError(400, message, param=param, code="context_length_exceeded")

    async def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """A text's token ids, unchecked (/tokenize reports a count whatever it is)."""
        return await self._run(lambda: list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]))

    async def token_strs(self, token_ids: list[int]) -> list[str]:
        """Each token's vocabulary piece (/tokenize's `return_token_strs`, as vLLM's)."""
        return [str(p) for p in await self._run(lambda: self.tokenizer.convert_ids_to_tokens(token_ids))]

    async def detokenize(self, token_ids: list[int]) -> str:
        """Token ids' text, special tokens included (/detokenize, as vLLM's)."""
        check_token_ids(token_ids, self.vocab_size, "tokens")
        return str(await self._run(lambda: self.tokenizer.decode(token_ids)))

    async def completion_prompt(
        self, prompt: str | list[int], add_special_tokens: bool = True, check_context: bool = True
    ) -> list[int]:
        """Token ids of a completion prompt given as a string (tokenized with the tokenizer's special tokens, such as
        a BOS, unless `add_special_tokens` is false) or as token ids (as they are). Without `check_context` (a
        prompt the request truncates), a text too long for the context is tokenized all the same (the body's size
        limit bounds it)."""
        if isinstance(prompt, str):  # "" is a prompt where the tokenizer adds a BOS (as OpenAI and vLLM serve it)
            if check_context:
                self.check_length(len(prompt), "prompt")
            ids = await self.tokenize(prompt, add_special_tokens)
        else:
            check_token_ids(prompt, self.vocab_size, "prompt")
            ids = list(prompt)
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        return ids

    async def chat_prompt(
        self,
        messages: list[ChatMessage],
        template_kwargs: dict[str, Any] | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        check_context: bool = True,
    ) -> list[int]:
        """Token ids of a conversation through the chat template: ready for the assistant's turn, or continuing the
        last (assistant) message. `template_kwargs` are extra template variables (e.g. enable_thinking). Without
        `check_context`, a conversation longer than the context is tokenized all the same (/tokenize counts it)."""
        if self.chat_template is None:
            message = "this model has no chat template: use /v1/completions, or serve it with --chat-template"
            raise APIError(400, message, param="messages", code="chat_template_missing")
        if continue_final_message and add_generation_prompt:
            message = "continue_final_message needs add_generation_prompt: false"
            raise APIError(400, message, param="continue_final_message")
        if continue_final_message and messages[-1].role != "assistant":
            message = "continue_final_message needs an assistant message last"
            raise APIError(400, message, param="continue_final_message")
        conversation = [m.to_template() for m in messages]
        # A template may drop content (earlier turns' reasoning, say): only the newest user turn is surely rendered,
        # so only its length refuses the request before the template runs (the rendered ids are checked after).
        newest = next((m["content"] for m in reversed(conversation) if m["role"] == "user"), "")
        if check_context:
            self.check_length(len(newest), "messages")
        kwargs = dict(template_kwargs or {})
        reserved = sorted(self.render_arguments & kwargs.keys())
        if reserved:  # would override what the server (or the request's own fields) set
            message = f"chat_template_kwargs may not set {', '.join(reserved)}"
            raise APIError(400, message, param="chat_template_kwargs")
        render = partial(
            self._apply_chat_template, conversation, kwargs, add_generation_prompt, continue_final_message
        )  # fmt: skip
        try:
            ids = await self._run(render)
        except TemplateSyntaxError:
            raise  # the served model's template is broken: the server's fault, a generic 500
        except TemplateError as e:  # templates reject conversations they cannot render (roles out of order, ...)
            raise APIError(400, f"the chat template rejected the messages: {e}", param="messages") from e
        except ValueError as e:  # transformers: continue_final_message on a message the template does not end
            raise APIError(400, f"the chat template could not render the messages: {e}", param="messages") from e
        except (TypeError, RecursionError) as e:
            # TypeError: a template variable of the client's of a type the template cannot use (as vLLM);
            # RecursionError: data nested past what rendering can walk (protocol.py bounds the depth too)
            why = "nested too deeply" if isinstance(e, RecursionError) else str(e)
            param = "chat_template_kwargs" if kwargs else "messages"
            raise APIError(400, f"the chat template could not render the request: {why}", param=param) from e
        if not ids:
            raise APIError(400, "the messages render to an empty prompt", param="messages")
        return ids

    def _apply_chat_template(
        self,
        conversation: list[dict[str, str]],
        kwargs: dict[str, Any],
        add_generation_prompt: bool,
        continue_final_message: bool,
    ) -> list[int]:
        ids = self.tokenizer.apply_chat_template(
            conversation,
            chat_template=self.chat_template,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tokenize=True,
            return_dict=False,
            **kwargs,
        )
        return [int(t) for t in ids]

    async def _run(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)


# generation_config.json's fields that vLLM applies as the defaults of requests that leave them unset
_GENERATION_DEFAULTS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                        "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}  # fmt: skip


def sampling_defaults(model_dir: str | Path, source: str = "auto") -> dict[str, Any]:
    """The request defaults a model's generation_config.json sets, as vLLM's `--generation-config`: "auto" reads the
    model's, "vllm" none, anything else is a directory holding one."""
    if source == "vllm":
        return {}
    path = Path(model_dir if source == "auto" else source) / "generation_config.json"
    if not path.is_file():
        return {}
    config = json.loads(path.read_text())
    return {ours: config[theirs] for theirs, ours in _GENERATION_DEFAULTS.items() if config.get(theirs) is not None}


def tokenizer_class(model_dir: str | Path) -> str:
    """The name of the class `AutoTokenizer` loads the model's tokenizer with (an engine replica, which holds
    transformers' Auto machinery and torch anyway, names it for the ingress: `load_tokenizer`)."""
    from transformers import AutoTokenizer

    return type(AutoTokenizer.from_pretrained(model_dir)).__name__


def load_tokenizer(model_dir: str | Path, class_name: str | None) -> Any:
    """The model's tokenizer, as `AutoTokenizer` loads it: through its class `class_name` (`tokenizer_class`), which
    keeps transformers' Auto machinery, and torch under it, out of the ingress (~180 MB and ~3 s of CPU per
    replica). Without a name, or with one transformers does not export (a tokenizer of the model's own code),
    through `AutoTokenizer`."""
    import transformers

    cls = getattr(transformers, class_name, None) if class_name else None
    tokenizer = (cls or transformers.AutoTokenizer).from_pretrained(model_dir)
    # A tokenizer.json may enable truncation or padding: transformers turns them off on the first encode, a write
    # to the Rust tokenizer that raises "Already borrowed" if the event loop's detokenizer reads it meanwhile.
    # Off now, before any thread shares it (pdserve never pads a prompt, and truncates one only where a request asks,
    # after tokenizing it: `truncate_prompt`; too long otherwise is a 400).
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and (backend.truncation is not None or backend.padding is not None):
        backend.no_truncation()
        backend.no_padding()
    return tokenizer


def read_chat_template(template: str | None) -> str | None:
    """vLLM's --chat-template: a file holding the Jinja template, or the template itself. As in vLLM, a value with
    none of a template's characters (braces, a newline) names a file, which must be there: a path mistyped would
    otherwise become the template, and every chat prompt its text. ValueError when it cannot be read."""
    if template is None or any(c in template for c in "{}\n"):
        return template
    path = Path(template).expanduser()
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"chat_template {template!r} looks like a file path, but it cannot be read: {e}") from None


def with_defaults(body: B, defaults: dict[str, Any]) -> tuple[B, int | None]:
    """`body` with the model's defaults for the sampling fields the client did not set, and the model's limit on
    generated tokens (generation_config's max_new_tokens), kept apart: as in vLLM it only lowers the limit that
    the request ends up with (`context_max_tokens`), whatever the client asked, and is never refused as a value the
    client sent would be."""
    fields = type(body).model_fields
    unset = {k: v for k, v in defaults.items() if k in fields and k not in body.model_fields_set}
    unset.pop("max_tokens", None)
    return (body.model_copy(update=unset) if unset else body), defaults.get("max_tokens")


def _parameters(function: Callable[..., Any] | None) -> frozenset[str]:
    if function is None:
        return frozenset()
    try:
        return frozenset(inspect.signature(function).parameters)
    except (TypeError, ValueError):  # no signature to read
        return frozenset()


def truncate_prompt(token_ids: list[int], body: SamplingFields, max_model_len: int) -> list[int]:
    """vLLM's `truncate_prompt_tokens`: the prompt's last N tokens (its first N with `truncation_side: "right"`);
    -1 is the context less one token for the output. N past the context, or a prompt truncated to nothing, is a
    400 naming the field."""
    keep, param = body.truncate_prompt_tokens, "truncate_prompt_tokens"
    if keep is None:
        return token_ids
    if keep > max_model_len:
        raise APIError(400, f"truncate_prompt_tokens={keep} is more than the context ({max_model_len})", param=param)
    keep = max_model_len - 1 if keep == -1 else keep
    if keep == 0:
        raise APIError(400, "truncate_prompt_tokens=0 leaves no prompt", param=param)
    if len(token_ids) <= keep:
        return token_ids
    return token_ids[:keep] if body.truncation_side == "right" else token_ids[len(token_ids) - keep :]


def check_token_ids(token_ids: list[int], vocab_size: int, param: str) -> None:
    if any(not 0 <= t < vocab_size for t in token_ids):
        raise APIError(400, f"token ids must be in [0, {vocab_size})", param=param)


def check_model(backend: Backend, model: str) -> None:
    """404 unless `model` names the served model (its full name or the last path part of it)."""
    names = getattr(backend, "model_names", (backend.model_name,))
    if model not in {alias for name in names for alias in (name, name.rsplit("/", 1)[-1])}:
        shown = model if len(model) <= 64 else model[:61] + "..."  # named back as OpenAI does, never at length
        message = f"the model '{shown}' does not exist; this server serves '{backend.model_name}'"
        raise APIError(404, message, param="model", code="model_not_found")


def context_max_tokens(
    num_prompt_tokens: int,
    max_model_len: int,
    max_tokens: int | None,
    prompt_param: str,
    max_tokens_param: str,
    server_cap: int | None = None,
    model_default: int | None = None,
) -> int:
    """The number of tokens to generate, as vLLM's: the smallest of the request's `max_tokens` (None: no limit),
    what the context has left, `server_cap` and the model's default. Prompt and the request's own limit must fit in
    the context together (as in vLLM, an oversized max_tokens is an error, not silently capped); the model's
    default is only ever a cap."""
    if num_prompt_tokens >= max_model_len:
        message = f"this model's maximum context length is {max_model_len} tokens; the prompt has {num_prompt_tokens}"
        raise APIError(400, message, param=prompt_param, code="context_length_exceeded")
    room = max_model_len - num_prompt_tokens
    if max_tokens is not None:
        if server_cap is not None:  # (the client's own value over the cap was refused already: this caps 16)
            max_tokens = min(max_tokens, server_cap)
        if max_tokens > room:
            shown = max_tokens if max_tokens < 10**12 else "over 10^12"  # never a client's number at length
            message = (
                f"this model's maximum context length is {max_model_len} tokens; the prompt has {num_prompt_tokens} "
                f"and {max_tokens_param} is {shown}: lower it to at most {room}"
            )
            raise APIError(400, message, param=max_tokens_param, code="context_length_exceeded")
    return min(limit for limit in (room, max_tokens, server_cap, model_default) if limit is not None)


def generation_request(
    body: SamplingFields,
    vocab_size: int,
    request_id: str,
    prompt_ids: list[int],
    max_tokens: int,
    with_logprobs: bool,
    traceparent: str | None,
    cache_salt: str | None = None,
    top_logprobs: int = 0,
    prompt_logprobs: int | None = None,
    arrived_at: float | None = None,
) -> GenerationRequest:
    """The backend's request, after the checks that span several fields. `arrived_at`: time.perf_counter() when
    the request reached the API (TTFT counts from it: the wait for the tokenizer too), else now."""
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")
    if body.min_tokens > max_tokens:
        raise APIError(400, f"min_tokens must not exceed the {max_tokens} tokens to generate", param="min_tokens")
    stop_token_ids = list(body.stop_token_ids or [])
    check_token_ids(stop_token_ids, vocab_size, "stop_token_ids")
    logit_bias = body.logit_biases()
    check_token_ids([token_id for token_id, _ in logit_bias], vocab_size, "logit_bias")
    return GenerationRequest(
        request_id=request_id,
        prompt_token_ids=prompt_ids,
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=max(body.top_k, 0),
        seed=body.seed,
        stop_token_ids=stop_token_ids,
        ignore_eos=body.ignore_eos,
        min_tokens=body.min_tokens,
        logprobs=with_logprobs,
        top_logprobs=top_logprobs,
        min_p=body.min_p,
        prompt_logprobs=prompt_logprobs,
        logit_bias=logit_bias,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        repetition_penalty=body.repetition_penalty,
        cache_salt=cache_salt,
        traceparent=traceparent,
        arrived_at=time.perf_counter() if arrived_at is None else arrived_at,
    )
