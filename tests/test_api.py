"""The HTTP layer over real HTTP (uvicorn on a free port) and a fake backend: the official openai client for what
works, httpx for raw errors and disconnects. No Ray, no model; a real byte-level BPE tokenizer (tiny_models)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from fastapi import FastAPI

from pdserve.api import (
    CapacityError,
    GenerationDelta,
    GenerationRequest,
    IncrementalDetokenizer,
    InvalidRequest,
    ServerError,
    create_app,
)
from pdserve.api.metrics import ingress_id
from tiny_models import EOS_ID, build_tokenizer

TEXT = "The quick brown fox jumps over the lazy dog. Héllo wörld 😀 ok."  # é, ö and 😀 span several tokens
MAX_MODEL_LEN = 128
MAX_BODY_BYTES = 4096
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def logprob_of(token_id: int) -> float:
    return -token_id / 1000


class FakeBackend:
    """Streams TEXT's tokens then EOS, `tokens_per_delta` at a time; records requests, tokens yielded and closes."""

    model_name = "org/fake-model"
    model_names: tuple[str, ...] = ("org/fake-model",)
    max_model_len = MAX_MODEL_LEN
    eos_token_ids: tuple[int, ...] = (EOS_ID,)

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.script = [*tokenizer(TEXT, add_special_tokens=False)["input_ids"], EOS_ID]
        self.reset()

    def reset(self, tokens_per_delta: int = 1, delay_s: float = 0.0, error: Exception | None = None) -> None:
        self.tokens_per_delta, self.delay_s, self.error = tokens_per_delta, delay_s, error
        self.error_after: Exception | None = None  # raised after the first delta
        self.finish_override: str | None = None  # replaces the finish reason of the second delta
        self.abort_first = False  # the first delta is an abort with no token (AsyncEngine.abort's)
        self.is_healthy_now = True
        self.is_ready_now = True
        self.requests: list[GenerationRequest] = []
        self.num_yielded = 0
        self.num_closed = 0
        self.cached_tokens: Callable[[GenerationRequest], int] = lambda request: 1  # each delta's num_cached_tokens
        self.script_of: Callable[[GenerationRequest], list[int]] | None = None  # a request's own tokens, else script

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        self.requests.append(request)
        if self.error is not None:
            raise self.error
        try:
            if self.abort_first:
                yield GenerationDelta([], None, "abort", len(request.prompt_token_ids), 0)
                return
            tokens = (self.script if self.script_of is None else self.script_of(request))[: request.max_tokens]
            # A stop token ends the script there, as an engine ends the request
            ends = [i for i, t in enumerate(tokens) if t in request.stop_token_ids and i >= request.min_tokens - 1]
            tokens = tokens[: ends[0] + 1] if ends else tokens
            for start in range(0, len(tokens), self.tokens_per_delta):
                await asyncio.sleep(self.delay_s)
                yield self._delta(request, tokens, start)
                if self.error_after is not None:
                    raise self.error_after
        finally:
            self.num_closed += 1

    def _delta(self, request: GenerationRequest, tokens: list[int], start: int) -> GenerationDelta:
        chunk = tokens[start : start + self.tokens_per_delta]
        is_last = start + len(chunk) == len(tokens)
        is_stop = chunk[-1] == EOS_ID or chunk[-1] in request.stop_token_ids
        finish = ("stop" if is_stop else "length") if is_last else None
        if self.finish_override is not None and start > 0:
            finish = self.finish_override
        self.num_yielded += len(chunk)
        top = range(request.top_logprobs)  # alternatives: token ids 0..k-1, each less likely than the last
        logprobs = [(logprob_of(t), tuple((j, -1.0 - j) for j in top)) for t in chunk] if request.logprobs else None
        prompt_lps = None
        if start == 0 and request.prompt_logprobs is not None:
            top = range(request.prompt_logprobs)
            prompt_lps = [(logprob_of(t), tuple((j, -1.0 - j) for j in top)) for t in request.prompt_token_ids[1:]]
        cached = self.cached_tokens(request)
        prompt = len(request.prompt_token_ids)
        return GenerationDelta(chunk, logprobs, finish, prompt, num_cached_tokens=cached, prompt_logprobs=prompt_lps)

    async def is_healthy(self) -> bool:
        return self.is_healthy_now

    async def is_ready(self) -> bool:
        return self.is_ready_now

    def render_metrics(self) -> tuple[bytes, str]:
        return b"pdserve_up 1\n", "text/plain; version=0.0.4; charset=utf-8"


@contextmanager
def serve(app: FastAPI, root_path: str = "") -> Iterator[str]:
    """Run `app` with uvicorn on a free port in a thread; yield its base URL. `root_path`: served under that prefix
    (as Serve's `route_prefix` serves it: the scope's path keeps the prefix, `root_path` names it)."""
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off", root_path=root_path)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive(), "uvicorn did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=5)


def wait_until(condition: Callable[[], bool], timeout_s: float = 3.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def server(tokenizer: Any) -> Iterator[tuple[str, FakeBackend]]:
    backend = FakeBackend(tokenizer)
    with serve(create_app(backend, max_body_bytes=MAX_BODY_BYTES)) as url:
        yield url, backend


@pytest.fixture
def backend(server: tuple[str, FakeBackend]) -> FakeBackend:
    server[1].reset()
    return server[1]


@pytest.fixture
def http(server: tuple[str, FakeBackend], backend: FakeBackend) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server[0], timeout=5) as client:
        yield client


@pytest.fixture
def client(server: tuple[str, FakeBackend], backend: FakeBackend) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="x", max_retries=0, timeout=5)


def sse_payloads(response: httpx.Response) -> list[str]:
    return [line[len("data: ") :] for line in response.text.splitlines() if line.startswith("data: ")]


# --- generation: streamed == whole, usage, ids, request mapping ---------------------------------------------------


@pytest.mark.parametrize("tokens_per_delta", [1, 3])
def test_completion_stream_equals_whole(client: openai.OpenAI, backend: FakeBackend, tokens_per_delta: int) -> None:
    backend.reset(tokens_per_delta=tokens_per_delta)
    args: dict[str, Any] = {"model": "fake-model", "prompt": "hi", "max_tokens": 60, "temperature": 0}
    whole = client.completions.create(**args)
    assert whole.id.startswith("cmpl-") and whole.object == "text_completion" and whole.created > 0
    assert whole.choices[0].text == TEXT and whole.choices[0].finish_reason == "stop"
    assert whole.usage is not None and whole.usage.prompt_tokens_details is not None
    assert whole.usage.prompt_tokens_details.cached_tokens == 1
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (2, len(backend.script))
    chunks = list(client.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(texts) == TEXT and not any("\ufffd" in t for t in texts)  # no broken UTF-8 piece
    assert chunks[-2].choices[0].finish_reason == "stop" and chunks[-1].choices == []
    assert chunks[-1].usage == whole.usage
    assert backend.num_closed == 2


def test_null_stream_options_mean_the_defaults(client: openai.OpenAI, backend: FakeBackend) -> None:
    """`stream_options` fields sent as null are their defaults (as at the top level, and as vLLM takes them), but a
    null include_usage is false; as in vLLM, a stream_options object asks for the usage chunk unless it says so."""
    args: dict[str, Any] = {"model": "fake-model", "prompt": "hi", "max_tokens": 5, "stream": True}
    for options in ({"include_usage": False}, {"include_usage": None}):  # null: no usage, as vLLM and OpenAI read it
        plain = list(client.completions.create(**args, stream_options=options))  # type: ignore[arg-type]
        assert plain and all(c.usage is None for c in plain), options
    for options in ({"include_usage": True, "continuous_usage_stats": None}, {}):
        with_usage = list(client.completions.create(**args, stream_options=options))  # type: ignore[arg-type]
        assert with_usage[-1].usage is not None and with_usage[-1].choices == [], options
        assert all(c.usage is None for c in with_usage[:-1]), options


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_continuous_usage_stats_put_the_usage_so_far_in_every_chunk(
    client: openai.OpenAI, backend: FakeBackend, endpoint: str
) -> None:
    """vLLM's `stream_options.continuous_usage_stats`, which guidellm sends (aiperf with `--per-chunk-usage`): every
    chunk carries the usage so far, the completion tokens never decrease, and the last chunk's usage is the whole
    response's."""
    backend.reset(tokens_per_delta=2)
    options: Any = {"include_usage": True, "continuous_usage_stats": True}
    if endpoint == "completions":
        args: dict[str, Any] = {"model": "fake-model", "prompt": "hi", "max_tokens": 60}
        chunks: list[Any] = list(client.completions.create(**args, stream=True, stream_options=options))
    else:
        messages: list[Any] = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
        chunks = list(
            client.chat.completions.create(model="fake-model", messages=messages, stream=True, stream_options=options)
        )
    assert all(c.usage is not None for c in chunks)
    counts = [c.usage.completion_tokens for c in chunks]
    assert counts == sorted(counts) and counts[-1] == len(backend.script)
    assert all(c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens for c in chunks)
    # the prompt's cache hit (the backend's first delta says 1) from the first chunk on, the opening one included
    assert [c.usage.prompt_tokens_details.cached_tokens for c in chunks] == [1] * len(chunks)


def test_vllms_bounds_are_accepted(client: openai.OpenAI, backend: FakeBackend) -> None:
    """What vLLM serves and OpenAI's bounds refuse: a temperature above 2 (min_p's use), more than 4 stop strings
    (HumanEval's 5), n above 16 (pass@k); `seed: -1` is an unseeded draw (vLLM's, llama.cpp's "random")."""
    stops = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]
    out = client.completions.create(model="fake-model", prompt="hi", max_tokens=3, temperature=2.5, stop=stops,
                                    n=20, seed=-1, extra_body={"min_p": 0.1})  # fmt: skip
    assert len(out.choices) == 20
    assert {(r.temperature, r.seed) for r in backend.requests} == {(2.5, None)}
    client.completions.create(model="fake-model", prompt="hi", max_tokens=3, seed=-2)
    assert backend.requests[-1].seed == -2


def test_a_request_naming_no_model_asks_for_the_served_one(http: httpx.Client, backend: FakeBackend) -> None:
    """As vLLM: `model` left out (or null) is the served model, named in the response; OpenAI requires it."""
    for body in ({"prompt": "hi", "max_tokens": 2}, {"prompt": "hi", "max_tokens": 2, "model": None}):
        response = http.post(COMPLETIONS, json=body)
        assert response.status_code == 200 and response.json()["model"] == "org/fake-model", response.text
    chat = http.post(CHAT, json={"messages": USER_HI, "max_tokens": 2, "stream": True})
    assert json.loads(sse_payloads(chat)[0])["model"] == "org/fake-model"


def test_an_assistant_message_sent_back_whole_is_accepted(client: openai.OpenAI, backend: FakeBackend) -> None:
    """A client continuing a conversation with the reply's `message.model_dump()`: its empty OpenAI fields
    (tool_calls, refusal, function_call, audio, annotations) are harmless and accepted; tool calls in them are not."""
    reply = client.chat.completions.create(model="fake-model", messages=USER_HI, max_tokens=3).choices[0].message
    sent_back = reply.model_dump() | {"tool_calls": [], "refusal": None, "function_call": None, "audio": None}
    messages: list[Any] = [*USER_HI, sent_back, {"role": "user", "content": "and?"}]
    again = client.chat.completions.create(model="fake-model", messages=messages, max_tokens=3)
    assert again.choices[0].message.content
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model="fake-model", messages=[*USER_HI, {**sent_back, "tool_calls": [call]}], max_tokens=3
        )


@pytest.mark.parametrize("n", [1, 2])
def test_continuous_usage_stats_count_beside_include_usage_only(
    http: httpx.Client, backend: FakeBackend, n: int
) -> None:
    """As vLLM: continuous_usage_stats counts only beside include_usage, which a stream_options object asks for
    unless it says false; then no chunk carries usage."""
    body = {"model": "fake-model", "prompt": "hi", "max_tokens": 5, "n": n, "stream": True,
            "stream_options": {"continuous_usage_stats": True}}  # fmt: skip
    payloads = sse_payloads(http.post(COMPLETIONS, json=body))
    assert payloads[-1] == "[DONE]" and all(json.loads(p).get("usage") is not None for p in payloads[:-1])
    body["stream_options"] = {"continuous_usage_stats": True, "include_usage": False}
    payloads = sse_payloads(http.post(COMPLETIONS, json=body))
    assert payloads[-1] == "[DONE]" and all(json.loads(p).get("usage") is None for p in payloads[:-1])


def test_a_template_variable_the_template_cannot_use_is_a_400(tokenizer: Any) -> None:
    """A chat_template_kwargs value of a type the template cannot use fails its rendering (a TypeError in Jinja):
    the client's input, so a 400 naming the field, as vLLM answers — it was a 500."""
    template = "{{ budget + 1 }}{% for m in messages %}{{ m.content }}{% endfor %}"
    backend = FakeBackend(tokenizer)
    with serve(create_app(backend, chat_template=template)) as url:
        ok = httpx.post(f"{url}{CHAT}", json=chat(chat_template_kwargs={"budget": 5}, max_tokens=2)[1], timeout=10)
        bad = httpx.post(f"{url}{CHAT}", json=chat(chat_template_kwargs={"budget": "5"}, max_tokens=2)[1], timeout=10)
    assert ok.status_code == 200, ok.text
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "chat_template_kwargs", bad.text
    assert len(backend.requests) == 1


def test_a_chat_turn_the_template_drops_does_not_count_against_the_context(tokenizer: Any) -> None:
    """Templates may drop content (Qwen3's drops earlier turns' reasoning; this one keeps only the newest turn): an
    earlier message longer than any fitting prompt was refused by the pre-template length check, which summed every
    message; only the newest user turn is surely rendered, so only it is checked before the template (a newest turn
    too long for any tokenization is still refused untokenized), and the rendered ids after."""
    from pdserve.api.intake import Tokenization

    template = "{{ messages[-1].content }}"
    backend = FakeBackend(tokenizer)
    longest = Tokenization(tokenizer, MAX_MODEL_LEN).max_token_chars
    huge = "ab " * (MAX_MODEL_LEN * longest)
    dropped = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": huge}, USER_HI[0]]
    with serve(create_app(backend, chat_template=template)) as url:
        fits = httpx.post(
            f"{url}{CHAT}", json={"model": "fake-model", "messages": dropped, "max_tokens": 2}, timeout=10
        )
        newest = [USER_HI[0], {"role": "user", "content": huge}]
        refused = httpx.post(
            f"{url}{CHAT}", json={"model": "fake-model", "messages": newest, "max_tokens": 2}, timeout=10
        )
    assert fits.status_code == 200, fits.text
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "context_length_exceeded", refused.text
    assert len(backend.requests) == 1


# The bodies the load tools send, as recorded from guidellm 0.8.1 (request_handlers.py; its client drops the None
# fields, `stop` among them, before sending: kept here as a robustness case) and aiperf 0.13.0 (its endpoints'
# payload builders): docs/LOAD_TESTS.md runs both unchanged against pdserve.
LOAD_TOOL_BODIES = {
    "guidellm-chat": ("/v1/chat/completions", {
        "model": "fake-model", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi there"}]}],
        "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        "max_completion_tokens": 5, "stop": None, "ignore_eos": True,
    }),
    "guidellm-text": ("/v1/completions", {
        "model": "fake-model", "prompt": "hi there", "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        "max_tokens": 5, "stop": None, "ignore_eos": True,
    }),
    # aiperf with the documented `--extra-inputs ignore_eos:true`; `--per-chunk-usage` adds continuous_usage_stats
    "aiperf-chat": ("/v1/chat/completions", {
        "model": "fake-model", "messages": [{"role": "user", "content": " On the green coverlet"}], "stream": True,
        "max_completion_tokens": 5, "ignore_eos": True, "stream_options": {"include_usage": True},
    }),
    "aiperf-chat-per-chunk-usage": ("/v1/chat/completions", {
        "model": "fake-model", "messages": [{"role": "user", "content": " On the green coverlet"}], "stream": True,
        "max_completion_tokens": 5, "ignore_eos": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }),
    "aiperf-text": ("/v1/completions", {
        "prompt": " On the green coverlet", "model": "fake-model", "stream": True, "max_tokens": 5, "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }),
    # `--batch-size-text 2`: a list of prompts
    "aiperf-text-batch": ("/v1/completions", {
        "prompt": [" On the green coverlet", " a lamp"], "model": "fake-model", "stream": True, "max_tokens": 5,
        "ignore_eos": True, "stream_options": {"include_usage": True},
    }),
}  # fmt: skip


@pytest.mark.parametrize("tool", sorted(LOAD_TOOL_BODIES))
def test_load_tools_bodies_are_served_as_asked(http: httpx.Client, backend: FakeBackend, tool: str) -> None:
    path, body = LOAD_TOOL_BODIES[tool]
    response = http.post(path, json=body)
    assert response.status_code == 200, response.text
    chunks = [json.loads(p) for p in sse_payloads(response) if p != "[DONE]"]
    assert sse_payloads(response)[-1] == "[DONE]"
    num_prompts = len(body["prompt"]) if isinstance(body.get("prompt"), list) else 1
    assert chunks[-1]["usage"]["completion_tokens"] == 5 * num_prompts and backend.requests[0].max_tokens == 5
    assert {c["index"] for chunk in chunks for c in chunk["choices"]} == set(range(num_prompts))
    assert backend.requests[0].ignore_eos == bool(body.get("ignore_eos"))
    continuous = body["stream_options"].get("continuous_usage_stats", False)
    assert all(c.get("usage") for c in chunks) == continuous


def test_chat_stream_equals_whole(client: openai.OpenAI, backend: FakeBackend, tokenizer: Any) -> None:
    messages: list[Any] = [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": "there"}]},
    ]
    whole = client.chat.completions.create(model="org/fake-model", messages=messages)
    assert whole.id.startswith("chatcmpl-") and whole.choices[0].message.role == "assistant"
    assert whole.choices[0].message.content == TEXT and whole.choices[0].finish_reason == "stop"
    expected = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi\nthere"}]
    prompt = tokenizer.apply_chat_template(expected, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert backend.requests[0].prompt_token_ids == prompt
    assert backend.requests[0].max_tokens == MAX_MODEL_LEN - len(prompt)  # no limit given: fill the context
    chunks = list(
        client.chat.completions.create(
            model="fake-model", messages=messages, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == TEXT
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_generation_request_carries_parameters(client: openai.OpenAI, backend: FakeBackend) -> None:
    client.completions.create(
        model="fake-model",
        prompt=[5, 6, 7],
        max_tokens=4,
        temperature=0.5,
        top_p=0.9,
        seed=7,
        extra_body={"top_k": -1, "stop_token_ids": [9], "ignore_eos": True, "min_tokens": 2, "cache_salt": "t1"},
        extra_headers={"traceparent": TRACEPARENT},
    )
    request = backend.requests[0]
    assert request.request_id.startswith("cmpl-") and len(request.request_id) == len("cmpl-") + 32
    assert request == GenerationRequest(
        request_id=request.request_id,
        prompt_token_ids=[5, 6, 7],
        max_tokens=4,
        temperature=0.5,
        top_p=0.9,
        top_k=0,
        seed=7,
        stop_token_ids=[9],
        ignore_eos=True,
        min_tokens=2,
        logprobs=False,
        cache_salt="t1",
        traceparent=TRACEPARENT,
    )


def test_defaults_and_length_finish(client: openai.OpenAI, backend: FakeBackend) -> None:
    completion = client.completions.create(model="fake-model", prompt=["hi"])  # a batch of one prompt
    assert completion.choices[0].finish_reason == "length" and completion.usage is not None
    assert completion.usage.completion_tokens == 16  # OpenAI's default max_tokens
    request = backend.requests[0]
    assert (request.temperature, request.top_p, request.top_k, request.stop_token_ids) == (1.0, 1.0, 0, [])


@pytest.mark.parametrize("prompt", [["hi", "the quick"], [[5, 6], [7]]])
def test_a_batch_of_prompts_through_the_openai_client(client: openai.OpenAI, backend: FakeBackend, prompt: Any) -> None:
    completion = client.completions.create(model="fake-model", prompt=prompt, n=2, max_tokens=3, echo=True)
    echoes = [p if isinstance(p, str) else backend.tokenizer.decode(p) for p in prompt]
    assert [c.index for c in completion.choices] == [0, 1, 2, 3]
    assert [c.text for c in completion.choices] == [e + backend.tokenizer.decode(backend.script[:3]) for e in echoes
                                                    for _ in range(2)]  # fmt: skip
    assert completion.usage is not None and completion.usage.completion_tokens == 4 * 3
    assert completion.usage.prompt_tokens == sum(len(r.prompt_token_ids) for r in backend.requests[::2])
    chunks = list(client.completions.create(model="fake-model", prompt=prompt, max_tokens=3, stream=True))
    assert {c.choices[0].index for c in chunks if c.choices} == {0, 1}


# --- stop strings and the detokenizer -------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_split_across_tokens_never_leaks(client: openai.OpenAI, backend: FakeBackend, stream: bool) -> None:
    args: dict[str, Any] = {"model": "fake-model", "prompt": "hi", "max_tokens": 60, "stop": ["zzz", "lazy dog"]}
    if stream:
        chunks = list(client.completions.create(**args, stream=True))
        text, reason = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
    else:
        choice = client.completions.create(**args).choices[0]
        text, reason = choice.text, choice.finish_reason
    assert text == "The quick brown fox jumps over the " and reason == "stop"
    # The stream was closed as soon as the stop string matched: the backend aborts and frees the request's blocks.
    wait_until(lambda: backend.num_closed == 1)
    assert backend.num_yielded < len(backend.script)


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
@pytest.mark.parametrize("stream", [False, True])
def test_stop_reason_names_the_stop_string_or_token(http: httpx.Client, backend: FakeBackend, endpoint: str,
                                                    stream: bool) -> None:  # fmt: skip
    """vLLM's `stop_reason`: the stop string that ended the output, the stop_token_ids id, or null (EOS, a length),
    in a whole response and in a stream's last choice chunk, for each of n choices."""
    stop_token = backend.script[4]
    cases = [({"stop": ["zzz", "lazy dog"]}, "lazy dog"), ({"stop_token_ids": [stop_token]}, stop_token),
             ({"stop": ["zzz"]}, None), ({"max_tokens": 3}, None)]  # fmt: skip
    for fields, want in cases:
        body: dict[str, Any] = {"model": "fake-model", "max_tokens": 60, "n": 2, "stream": stream, **fields}
        if endpoint == "chat":
            body["messages"] = [{"role": "user", "content": "hi"}]
            if "max_tokens" in fields:  # the same limit under chat's name
                body["max_completion_tokens"] = body.pop("max_tokens")
        else:
            body["prompt"] = "hi"
        url = COMPLETIONS if endpoint == "completions" else CHAT
        if stream:
            chunks = [json.loads(p) for p in sse_payloads(http.post(url, json=body)) if p != "[DONE]"]
            last = {c["choices"][0]["index"]: c["choices"][0] for c in chunks if c["choices"]}
            choices = [last[0], last[1]]
            assert all(c["choices"][0]["stop_reason"] is None for c in chunks if not c["choices"][0]["finish_reason"])
        else:
            response = http.post(url, json=body)
            assert response.status_code == 200, response.text
            choices = response.json()["choices"]
        assert [c["stop_reason"] for c in choices] == [want, want], (fields, choices)
        assert {c["finish_reason"] for c in choices} == {"length" if "max_tokens" in fields else "stop"}


def detokenize(tokenizer: Any, text: str, stop: list[str]) -> tuple[list[str], IncrementalDetokenizer]:
    d = IncrementalDetokenizer(tokenizer, stop)
    deltas = [d.add([t]) for t in tokenizer(text, add_special_tokens=False)["input_ids"]]
    return [*deltas, d.flush()], d


def test_detokenizer_emits_whole_characters_only(tokenizer: Any) -> None:
    deltas, d = detokenize(tokenizer, TEXT, [])
    assert "".join(deltas) == TEXT and not d.is_stopped
    assert not any("\ufffd" in delta for delta in deltas) and "😀" in deltas


def test_detokenizer_holds_back_possible_stop_prefixes(tokenizer: Any) -> None:
    deltas, d = detokenize(tokenizer, "abc def ghi", ["f g"])
    assert "".join(deltas) == "abc de" and d.is_stopped
    assert not any(delta.endswith("f") or delta.endswith("f ") for delta in deltas)
    # A held-back prefix that never completes its stop string is released at the end.
    deltas, d = detokenize(tokenizer, "the lazy do", ["lazy dog"])
    assert "".join(deltas) == "the lazy do" and deltas[-1] != "" and not d.is_stopped


def test_detokenizer_cuts_at_the_earliest_stop(tokenizer: Any) -> None:
    assert "".join(detokenize(tokenizer, TEXT, ["dog", "quick"])[0]) == "The "
    assert (
        "".join(detokenize(tokenizer, TEXT, ["😀"])[0]) == "The quick brown fox jumps over the lazy dog. Héllo wörld "
    )
    assert detokenize(tokenizer, TEXT, ["The"])[0] == [""] * (len(tokenizer(TEXT)["input_ids"]) + 1)


# --- logprobs -------------------------------------------------------------------------------------------------------


def test_completion_logprobs_streamed_equal_whole(client: openai.OpenAI, backend: FakeBackend) -> None:
    args: dict[str, Any] = {"model": "fake-model", "prompt": "hi", "max_tokens": 30, "logprobs": 0, "stop": "wör"}
    whole = client.completions.create(**args).choices[0].logprobs
    assert whole is not None and whole.tokens and whole.token_logprobs and whole.text_offset
    ids = backend.script[: len(whole.tokens)]
    assert whole.token_logprobs == [logprob_of(t) for t in ids]
    assert whole.tokens[:3] == ["The", " qui", "ck"] and whole.text_offset[:4] == [0, 3, 7, 9]
    chunks = list(client.completions.create(**args, stream=True))
    pieces = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs is not None]
    assert [t for p in pieces for t in p.tokens or []] == whole.tokens
    assert [lp for p in pieces for lp in p.token_logprobs or []] == whole.token_logprobs
    assert [o for p in pieces for o in p.text_offset or []] == whole.text_offset


def test_chat_logprobs_streamed_equal_whole(client: openai.OpenAI, backend: FakeBackend) -> None:
    args: dict[str, Any] = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "logprobs": True}
    whole = client.chat.completions.create(**args, max_completion_tokens=5).choices[0].logprobs
    assert whole is not None and whole.content is not None
    assert [(t.token, t.logprob) for t in whole.content] == [
        ("The", logprob_of(backend.script[0])),
        (" qui", logprob_of(backend.script[1])),
        ("ck", logprob_of(backend.script[2])),
        (" b", logprob_of(backend.script[3])),
        ("row", logprob_of(backend.script[4])),
    ]
    assert whole.content[1].bytes == list(b" qui") and backend.requests[0].max_tokens == 5
    chunks = list(client.chat.completions.create(**args, max_completion_tokens=5, stream=True))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content or []]
    assert streamed == whole.content
    # é, ö and 😀 span several tokens, each U+FFFD alone: their bytes join into the characters (they were null)
    args["top_logprobs"] = 2
    spelled = client.chat.completions.create(**args, max_completion_tokens=len(backend.script) - 1).choices[0].logprobs
    assert spelled is not None and spelled.content is not None
    assert b"".join(bytes(t.bytes or b"?") for t in spelled.content) == TEXT.encode()
    assert any(t.token == "\ufffd" for t in spelled.content) and all(len(t.top_logprobs) == 2 for t in spelled.content)


# --- errors ---------------------------------------------------------------------------------------------------------

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
USER_HI = [{"role": "user", "content": "hi"}]
CONTEXT = "context_length_exceeded"


def completion(**fields: Any) -> tuple[str, dict[str, Any]]:
    return COMPLETIONS, {"model": "fake-model", "prompt": "hi", **fields}


def chat(**fields: Any) -> tuple[str, dict[str, Any]]:
    return CHAT, {"model": "fake-model", "messages": USER_HI, **fields}


@pytest.mark.parametrize(
    ("request_", "status", "param", "code"),
    [
        (completion(model=5), 400, "model", None),
        (completion(model="other"), 404, "model", "model_not_found"),
        ((COMPLETIONS, {"model": "fake-model"}), 400, "prompt", None),
        (completion(prompt=""), 400, "prompt", None),
        (completion(prompt=[]), 400, "prompt", None),
        # A batch is refused whole for any prompt's fault, before any prompt reaches the backend
        (completion(prompt=["a", [1]]), 400, "prompt", None),
        (completion(prompt=["a", ""]), 400, "prompt", None),
        (completion(prompt=[[1], []]), 400, "prompt", None),
        (completion(prompt=[[1], [512]]), 400, "prompt", None),
        (completion(prompt=[[1], [5] * MAX_MODEL_LEN]), 400, "prompt", CONTEXT),
        (completion(prompt=[[1], [5] * 120], max_tokens=9), 400, "max_tokens", CONTEXT),
        (completion(prompt=["a"] * 129), 400, "prompt", None),  # 129 sequences, as n = 129 would be
        (completion(prompt=[["a", "b"]]), 400, "prompt[0][0]", None),  # nested a level too deep: a 200 before review
        (completion(prompt=[[[1, 2]]]), 400, "prompt[0][0]", None),
        (completion(prompt=[[[1], [2]]]), 400, "prompt[0][0]", None),
        (completion(prompt=["a"] * 65, n=2), 400, "n", None),
        (completion(prompt={"text": "hi"}), 400, "prompt", None),
        (completion(prompt=[1, 512]), 400, "prompt", None),  # the vocabulary has 512 tokens
        (completion(prompt=[-1]), 400, "prompt", None),
        (completion(prompt=[5] * MAX_MODEL_LEN), 400, "prompt", CONTEXT),
        (completion(prompt=[5] * 120, max_tokens=9), 400, "max_tokens", CONTEXT),
        (completion(max_tokens=-1), 400, "max_tokens", None),
        (completion(max_tokens="16"), 400, "max_tokens", None),
        (completion(temperature=-0.5), 400, "temperature", None),
        (completion(top_p=0), 400, "top_p", None),
        (completion(top_k=-2), 400, "top_k", None),
        (completion(n=129), 400, "n", None),
        (completion(n=0), 400, "n", None),
        (completion(stop=[chr(97 + i) for i in range(17)]), 400, "stop", None),
        (completion(logprobs=21), 400, "logprobs", None),
        (completion(max_tokens=0, echo=False), 400, "max_tokens", None),  # 0 only with echo (see below)
        (completion(presence_penalty=2.5), 400, "presence_penalty", None),
        (completion(logit_bias={"600": 1.0}), 400, "logit_bias", None),  # outside the vocabulary
        (completion(logit_bias={"5": 101}), 400, "logit_bias", None),
        (completion(logit_bias={"\u00b2": 1.0}), 400, "logit_bias", None),  # isdigit() but not int(): was a 500
        (completion(logit_bias={"\u0663": 1.0}), 400, "logit_bias", None),  # Arabic-Indic 3: was read as token 3
        (completion(logit_bias={"5": 1.0, "05": -1.0}), 400, "logit_bias", None),  # one token twice: one was dropped
        (completion(temperature=float("nan")), 400, "temperature", None),
        (completion(stream_options={"include_usage": True}), 400, "stream_options", None),
        (completion(stream="yes"), 400, "stream", None),
        (completion(min_tokens=20), 400, "min_tokens", None),
        (completion(stop_token_ids=[999]), 400, "stop_token_ids", None),
        # Unbounded, they slowed every stream on the replica: each step checks each stop id, each block hashes the salt.
        (completion(stop_token_ids=[5] * 257), 400, "stop_token_ids", None),
        (completion(cache_salt="s" * 257), 400, "cache_salt", None),
        (completion(cache_salt=""), 400, "cache_salt", None),  # would salt nothing (found in review)
        (chat(stop_token_ids=[5] * 257), 400, "stop_token_ids", None),
        (chat(messages=[]), 400, "messages", None),
        (chat(messages=[{"role": "robot", "content": "hi"}]), 400, "messages[0].role", None),
        (chat(messages=[{"role": "user"}]), 400, "messages[0]", None),
        (
            chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}]),
            400,
            "messages[0].content[0].type",
            None,
        ),
        (chat(logprobs=True, top_logprobs=21), 400, "top_logprobs", None),
        (chat(max_completion_tokens=200), 400, "max_completion_tokens", CONTEXT),
        (chat(messages=[{"role": "user", "content": "x " * 200}]), 400, "messages", CONTEXT),
        # template variables that collide with the render call's own arguments (each was a 500) or change how the
        # prompt is built
        (chat(chat_template_kwargs={"messages": []}), 400, "chat_template_kwargs", None),
        (chat(chat_template_kwargs={"conversations": []}), 400, "chat_template_kwargs", None),
        (chat(chat_template_kwargs={"self": 1}), 400, "chat_template_kwargs", None),
        (chat(chat_template_kwargs={"sanitize_control_tokens": True}), 400, "chat_template_kwargs", None),
        # lone surrogates wherever the template may render text (were 500s from the tokenizer)
        (chat(messages=[{"role": "user", "content": "hi", "name": "\ud800"}]), 400, "messages[0].name", None),
        (chat(chat_template_kwargs={"extra": ["\udfff"]}), 400, "chat_template_kwargs", None),
        (chat(chat_template_kwargs={"\ud800": 1}), 400, "chat_template_kwargs", None),
        (completion(prompt=[5] * 120, max_tokens=10**2500), 400, "max_tokens", CONTEXT),  # not echoed at length
    ],
)
def test_invalid_requests_never_reach_the_backend(
    http: httpx.Client,
    backend: FakeBackend,
    request_: tuple[str, dict[str, Any]],
    status: int,
    param: str,
    code: str | None,
) -> None:
    body = json.dumps(request_[1])  # ASCII: a lone surrogate goes as its JSON escape, as a client may send it
    response = http.post(request_[0], content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code)
    assert error["message"] and "Traceback" not in response.text and "pydantic" not in response.text
    assert len(response.content) < 2048  # nothing of the request's echoed at length
    assert backend.requests == []


@pytest.mark.parametrize("stream", [False, True])
def test_max_tokens_0_with_echo_scores_the_prompt(http: httpx.Client, backend: FakeBackend, stream: bool) -> None:
    """What evaluation harnesses send for a log-likelihood: the prompt back with its logprobs, no output. One token
    is generated for the prompt's logprobs to come with, and dropped."""
    response = http.post(COMPLETIONS, json=completion(prompt=[5, 6, 7], max_tokens=0, echo=True, logprobs=1,
                                                      stream=stream)[1])  # fmt: skip
    assert response.status_code == 200, response.text
    if stream:
        chunks = [json.loads(p) for p in sse_payloads(response)[:-1]]
        text = "".join(c["choices"][0]["text"] for c in chunks)
        logprobs = [
            lp for c in chunks if c["choices"][0]["logprobs"] for lp in c["choices"][0]["logprobs"]["token_logprobs"]
        ]
    else:
        choice = response.json()["choices"][0]
        text, logprobs = choice["text"], choice["logprobs"]["token_logprobs"]
    assert text == backend.tokenizer.decode([5, 6, 7])  # the prompt, nothing generated
    assert logprobs == [None, logprob_of(6), logprob_of(7)]  # the first prompt token has none
    request = backend.requests[0]
    assert (request.max_tokens, request.prompt_logprobs) == (1, 1)


@pytest.mark.parametrize(("stream", "n"), [(False, 1), (True, 1), (False, 2), (True, 2)])
def test_echo_of_token_ids_ending_inside_a_character_shows_it_once(
    client: openai.OpenAI, backend: FakeBackend, stream: bool, n: int
) -> None:
    """A prompt of token ids cut inside 😀, whose output completes it: the echo and the output read as the whole text
    (found in review: the echo ended in U+FFFD and the output began with the character, 'Party \ufffd🎉 time')."""
    tokens = backend.script[:-1]
    cut = next(k for k in range(1, len(tokens)) if backend.tokenizer.decode(tokens[:k]).endswith("\ufffd"))
    script = backend.script
    backend.script = [*tokens[cut:], EOS_ID]
    try:
        response = client.completions.create(
            model="fake-model", prompt=tokens[:cut], echo=True, max_tokens=64, n=n, stream=stream
        )
        texts = [""] * n
        for chunk in response if stream else [response]:
            for choice in chunk.choices:
                texts[choice.index] += choice.text
    finally:
        backend.script = script
    assert texts == [TEXT] * n


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"{nope", "the request body is not valid JSON"),
        (b"[1, 2]", "the request body must be a JSON object, sent with Content-Type: application/json"),
        (b"", "the request body is missing"),
    ],
)
def test_malformed_bodies(http: httpx.Client, content: bytes, message: str) -> None:
    response = http.post(COMPLETIONS, content=content, headers={"content-type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["message"] == message


def test_body_size_limit(http: httpx.Client) -> None:
    big = json.dumps({"model": "fake-model", "prompt": "x" * MAX_BODY_BYTES}).encode()
    assert http.post(COMPLETIONS, content=big).status_code == 413  # by Content-Length
    response = http.post(COMPLETIONS, content=iter([big[:1000], big[1000:]]))  # chunked: counted while reading
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    small = json.dumps({"model": "fake-model", "prompt": "hi", "max_tokens": 2}).encode()
    assert http.post(COMPLETIONS, content=iter([small[:10], small[10:]])).status_code == 200


def test_unknown_route_and_method(http: httpx.Client) -> None:
    missing = http.post("/v1/nope", json={})
    assert missing.status_code == 404 and missing.json()["error"]["message"] == "Not Found: POST /v1/nope"
    assert http.get(COMPLETIONS).status_code == 405 and http.get(COMPLETIONS).json()["error"]["type"]


@pytest.mark.parametrize("stream", [False, True])
def test_no_capacity_is_429_or_503_with_retry_after(
    client: openai.OpenAI, http: httpx.Client, backend: FakeBackend, stream: bool
) -> None:
    backend.reset(error=CapacityError("all replicas are full", retry_after_s=1.5))
    with pytest.raises(openai.RateLimitError) as raised:
        client.completions.create(model="fake-model", prompt="hi", stream=stream)
    assert raised.value.response.headers["retry-after"] == "2"
    error = {
        "message": "all replicas are full",
        "type": "rate_limit_error",
        "param": None,
        "code": "rate_limit_exceeded",
    }
    assert raised.value.body == error
    backend.reset(error=CapacityError("no replica is up", status_code=503))
    response = http.post(CHAT, json={"model": "fake-model", "messages": USER_HI, "stream": stream})
    assert response.status_code == 503 and response.headers["retry-after"] == "1"


@pytest.mark.parametrize("stream", [False, True])
def test_backend_errors(http: httpx.Client, backend: FakeBackend, stream: bool) -> None:
    body = {"model": "fake-model", "prompt": "hi", "stream": stream}
    backend.reset(error=InvalidRequest("prompt has a token the engine rejects"))
    rejected = http.post(COMPLETIONS, json=body)
    assert (
        rejected.status_code == 400 and rejected.json()["error"]["message"] == "prompt has a token the engine rejects"
    )
    backend.reset(error=RuntimeError("secret internals"))
    failed = http.post(COMPLETIONS, json=body)
    error = {"message": "internal server error", "type": "server_error", "param": None, "code": None}
    assert failed.status_code == 500 and failed.json()["error"] == error


def test_error_after_the_headers_is_an_error_event(
    client: openai.OpenAI, http: httpx.Client, backend: FakeBackend
) -> None:
    backend.error_after = RuntimeError("replica died")
    events = sse_payloads(http.post(COMPLETIONS, json={"model": "fake-model", "prompt": "hi", "stream": True}))
    assert json.loads(events[0])["choices"][0]["text"] == "The"
    assert json.loads(events[1])["error"]["type"] == "server_error" and events[2:] == ["[DONE]"]
    with pytest.raises(openai.APIError):
        list(client.completions.create(model="fake-model", prompt="hi", stream=True))
    assert backend.num_closed == 2


def test_abort_by_the_backend_is_not_a_success(http: httpx.Client, backend: FakeBackend) -> None:
    backend.finish_override = "abort"
    response = http.post(COMPLETIONS, json={"model": "fake-model", "prompt": "hi"})
    assert response.status_code == 503 and response.json()["error"]["type"] == "server_error"


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("n", [1, 2])
def test_an_abort_before_any_output_is_a_503_streamed_or_not(
    http: httpx.Client, backend: FakeBackend, stream: bool, n: int
) -> None:
    """The backend aborts before the first token (a replica drained or failed): 503 with Retry-After whether the
    client streams or not (streamed, it was a 200 carrying an error event, which SDKs do not retry), and every
    choice's stream is closed."""
    backend.abort_first = True
    body = {"model": "fake-model", "prompt": "hi", "max_tokens": 5, "stream": stream, "n": n}
    response = http.post(COMPLETIONS, json=body)
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"] == "1" and response.json()["error"]["code"] == "service_unavailable"
    wait_until(lambda: backend.num_closed == len(backend.requests))


# --- disconnects free the backend's request -------------------------------------------------------------------------


def test_client_gone_mid_stream_closes_the_backend_stream(http: httpx.Client, backend: FakeBackend) -> None:
    backend.reset(delay_s=0.02)
    body = {"model": "fake-model", "prompt": "hi", "max_tokens": 40, "stream": True}
    with http.stream("POST", COMPLETIONS, json=body) as response:
        assert next(response.iter_lines()).startswith("data: ")
    wait_until(lambda: backend.num_closed == 1)
    assert backend.num_yielded < 40


def test_client_gone_before_a_whole_response_closes_the_backend_stream(server: tuple[str, FakeBackend]) -> None:
    backend = server[1]
    backend.reset(delay_s=0.02)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server[0]}{COMPLETIONS}", json=completion(max_tokens=40)[1], timeout=0.2)
    wait_until(lambda: backend.num_closed == 1)
    assert backend.num_yielded < 40


# --- models, health, metrics ----------------------------------------------------------------------------------------


def test_models_health_metrics(client: openai.OpenAI, http: httpx.Client, backend: FakeBackend) -> None:
    [card] = client.models.list().data
    assert (card.id, card.object, card.owned_by) == ("org/fake-model", "model", "pdserve")
    assert card.model_dump()["max_model_len"] == MAX_MODEL_LEN
    assert client.models.retrieve("fake-model").id == "org/fake-model"
    assert http.get("/v1/models/other").status_code == 404
    assert http.get("/health").status_code == 200 and http.get("/health").json() == {}
    backend.is_healthy_now = False
    assert http.get("/health").status_code == 503
    assert http.get("/ready").status_code == 200 and http.get("/ready").json() == {}
    backend.is_ready_now = False
    not_ready = http.get("/ready")
    assert not_ready.status_code == 503 and not_ready.headers["Retry-After"] == "1"
    metrics = http.get("/metrics")
    assert metrics.text.startswith("pdserve_up 1\n")  # the backend's exposition, then the HTTP layer's
    assert metrics.headers["content-type"].startswith("text/plain; version=0.0.4")
    series = f'ingress="{ingress_id()}",method="GET",route="/v1/models",status="200"'
    assert f"pdserve_http_requests_total{{{series}}}" in metrics.text


# --- a real chat template -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_chat_template(smollm2_dir: Any) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    backend = FakeBackend(tokenizer)
    messages: list[Any] = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a fox."}]
    with serve(create_app(backend)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=5)
        whole = client.chat.completions.create(model="fake-model", messages=messages, max_tokens=60)
        chunks = client.chat.completions.create(model="fake-model", messages=messages, max_tokens=60, stream=True)
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert backend.requests[0].prompt_token_ids == prompt
    assert whole.choices[0].message.content == streamed == TEXT


class SlowFirstToken(FakeBackend):
    """Its first delta comes only after `first_after_s`; then, with `fail`, a server error instead of it."""

    def __init__(self, tokenizer: Any, first_after_s: float, fail: bool = False) -> None:
        super().__init__(tokenizer)
        self.first_after_s, self.fail = first_after_s, fail

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        await asyncio.sleep(self.first_after_s)
        if self.fail:
            raise ServerError("no replica could take it", retry_after_s=1.0)
        async for delta in super().generate(request):
            yield delta


@pytest.mark.parametrize("n", [1, 3])  # n choices: the same (the headers waited for choice 0's first token)
@pytest.mark.parametrize("fail", [False, True])
def test_a_slow_first_token_gets_keepalives_then_output_or_an_error_event(tokenizer: Any, fail: bool, n: int) -> None:
    """Past `first_token_wait_s` the stream starts (200) and sends SSE keep-alive comments until the first token;
    an error after that arrives as an error event, then [DONE]."""
    backend = SlowFirstToken(tokenizer, first_after_s=0.5, fail=fail)
    app = create_app(backend, first_token_wait_s=0.05, sse_keepalive_s=0.1)
    with serve(app) as url:
        body = {"model": "fake-model", "prompt": "hello", "max_tokens": 3, "stream": True, "n": n}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=10) as response:
            lines = [line for line in response.iter_lines() if line]
    assert response.status_code == 200
    first_data = next(i for i, line in enumerate(lines) if line.startswith("data:"))
    assert first_data >= 3 and all(line == ": keep-alive" for line in lines[:first_data])
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line.removeprefix("data: ")) for line in lines[first_data:-1]]
    if fail:
        assert events == [{"error": events[0]["error"]}] and events[0]["error"]["type"] == "server_error"
    else:
        texts = ["".join(e["choices"][0]["text"] for e in events if e.get("choices") and e["choices"][0]["index"] == i)
                 for i in range(n)]  # fmt: skip
        assert texts == [TEXT[: len(texts[0])]] * n and texts[0]


class CountedSlowFirstToken(SlowFirstToken):
    """Counts the backend streams that started and those that ended (closed, or run to their end)."""

    def __init__(self, tokenizer: Any, first_after_s: float) -> None:
        super().__init__(tokenizer, first_after_s)
        self.started = self.ended = 0

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        self.started += 1
        try:
            async for delta in super().generate(request):
                yield delta
        finally:
            self.ended += 1


def test_clients_leaving_slow_streams_anywhere_leave_no_backend_stream_open(tokenizer: Any) -> None:
    """Streams of 1-4 choices whose first token comes now, soon or late, the client leaving before the headers,
    during the keep-alives, mid-stream, or after the end: every backend stream that started ends."""
    import random

    backend = CountedSlowFirstToken(tokenizer, first_after_s=0.0)
    app = create_app(backend, first_token_wait_s=0.1, sse_keepalive_s=0.03)
    rng = random.Random(3)
    with serve(app) as url:
        for _ in range(40):
            n, backend.first_after_s = rng.randint(1, 4), rng.choice([0.0, 0.05, 0.3])
            backend.reset(delay_s=0.01)
            leave = rng.choice(["before the headers", "in the keep-alives", "mid-stream", "after the end"])
            body = {"model": "fake-model", "prompt": "hello", "max_tokens": 20, "stream": True, "n": n}
            timeout = httpx.Timeout(10, read=0.05 if leave == "before the headers" else 10)
            try:
                with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=timeout) as response:
                    for line in response.iter_lines():
                        if (leave == "in the keep-alives" and line.startswith(":")) or (
                            leave == "mid-stream" and line.startswith("data: {")
                        ):
                            break
            except httpx.ReadTimeout:
                pass
            wait_until(lambda: backend.ended == backend.started, timeout_s=5)
        assert backend.started > 40


def test_explicit_null_takes_the_models_default_as_an_absent_field(tokenizer: Any) -> None:
    """vLLM: `"temperature": null` is the model's generation_config default, as when the field is absent."""
    backend = FakeBackend(tokenizer)
    defaults = {"temperature": 0.3, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.1}
    with serve(create_app(backend, sampling_defaults=defaults)) as url:
        body = {"model": "fake-model", "prompt": "hi", "max_tokens": 2}
        assert httpx.post(f"{url}/v1/completions", json=body).status_code == 200
        nulls = {k: None for k in defaults}
        assert httpx.post(f"{url}/v1/completions", json={**body, **nulls}).status_code == 200
    absent, null = backend.requests

    def got(r: Any) -> tuple[Any, ...]:
        return r.temperature, r.top_p, r.top_k, r.repetition_penalty

    assert got(absent) == (0.3, 0.8, 20, 1.1)
    assert got(null) == got(absent), got(null)  # was OpenAI's (1.0, 1.0, 0, 1.0)


def test_logprobs_0_still_reports_the_sampled_token_in_top_logprobs(tokenizer: Any) -> None:
    """OpenAI/vLLM: up to logprobs+1 entries per token, the sampled one always; logprobs=0 -> one entry each."""
    backend = FakeBackend(tokenizer)
    with serve(create_app(backend)) as url:
        body = {"model": "fake-model", "prompt": "hi", "max_tokens": 3, "logprobs": 0}
        lp = httpx.post(f"{url}/v1/completions", json=body).json()["choices"][0]["logprobs"]
    assert lp["top_logprobs"] == [{t: v} for t, v in zip(lp["tokens"], lp["token_logprobs"], strict=True)], (
        lp
    )  # was null


@pytest.mark.parametrize(
    ("fields", "said"),
    [({"logit_bias": {"9" * 5000: 1.0}}, "token ids"), ({"temperature": float("nan")}, "finite number")],
)
def test_a_bad_value_is_named_in_the_clients_terms(fields: dict[str, Any], said: str) -> None:
    """A 5,000-digit logit_bias key was refused with int()'s message about sys.set_int_max_str_digits, a NaN
    temperature as "less than or equal to 2" (found in review)."""
    from pydantic import ValidationError

    from pdserve.api.protocol import CompletionRequest

    with pytest.raises(ValidationError) as info:
        CompletionRequest.model_validate({"model": "m", "prompt": "hi", **fields})
    assert said in str(info.value) and "set_int_max_str_digits" not in str(info.value)


def test_http_metrics_labels_stay_bounded_whatever_the_client_sends() -> None:
    """A client picks the method (h11 takes any token) and the path: neither may mint a series of its own."""
    from pdserve.api.metrics import APIMetrics

    metrics = APIMetrics()
    for i in range(50):
        metrics.observe(f"X{i:05d}", f"/v1/x{i}", 404, 0.01, [])
    metrics.observe("GET", "/ready", 200, 0.01, [])
    text = metrics.render().decode()
    assert 'method="_OTHER",route="other",status="404"} 50.0' in text and 'route="/ready"' in text
    assert "X00001" not in text


def test_every_route_of_the_app_has_its_own_metrics_label(tokenizer: Any) -> None:
    """A route the app serves is counted under its path, never lumped into `other` with 404s (the vLLM routes were,
    found in review)."""
    from pdserve.api.metrics import _ROUTES
    from test_auth import api_routes

    paths = {r.path for r in api_routes(create_app(FakeBackend(tokenizer)).routes)} - {"/v1/models/{model:path}"}
    assert len(paths) >= 9 and paths <= _ROUTES, paths - _ROUTES


def test_a_client_gone_before_any_answer_is_counted_499_not_500(tokenizer: Any) -> None:
    """Serve cancels the request's task when its HTTP client leaves: nothing was answered, and the request was
    counted as a 500 (found in review), inflating the dashboard's 5xx ratio with clients' timeouts."""
    backend = FakeBackend(tokenizer)
    backend.reset(delay_s=0.5)
    app = create_app(backend)
    body = json.dumps({"model": "fake-model", "prompt": "hi", "max_tokens": 5}).encode()
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b"", "root_path": "",
        "headers": [(b"host", b"x"), (b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))],
        "client": ("127.0.0.1", 5), "server": ("x", 80),
    }  # fmt: skip
    sent: list[str] = []

    async def main() -> None:
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict[str, Any]:
            if messages:
                return messages.pop(0)
            await asyncio.sleep(3600)
            raise AssertionError

        async def send(message: dict[str, Any]) -> None:
            sent.append(message["type"])

        task = asyncio.ensure_future(app(scope, receive, send))
        await asyncio.sleep(0.2)
        task.cancel()  # what Serve does when the client leaves
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(main())
    text = app.state.pdserve.metrics.render().decode()
    assert not sent and 'status="499"} 1.0' in text and 'status="500"' not in text


def test_an_error_reaches_the_request_span_before_the_response_ends_it() -> None:
    """FastAPI ends the request's span as the response's last byte goes out: the error type and an error event's
    status were set after that, and lost (found in review). They are set as the error goes out now."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import StatusCode

    from pdserve.api.metrics import APIMetrics
    from pdserve.api.middleware import HTTPMetrics

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    error_event = b'data: {"error": {"message": "down", "type": "server_error", "code": "service_unavailable"}}\n\n'

    async def streaming_app(scope: Any, receive: Any, send: Any) -> None:  # a 200 stream that fails midway
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b'data: {"choices": []}\n\n', "more_body": True})
        await send({"type": "http.response.body", "body": error_event, "more_body": False})

    async def main() -> None:
        with provider.get_tracer("t").start_as_current_span("POST /v1/completions", end_on_exit=False) as span:

            async def send(message: dict[str, Any]) -> None:  # as FastAPI: the span ends with the last byte
                if message["type"] == "http.response.body" and not message.get("more_body", False):
                    span.end()

            scope = {"type": "http", "method": "POST", "path": "/v1/completions", "root_path": ""}
            await HTTPMetrics(streaming_app, APIMetrics())(scope, None, send)  # type: ignore[arg-type]

    asyncio.run(main())
    [span] = exporter.get_finished_spans()
    assert (span.attributes or {}).get("error.type") == "service_unavailable"
    assert span.status.status_code is StatusCode.ERROR


def _bodies(response: httpx.Response, stream: bool) -> list[dict[str, Any]]:
    assert response.status_code == 200, response.text
    return [json.loads(p) for p in sse_payloads(response) if p != "[DONE]"] if stream else [response.json()]


def _choice_text(choice: dict[str, Any]) -> str:
    if "message" in choice:
        return str(choice["message"]["content"])
    return str(choice["delta"].get("content") or "") if "delta" in choice else str(choice["text"])


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
@pytest.mark.parametrize("stream", [False, True])
def test_return_token_ids_gives_each_choices_output_and_its_prompts_ids(
    http: httpx.Client, backend: FakeBackend, endpoint: str, stream: bool
) -> None:
    """vLLM's `return_token_ids`, over n = 2 choices (and, for completions, a batch of two prompts), each backend
    request answering tokens of its own: each choice's output ids, whole or streamed in pieces, spell that choice's
    text; the prompt's ids are the ones the backend was sent for that choice — per choice in a completion (a
    stream's first chunk of the choice only), at the top of a chat body (a stream's opening chunks, never the usage
    chunk). With a stop string and up to EOS, the ids are the ones usage counts (the stop string's tokens and the
    EOS included, as vLLM's). Unasked, no body carries either field."""
    base: dict[str, Any] = {"model": "fake-model", "max_tokens": 5, "n": 2, "stream": stream,
                            "stream_options": {"include_usage": True} if stream else None}  # fmt: skip
    if endpoint == "chat":
        url, base = CHAT, {**base, "messages": [{"role": "user", "content": "hi"}]}
    else:
        url, base = COMPLETIONS, {**base, "prompt": [[9, 10], [5, 6, 7]]}
    script = backend.script
    for asked in (True, False):
        backend.reset(tokens_per_delta=2)
        offsets: dict[str, int] = {}  # each request its own tokens: the script from its own offset
        backend.script_of = lambda r, offsets=offsets: script[offsets.setdefault(r.request_id, len(offsets)) :]
        bodies = _bodies(http.post(url, json={**base, "return_token_ids": asked}), stream)
        if not asked:
            assert not any("token_ids" in json.dumps(b) for b in bodies)
            continue
        outputs: dict[int, list[int]] = {}
        texts: dict[int, str] = {}
        prompts: dict[int, list[list[int]]] = {}
        for body in bodies:
            if not body["choices"]:  # the usage chunk
                assert "prompt_token_ids" not in body
            for c in body["choices"]:
                outputs.setdefault(c["index"], []).extend(c.get("token_ids") or [])  # not in a chat opening
                texts[c["index"]] = texts.get(c["index"], "") + _choice_text(c)
                prompt = body.get("prompt_token_ids") if endpoint == "chat" else c.get("prompt_token_ids")
                if prompt is not None:
                    prompts.setdefault(c["index"], []).append(prompt)
        sent = {tuple(r.prompt_token_ids) for r in backend.requests}
        made = {tuple(backend.script_of(r)[:5]) for r in backend.requests}
        assert len(outputs) == (4 if endpoint == "completions" else 2) and len(made) == len(outputs)
        for index, ids in outputs.items():
            assert tuple(ids) in made and backend.tokenizer.decode(ids) == texts[index], (index, ids, texts)
            assert len(prompts[index]) == 1 and tuple(prompts[index][0]) in sent, (index, prompts)
        assert len({tuple(ids) for ids in outputs.values()}) == len(outputs)  # each choice its own
        if endpoint == "completions":  # choice j of prompt p at p * n + j
            assert [prompts[i][0] for i in range(4)] == [[9, 10], [9, 10], [5, 6, 7], [5, 6, 7]]
    for ending in ({"stop": ["fox"]}, {}):  # a stop string cuts the output; without one it runs to the EOS
        backend.reset(tokens_per_delta=3)
        one = {"n": 1, "max_tokens": 60, "return_token_ids": True} | ({"prompt": [9, 10]} if "prompt" in base else {})
        bodies = _bodies(http.post(url, json={**base, **ending, **one}), stream)
        ids = [t for b in bodies for c in b["choices"] for t in c.get("token_ids") or []]
        text = "".join(_choice_text(c) for b in bodies for c in b["choices"])
        usage = bodies[-1]["usage"]
        assert len(ids) == usage["completion_tokens"] and ids == script[: len(ids)], (ending, ids, usage)
        if ending:
            assert "fox" in backend.tokenizer.decode(ids) and not text.endswith("fox") and text, (ids, text)
        else:
            assert ids[-1] == EOS_ID and backend.tokenizer.decode(ids, skip_special_tokens=True) == text
