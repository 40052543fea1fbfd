"""vLLM's request fields that pdserve does not implement, and the values of each that change nothing.

The reference is vLLM 0.32's `ChatCompletionRequest` and `CompletionRequest` (every field, read from its pydantic
models). A request may carry any of these with a value listed here (its default, or another value that has no
effect on pdserve's output, such as `tool_choice: "auto"` without tools); any other value is a 400 naming the field,
never silently ignored. Fields pdserve implements are declared in protocol.py instead; a field in neither place is
a 400 too ("unrecognized request argument", as OpenAI answers).
"""

from __future__ import annotations

from typing import Any

VLLM_VERSION = "0.32.0"

# field -> the values it may have (besides null); fields of both endpoints unless marked below.
NO_EFFECT: dict[str, tuple[Any, ...]] = {
    "allowed_token_ids": (),
    "bad_words": ([],),
    "ec_transfer_params": (),
    "kv_transfer_params": (),
    "length_penalty": (1.0, 1),
    "logprob_token_ids": (),
    "mm_payload": ("tensors",),
    "mm_processor_kwargs": (),
    "priority": (0,),
    "prompt_logprobs": (),
    "repetition_detection": (),
    "request_id": (),
    "response_format": ({"type": "text"},),
    "return_mm_kwargs": (),
    "return_token_offsets": (False,),
    "routed_experts_prompt_start": (0,),
    "session_id": (),
    "spaces_between_special_tokens": (True,),
    "stream_interval": (),
    "structured_outputs": (),
    "thinking_token_budget": (),
    "use_beam_search": (False,),
    "vllm_xargs": (),
    "watermarking": (),
}
CHAT_ONLY: dict[str, tuple[Any, ...]] = {
    "add_special_tokens": (False,),  # the chat template places the special tokens
    "chat_template": (),  # a template sent by the client is not trusted (vLLM: --trust-request-chat-template)
    "documents": (),
    "echo": (False,),
    "include_reasoning": (True, False),  # no reasoning parser: all output is content either way
    "media_io_kwargs": (),
    "parallel_tool_calls": (True, False),  # no tools are ever offered (below)
    "reasoning_effort": (),
    "return_prompt_text": (False,),
    "tool_choice": ("none", "auto"),  # "auto" among no tools is "none"
    "tools": ([],),
}
COMPLETIONS_ONLY: dict[str, tuple[Any, ...]] = {
    "prompt_embeds": (),
    "response_format": ({"type": "text"},),
}


# OpenAI's own request fields that never change the output: bookkeeping, billing and cache-routing hints, which
# OpenAI's clients and tools send as a matter of course (Zed sends prompt_cache_key, many agents send store). Any
# value of the listed type is accepted (a type in a tuple here stands for every value of it).
OPENAI_NO_EFFECT: dict[str, tuple[Any, ...]] = {
    "metadata": (dict,),  # OpenAI: tags for its dashboard
    "prompt_cache_key": (str,),  # OpenAI: routes requests to its prompt cache; pdserve's router finds prefixes itself
    "safety_identifier": (str,),  # OpenAI: user's id for abuse detection, as `user`
    "service_tier": (str,),  # OpenAI: which capacity pool bills the request
    "store": (bool,),  # OpenAI: keep the completion for its evals and distillation
}


def no_effect_values(endpoint: str) -> dict[str, tuple[Any, ...]]:
    """The unimplemented fields of `endpoint` ("chat" or "completions") and their harmless values."""
    return {**OPENAI_NO_EFFECT, **NO_EFFECT, **(CHAT_ONLY if endpoint == "chat" else COMPLETIONS_ONLY)}


def has_no_effect(value: Any, harmless: tuple[Any, ...]) -> bool:
    # `True == 1` in Python: compare types too, so `use_beam_search: 0` is not taken for False.
    return value is None or any(
        type(value) is h if isinstance(h, type) else (type(value) is type(h) and value == h) for h in harmless
    )
