"""The API's honesty: every request field vLLM accepts either works or is a 400 naming it (a test generated from
vLLM 0.32's own request models, tests/data/vllm-0.32-request-fields.json); `n` choices; chat-template controls."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from pdserve.api import GenerationRequest, create_app
from pdserve.api.protocol import MAX_NESTING
from test_api import MAX_MODEL_LEN, TEXT, FakeBackend, serve, sse_payloads
from tiny_models import BOS, BOS_ID, EOS_ID, build_tokenizer

VLLM_FIELDS = json.loads((Path(__file__).parent / "data" / "vllm-0.32-request-fields.json").read_text())
BASE = {
    "chat": ("/v1/chat/completions", {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}),
    "completions": ("/v1/completions", {"model": "fake-model", "prompt": "hi"}),
}
# A value other than the default for the fields pdserve implements (and for those needing a partner field);
# every other field gets SENTINEL, which no field accepts as harmless. Each value is one whose effect shows in what
# the backend was sent or in the answer (EFFECTS).
PROBES: dict[str, Any] = {
    "temperature": 0.5, "top_p": 0.9, "top_k": 5, "min_p": 0.1, "seed": 7, "stop": ["fox"], "n": 2, "stream": True,
    "stream_options": {"include_usage": True}, "ignore_eos": True, "min_tokens": 1, "stop_token_ids": [5],
    "user": "u1", "cache_salt": "s", "max_tokens": 8, "max_completion_tokens": 8, "logprobs": 3,
    "top_logprobs": 3, "echo": True, "include_stop_str_in_output": True, "skip_special_tokens": False,
    "chat_template_kwargs": {"greeting": True}, "add_generation_prompt": False, "repetition_penalty": 1.2,
    "continue_final_message": True, "presence_penalty": 0.5, "frequency_penalty": 0.5, "logit_bias": {"5": 1.0},
    "return_token_ids": True, "return_tokens_as_token_ids": True,
}  # fmt: skip
# Fields of PROBES that one endpoint refuses even so: vLLM's chat `echo` (repeat the last message before the reply)
# is not implemented, and vllm_fields.CHAT_ONLY accepts it only at its default, false.
REFUSED_PROBES = {("chat", "echo")}
SENTINEL = {"probe": 1}
PARTNERS: dict[str, dict[str, Any]] = {  # fields that are only valid, or only show their effect, beside another
    "stream_options": {"stream": True},
    "top_logprobs": {"logprobs": True},
    "continue_final_message": {"add_generation_prompt": False,
                               "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}]},
    "include_stop_str_in_output": {"stop": ["fox"]},
    # up to the EOS at the end of the script, whose text (as a stop token's) is output only with the stop strings
    "skip_special_tokens": {"max_tokens": 60, "include_stop_str_in_output": True},
    "return_tokens_as_token_ids": {"logprobs": "per endpoint"},  # 3 (completions) or true with top_logprobs 3
}  # fmt: skip
REQUIRED = {"model", "messages", "prompt"}


def nested(depth: int) -> Any:
    """A list holding a list ... `depth` lists deep in all."""
    value: Any = []
    for _ in range(depth - 1):
        value = [value]
    return value


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def server(tokenizer: Any) -> Iterator[tuple[str, FakeBackend]]:
    backend = FakeBackend(tokenizer)
    with serve(create_app(backend)) as url:
        yield url, backend


@pytest.fixture
def backend(server: tuple[str, FakeBackend]) -> FakeBackend:
    server[1].reset()
    return server[1]


@pytest.fixture
def http(server: tuple[str, FakeBackend], backend: FakeBackend) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server[0], timeout=10) as client:
        yield client


def vllm_fields(endpoint: str) -> list[str]:
    return sorted(set(VLLM_FIELDS[endpoint]) - REQUIRED)


@dataclass
class Served:
    """A probe's 200 answer and what the backend was sent for it."""

    endpoint: str
    body: dict[str, Any]
    response: httpx.Response
    requests: list[GenerationRequest]
    tokenizer: Any

    @property
    def request(self) -> GenerationRequest:
        return self.requests[0]

    @property
    def chunks(self) -> list[dict[str, Any]]:
        payloads = sse_payloads(self.response)
        assert payloads[-1] == "[DONE]"
        return [json.loads(p) for p in payloads[:-1]]

    @property
    def is_stream(self) -> bool:
        return self.response.headers["content-type"].startswith("text/event-stream")

    @property
    def texts(self) -> list[str]:
        """Each choice's text, whole or streamed."""
        key = "message" if self.endpoint == "chat" else None
        if not self.is_stream:
            return [c[key]["content"] if key else c["text"] for c in self.response.json()["choices"]]
        texts: dict[int, str] = {}
        for chunk in self.chunks:
            for c in chunk["choices"]:
                piece = c["delta"].get("content") if self.endpoint == "chat" else c["text"]
                texts[c["index"]] = texts.get(c["index"], "") + (piece or "")
        return [texts[i] for i in sorted(texts)]

    def chat_prompt(self, **kwargs: Any) -> list[int]:
        ids = self.tokenizer.apply_chat_template(self.body["messages"], tokenize=True, return_dict=False, **kwargs)
        return list(ids)


CUT = TEXT.index("fox")  # PROBES' stop string
NO_VISIBLE_EFFECT = {"user"}  # OpenAI's end-user id (for abuse monitoring): accepted, nothing in the output changes
EFFECTS: dict[str, Callable[[Served], bool]] = {  # how each probe shows that the value was honoured
    "temperature": lambda s: s.request.temperature == 0.5,
    "top_p": lambda s: s.request.top_p == 0.9,
    "top_k": lambda s: s.request.top_k == 5,
    "min_p": lambda s: s.request.min_p == 0.1,
    "seed": lambda s: s.request.seed == 7,
    "stop": lambda s: s.texts == [TEXT[:CUT]],
    "n": lambda s: len(s.requests) == 2 and len(s.texts) == 2,
    "stream": lambda s: s.is_stream and len(s.chunks) > 1,
    "stream_options": lambda s: s.chunks[-1]["choices"] == [] and s.chunks[-1]["usage"]["completion_tokens"] > 0,
    "ignore_eos": lambda s: s.request.ignore_eos is True,
    "min_tokens": lambda s: s.request.min_tokens == 1,
    "stop_token_ids": lambda s: s.request.stop_token_ids == [5],
    "user": lambda s: True,  # NO_VISIBLE_EFFECT
    "cache_salt": lambda s: s.request.cache_salt == "s",  # (no API keys here: the client's salt as it is)
    "max_tokens": lambda s: s.request.max_tokens == 8,
    "max_completion_tokens": lambda s: s.request.max_tokens == 8,
    "logprobs": lambda s: (
        s.request.logprobs
        and s.request.top_logprobs == (3 if s.endpoint == "completions" else 0)
        and s.response.json()["choices"][0]["logprobs"] is not None
    ),
    "top_logprobs": lambda s: s.request.logprobs and s.request.top_logprobs == 3,
    "echo": lambda s: s.texts[0].startswith("hi" + TEXT[:3]),  # the prompt, then the output
    "include_stop_str_in_output": lambda s: s.texts == [TEXT[: CUT + len("fox")]],
    "skip_special_tokens": lambda s: (
        s.tokenizer.decode([EOS_ID]) != "" and s.texts == [TEXT + s.tokenizer.decode([EOS_ID])]
    ),
    "chat_template_kwargs": lambda s: (
        s.request.prompt_token_ids  # on the `templated` server
        == s.tokenizer(template_render(s.body["messages"], s.body), add_special_tokens=False)["input_ids"]
        and "[hello]" in template_render(s.body["messages"], s.body)
    ),
    "add_generation_prompt": lambda s: (
        s.request.prompt_token_ids
        == s.chat_prompt(add_generation_prompt=False)
        != s.chat_prompt(add_generation_prompt=True)
    ),
    "continue_final_message": lambda s: (
        s.request.prompt_token_ids
        == s.chat_prompt(add_generation_prompt=False, continue_final_message=True)
        != s.chat_prompt(add_generation_prompt=False)
    ),
    "repetition_penalty": lambda s: s.request.repetition_penalty == 1.2,
    "presence_penalty": lambda s: s.request.presence_penalty == 0.5,
    "frequency_penalty": lambda s: s.request.frequency_penalty == 0.5,
    "logit_bias": lambda s: s.request.logit_bias == ((5, 1.0),),
    "return_token_ids": lambda s: _returns_token_ids(s),
    "return_tokens_as_token_ids": lambda s: _named_by_id(s),
}


def _named_by_id(s: Served) -> bool:
    """Every logprobs token, sampled and alternative, named "token_id:<id>"."""
    names = []
    for c in s.response.json()["choices"]:
        if s.endpoint == "completions":
            names += c["logprobs"]["tokens"] + [k for top in c["logprobs"]["top_logprobs"] if top for k in top]
        else:
            names += [x["token"] for x in c["logprobs"]["content"]]
            names += [a["token"] for x in c["logprobs"]["content"] for a in x["top_logprobs"]]
    return bool(names) and all(t.startswith("token_id:") and t[len("token_id:") :].isdigit() for t in names)


def _returns_token_ids(s: Served) -> bool:
    """The prompt's ids as the backend got them (a chat's at the top, as vLLM's), the output's spelling the text."""
    body = s.response.json()
    choice = body["choices"][0]
    prompt = body.get("prompt_token_ids") if s.endpoint == "chat" else choice.get("prompt_token_ids")
    output = choice.get("token_ids")
    return (
        prompt == list(s.request.prompt_token_ids)
        and output is not None
        and len(output) == body["usage"]["completion_tokens"] > 0
        and s.tokenizer.decode(output, skip_special_tokens=True) == s.texts[0]
    )


def test_every_probe_has_its_effect_checked() -> None:
    assert EFFECTS.keys() == PROBES.keys()
    assert all(field in PROBES for _, field in REFUSED_PROBES)


@pytest.mark.parametrize(
    ("endpoint", "field"), [(e, f) for e in ("chat", "completions") for f in vllm_fields(e)]
)  # fmt: skip
def test_every_vllm_field_works_or_is_a_400_naming_it(
    server: tuple[str, FakeBackend], templated: tuple[str, FakeBackend], tokenizer: Any, endpoint: str, field: str
) -> None:
    """A field pdserve implements is served (200) and its value has its effect; any other is a 400 naming it,
    before anything reaches the backend."""
    url, backend = templated if field == "chat_template_kwargs" else server  # a template that reads a kwarg
    backend.reset()
    path, base = BASE[endpoint]
    value = PROBES.get(field, SENTINEL)
    if endpoint == "completions" and field == "logprobs":
        value = 3
    elif endpoint == "chat" and field == "logprobs":
        value = True
    body = {**base, **PARTNERS.get(field, {}), field: value}
    if body.get("logprobs") == "per endpoint":  # the top 3 and the sampled token's
        body |= {"logprobs": 3} if endpoint == "completions" else {"logprobs": True, "top_logprobs": 3}
    response = httpx.post(url + path, json=body, timeout=10)
    if field in PROBES and (endpoint, field) not in REFUSED_PROBES:
        assert response.status_code == 200, response.text
        assert backend.requests, "answered without reaching the backend"
        served = Served(endpoint, body, response, backend.requests, tokenizer)
        assert EFFECTS[field](served), f"{field}={value!r} had no effect: {backend.requests[0]}, {response.text[:300]}"
        backend.reset()  # the same request without the field: the check must tell them apart
        without = {k: v for k, v in body.items() if k != field}
        response = httpx.post(url + path, json=without, timeout=10)
        assert response.status_code == 200, response.text
        assert field in NO_VISIBLE_EFFECT or not EFFECTS[field](
            Served(endpoint, without, response, backend.requests, tokenizer)
        ), f"the check of {field} passes without it"
        return
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == field and field in error["message"], error
    assert backend.requests == []  # refused before anything reached the backend


@pytest.mark.parametrize(("endpoint", "field"), [(e, f) for e in ("chat", "completions") for f in vllm_fields(e)])
def test_every_vllm_field_at_its_default_is_accepted(http: httpx.Client, endpoint: str, field: str) -> None:
    """Clients that send every field at vLLM's default (some do) are served."""
    default = VLLM_FIELDS[endpoint][field]
    if field == "request_id" or default == "PydanticUndefined":  # a random default: null is its harmless value
        default = None
    path, base = BASE[endpoint]
    response = http.post(path, json={**base, field: default})
    assert response.status_code == 200, (field, default, response.text)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"repetition_penalty": 0}, "repetition_penalty"),  # must be positive
        ({"use_beam_search": 0}, "use_beam_search"),  # 0 is not False
        ({"made_up_field": 1}, "made_up_field"),
        ({"messages": [{"role": "user", "content": "hi", "tool_calls": []}]}, "messages[0].tool_calls"),
        ({"stream": True, "stream_options": {"include_usage": True, "bogus": 1}}, "stream_options.bogus"),
        ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs
        ({"n": 129}, "n"),
        ({"chat_template_kwargs": {"tokenize": False}}, "chat_template_kwargs"),
        ({"continue_final_message": True, "add_generation_prompt": False}, "continue_final_message"),  # user last
        ({"continue_final_message": True}, "continue_final_message"),  # with add_generation_prompt
        ({"store": "yes"}, "store"),  # OpenAI's bookkeeping fields pass with a value of their type only
        ({"metadata": ["a"]}, "metadata"),
        ({"service_tier": 1}, "service_tier"),
        # nested past MAX_NESTING: rendering such data would overflow the stack (a 500) where it did not fail first
        ({"chat_template_kwargs": {"x": nested(MAX_NESTING)}}, "chat_template_kwargs"),
        ({"chat_template_kwargs": {"x": nested(600)}}, "chat_template_kwargs"),
    ],
)
def test_refusals_name_the_field(http: httpx.Client, backend: FakeBackend, body: dict[str, Any], param: str) -> None:
    response = http.post("/v1/chat/completions", json={**BASE["chat"][1], **body})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    assert backend.requests == []


def test_an_unrecognized_key_that_is_not_a_name_is_not_echoed(http: httpx.Client) -> None:
    response = http.post("/v1/completions", json={**BASE["completions"][1], "<script>x</script>": 1})
    assert response.status_code == 400
    assert response.json()["error"]["param"] is None and "script" not in response.text


def test_tool_choice_auto_without_tools_and_text_format_are_harmless(http: httpx.Client) -> None:
    body = {"tools": [], "tool_choice": "auto", "parallel_tool_calls": False, "response_format": {"type": "text"}}
    assert http.post("/v1/chat/completions", json={**BASE["chat"][1], **body}).status_code == 200


# What OpenAI's clients and tools send beside the request proper (OpenAI documents every one): never the output's.
OPENAI_BOOKKEEPING = {
    "store": True, "metadata": {"team": "search"}, "service_tier": "auto", "prompt_cache_key": "session-7",
    "safety_identifier": "user-7f3a",
}  # fmt: skip


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_openai_bookkeeping_fields_are_accepted_and_change_nothing(
    http: httpx.Client, backend: FakeBackend, endpoint: str
) -> None:
    path, base = BASE[endpoint]
    plain = http.post(path, json=base)
    marked = http.post(path, json={**base, **OPENAI_BOOKKEEPING})
    assert plain.status_code == marked.status_code == 200, marked.text
    first, second = (replace(r, request_id="", traceparent=None) for r in backend.requests)
    assert first == second
    key = "message" if endpoint == "chat" else None
    texts = [r.json()["choices"][0][key]["content"] if key else r.json()["choices"][0]["text"] for r in (plain, marked)]
    assert texts[0] == texts[1]


def test_what_clients_send_back_in_messages_is_accepted(http: httpx.Client, backend: FakeBackend) -> None:
    """A reply sent back with OpenAI's `reasoning: null`, a text part with a prompt-caching hint (LiteLLM's,
    OpenRouter's), template variables nested a few levels: served, and the prompt is as without them."""
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}]},
        {"role": "assistant", "content": "a", "reasoning": None},
        {"role": "user", "content": "more"},
    ]
    plain = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "a"},
        {"role": "user", "content": "more"},
    ]
    kwargs = {"x": nested(MAX_NESTING - 1)}
    for body in ({"messages": messages, "chat_template_kwargs": kwargs}, {"messages": plain}):
        response = http.post("/v1/chat/completions", json={**BASE["chat"][1], **body})
        assert response.status_code == 200, response.text
    assert backend.requests[0].prompt_token_ids == backend.requests[1].prompt_token_ids


# --- n choices ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_n_choices_whole(server: tuple[str, FakeBackend], backend: FakeBackend, endpoint: str) -> None:
    client = openai.OpenAI(base_url=f"{server[0]}/v1", api_key="x", max_retries=0, timeout=10)
    if endpoint == "chat":
        chat = client.chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "hi"}], n=3, seed=11
        )
        texts = [c.message.content for c in chat.choices]
        usage, indexes = chat.usage, [c.index for c in chat.choices]
    else:
        completion = client.completions.create(model="fake-model", prompt="hi", n=3, seed=11, max_tokens=100)
        texts = [c.text for c in completion.choices]
        usage, indexes = completion.usage, [c.index for c in completion.choices]
    assert indexes == [0, 1, 2] and texts == [TEXT] * 3
    assert usage is not None and usage.completion_tokens == 3 * len(backend.script)
    assert usage.prompt_tokens == len(backend.requests[0].prompt_token_ids)
    assert sorted(r.seed for r in backend.requests) == [11, 12, 13]  # choice i samples with seed + i
    assert len({r.request_id for r in backend.requests}) == 3 and backend.num_closed == 3


@pytest.mark.parametrize("tokens_per_delta", [1, 4])
def test_n_choices_streamed(http: httpx.Client, backend: FakeBackend, tokens_per_delta: int) -> None:
    backend.reset(tokens_per_delta=tokens_per_delta)
    body = {**BASE["chat"][1], "n": 2, "stream": True, "stream_options": {"include_usage": True}}
    response = http.post("/v1/chat/completions", json=body)
    payloads = sse_payloads(response)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    texts = {0: "", 1: ""}
    finishes = {}
    for chunk in chunks[:-1]:
        (choice,) = chunk["choices"]
        texts[choice["index"]] += choice["delta"].get("content") or ""
        if choice["finish_reason"]:
            finishes[choice["index"]] = choice["finish_reason"]
    assert texts == {0: TEXT, 1: TEXT} and finishes == {0: "stop", 1: "stop"}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 2 * len(backend.script)
    assert backend.num_closed == 2


def test_n_choices_stop_string_ends_each_choice_and_closes_its_stream(http: httpx.Client, backend: FakeBackend) -> None:
    body = {**BASE["completions"][1], "n": 3, "max_tokens": 60, "stop": ["brown"]}
    response = http.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    assert [c["text"] for c in response.json()["choices"]] == [TEXT[: TEXT.index("brown")]] * 3
    assert backend.num_closed == 3 and backend.num_yielded < 3 * len(backend.script)


@pytest.mark.parametrize("prompt", ["hi", ["hi", "ho"]])
def test_n_choices_error_after_the_first_closes_every_stream(
    http: httpx.Client, backend: FakeBackend, prompt: Any
) -> None:
    from pdserve.api.backend import ServerError

    backend.error_after = ServerError("replica died", retry_after_s=1.0)
    response = http.post("/v1/completions", json={**BASE["completions"][1], "prompt": prompt, "n": 3, "max_tokens": 60})
    assert response.status_code == 503
    assert backend.num_closed == len(backend.requests)


# --- /tokenize, /detokenize, /version (vLLM's) -----------------------------------------------------------------------


def test_tokenize_gives_the_ids_a_completion_is_served_with(http: httpx.Client, backend: FakeBackend) -> None:
    """Random texts (multi-byte, special-token text): /tokenize's ids are those a completion of the same
    prompt reaches the backend with (with `add_special_tokens: false`, the tokenizer's without them);
    /detokenize gives back the text."""
    import random

    rng = random.Random(3)
    alphabet = ["hi", " ", "the", "quick", "é", "日本", "\n", "<s>", "fox", "!", "ab"]
    for case in range(60):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12)))
        backend.reset()
        assert http.post("/v1/completions", json={**BASE["completions"][1], "prompt": text}).status_code == 200
        sent = backend.requests[0].prompt_token_ids
        got = http.post("/tokenize", json={"model": "fake-model", "prompt": text, "return_token_strs": True})
        assert got.status_code == 200, got.text
        body = got.json()
        assert (body["tokens"], body["count"], body["max_model_len"]) == (sent, len(sent), MAX_MODEL_LEN), case
        assert body["token_strs"] == backend.tokenizer.convert_ids_to_tokens(sent)
        bare = http.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()
        assert bare["tokens"] == backend.tokenizer(text, add_special_tokens=False)["input_ids"], (case, text)
        assert bare["token_strs"] is None
        back = http.post("/detokenize", json={"model": "fake-model", "tokens": bare["tokens"]})
        assert back.status_code == 200 and back.json() == {"prompt": backend.tokenizer.decode(bare["tokens"])}
        assert back.json()["prompt"] == text or "<s>" in text, (case, text)  # the tiny vocabulary spells any text
    assert http.post("/tokenize", json={"prompt": ""}).json()["count"] == 0  # counted, not refused (no BOS here)


def test_a_completion_without_special_tokens_leaves_out_the_bos(tmp_path: Path) -> None:
    """vLLM's `add_special_tokens` on /v1/completions: a text prompt without the tokenizer's BOS when false (as
    /tokenize's), with it by default; token-id prompts are as sent either way."""
    from tiny_models import build_sentencepiece_tokenizer

    tokenizer = build_sentencepiece_tokenizer(tmp_path)
    backend = FakeBackend(tokenizer)
    with serve(create_app(backend)) as url:
        for add, prompt in [(None, "hi there"), (True, "hi there"), (False, "hi there"), (False, [5, 6])]:
            backend.reset()
            body = {"prompt": prompt, "max_tokens": 2, **({} if add is None else {"add_special_tokens": add})}
            assert httpx.post(f"{url}/v1/completions", json=body).status_code == 200
            got = list(backend.requests[0].prompt_token_ids)
            if isinstance(prompt, list):
                assert got == prompt
            else:
                assert got == tokenizer(prompt, add_special_tokens=add is not False)["input_ids"]
                assert (got[0] == tokenizer.bos_token_id) == (add is not False), (add, got)


def test_tokenize_without_special_tokens_leaves_out_the_bos(tmp_path: Path) -> None:
    from tiny_models import build_sentencepiece_tokenizer

    tokenizer = build_sentencepiece_tokenizer(tmp_path)
    with serve(create_app(FakeBackend(tokenizer))) as url:
        default = httpx.post(f"{url}/tokenize", json={"prompt": "hi there"}).json()["tokens"]
        bare = httpx.post(f"{url}/tokenize", json={"prompt": "hi there", "add_special_tokens": False}).json()["tokens"]
    assert default[0] == tokenizer.bos_token_id and default[1:] == bare and bare


@pytest.mark.parametrize(
    "extra",
    [{}, {"add_generation_prompt": False}, {"chat_template_kwargs": {"enable_thinking": False}},
     {"add_generation_prompt": False, "continue_final_message": True}],
)  # fmt: skip
def test_tokenize_gives_the_ids_a_chat_is_served_with(
    http: httpx.Client, backend: FakeBackend, extra: dict[str, Any]
) -> None:
    messages = [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        {"role": "assistant", "content": "hel"},
    ]  # fmt: skip
    chat = http.post("/v1/chat/completions", json={**BASE["chat"][1], "messages": messages, **extra})
    assert chat.status_code == 200, chat.text
    got = http.post("/tokenize", json={"model": "fake-model", "messages": messages, **extra})
    assert got.status_code == 200, got.text
    assert got.json()["tokens"] == backend.requests[0].prompt_token_ids and got.json()["token_strs"] is None


def test_tokenize_counts_what_the_context_cannot_hold(http: httpx.Client, backend: FakeBackend) -> None:
    """As vLLM's: a prompt or conversation longer than the context is counted (the client compares max_model_len),
    where a completion or chat of it is a 400."""
    long = "the " * (10 * MAX_MODEL_LEN)  # over 128 tokens whatever it says: refused before the chat template runs
    for body in ({"prompt": long}, {"messages": [{"role": "user", "content": long}]}):
        counted = http.post("/tokenize", json=body)
        assert counted.status_code == 200 and counted.json()["count"] > MAX_MODEL_LEN, counted.text
    assert http.post("/v1/completions", json={**BASE["completions"][1], "prompt": long}).status_code == 400
    chat = {**BASE["chat"][1], "messages": [{"role": "user", "content": long}]}
    assert http.post("/v1/chat/completions", json=chat).status_code == 400
    too_many = [{"role": "user", "content": "hi"}] * 1025  # RequestLimits.max_messages, as chat completions
    assert http.post("/tokenize", json={"messages": too_many}).json()["error"]["param"] == "messages"


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/tokenize", {}, 400, "prompt"),
        ("/tokenize", {"prompt": "hi", "messages": [{"role": "user", "content": "hi"}]}, 400, "prompt"),
        ("/tokenize", {"prompt": "hi", "add_generation_prompt": False}, 400, "add_generation_prompt"),
        ("/tokenize", {"prompt": "hi", "tools": []}, 400, "tools"),
        ("/tokenize", {"messages": [{"role": "user", "content": "hi"}], "add_special_tokens": True}, 400,
         "add_special_tokens"),
        ("/tokenize", {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, 400, "tools"),
        ("/tokenize", {"messages": []}, 400, "messages"),
        ("/tokenize", {"prompt": 5}, 400, "prompt"),
        ("/tokenize", {"prompt": "\ud800"}, 400, "prompt"),
        ("/tokenize", {"prompt": "hi", "model": "other"}, 404, "model"),
        ("/tokenize", {"prompt": "hi", "temperature": 0}, 400, "temperature"),
        ("/detokenize", {"tokens": [1, 512]}, 400, "tokens"),  # the vocabulary has 512 tokens
        ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
        ("/detokenize", {"tokens": "hi"}, 400, "tokens"),
        ("/detokenize", {}, 400, "tokens"),
        ("/detokenize", {"tokens": [1], "model": "other"}, 404, "model"),
        # found in review: the name came back in the 404's message, which could not encode (a 500)
        ("/tokenize", {"prompt": "hi", "model": "\ud800"}, 400, "model"),
        ("/detokenize", {"tokens": [1], "model": "\ud800"}, 400, "model"),
        ("/tokenize", {"messages": [{"role": "user", "content": "hi"}], "chat_template": "{{ 1 }}"}, 400,
         "chat_template"),
        ("/tokenize", {"prompt": "hi", "mm_processor_kwargs": {"a": 1}}, 400, "mm_processor_kwargs"),
        ("/detokenize", {"tokens": None}, 400, "tokens"),
    ],
)  # fmt: skip
def test_tokenize_and_detokenize_refuse_what_they_cannot_serve(
    http: httpx.Client, backend: FakeBackend, path: str, body: dict[str, Any], status: int, param: str
) -> None:
    response = http.post(path, content=json.dumps(body), headers={"content-type": "application/json"})  # "\ud800" too
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == param, response.text
    assert backend.requests == []


def test_tokenize_takes_vllms_whole_request_models(http: httpx.Client, backend: FakeBackend) -> None:
    """vLLM's clients send every field of its request models, nulls included: a null is the field's default, and
    vLLM's fields pdserve does not implement pass at null (found in review: each was a 400)."""
    messages = [{"role": "user", "content": "hi"}]
    want = http.post("/tokenize", json={"messages": messages}).json()
    chat = {
        "model": None, "messages": messages, "add_generation_prompt": None, "continue_final_message": None,
        "add_special_tokens": False, "chat_template": None, "chat_template_kwargs": None,
        "mm_processor_kwargs": None, "tools": None, "return_token_strs": None, "prompt": None, "media_io_kwargs": None,
    }  # fmt: skip
    got = http.post("/tokenize", json=chat)
    assert got.status_code == 200 and got.json() == want, got.text
    completion = {"model": None, "prompt": "hi", "add_special_tokens": True, "return_token_strs": None,
                  "messages": None, "tools": None, "add_generation_prompt": None}  # fmt: skip
    got = http.post("/tokenize", json=completion)
    assert got.status_code == 200 and got.json() == http.post("/tokenize", json={"prompt": "hi"}).json(), got.text
    assert http.post("/detokenize", json={"model": None, "tokens": [5]}).status_code == 200


def test_version_names_pdserves(http: httpx.Client) -> None:
    import pdserve

    assert http.get("/version").json() == {"version": pdserve.__version__}


# --- chat template controls ---------------------------------------------------------------------------------------

TEMPLATE = (
    "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    "{% if greeting %}[hello]{% endif %}{% if add_generation_prompt %}<assistant>{% endif %}"
)


@pytest.fixture(scope="module")
def templated(tokenizer: Any) -> Iterator[tuple[str, FakeBackend]]:
    backend = FakeBackend(tokenizer)
    with serve(create_app(backend, chat_template=TEMPLATE)) as url:
        yield url, backend


@pytest.mark.parametrize(
    ("extra", "rendered"),
    [
        ({}, "<user>hi<assistant>hello<assistant>"),
        ({"chat_template_kwargs": {"greeting": True}}, "<user>hi<assistant>hello[hello]<assistant>"),
        ({"add_generation_prompt": False}, "<user>hi<assistant>hello"),
        ({"add_generation_prompt": False, "continue_final_message": True}, "<user>hi<assistant>hello"),
    ],
)
def test_chat_template_controls(
    templated: tuple[str, FakeBackend], tokenizer: Any, extra: dict[str, Any], rendered: str
) -> None:
    url, backend = templated
    backend.reset()
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    response = httpx.post(f"{url}/v1/chat/completions", json={"model": "fake-model", "messages": messages, **extra})
    assert response.status_code == 200, response.text
    expected = template_render(messages, extra)
    assert expected == rendered
    assert backend.requests[0].prompt_token_ids == tokenizer(expected, add_special_tokens=False)["input_ids"]


def template_render(messages: list[dict[str, str]], extra: dict[str, Any]) -> str:
    """What TEMPLATE renders, written out by hand (the oracle)."""
    text = "".join(f"<{m['role']}>{m['content']}" for m in messages)
    if extra.get("chat_template_kwargs", {}).get("greeting"):
        text += "[hello]"
    if extra.get("add_generation_prompt", True):
        text += "<assistant>"
    return text


def test_a_model_without_a_chat_template_answers_chat_with_a_400(tmp_path: Path) -> None:
    tokenizer = build_tokenizer(tmp_path)
    tokenizer.chat_template = None
    backend = FakeBackend(tokenizer)
    with serve(create_app(backend)) as url:
        response = httpx.post(f"{url}/v1/chat/completions", json=BASE["chat"][1])
        assert response.status_code == 400 and response.json()["error"]["code"] == "chat_template_missing"
        assert httpx.post(f"{url}/v1/completions", json=BASE["completions"][1]).status_code == 200
    assert len(backend.requests) == 1


LEAVE_AT = ("the headers", "mid-way", "after the end")


@pytest.mark.parametrize("seed", range(30))
def test_n_choices_streams_are_all_closed_wherever_the_client_leaves(
    server: tuple[str, FakeBackend], backend: FakeBackend, seed: int
) -> None:
    """A client leaving an n-choice stream at a random point (right after the headers, mid-way, or after the end:
    LEAVE_AT[seed % 3]): every backend stream that started is closed (aborted), none is left running. The backend
    is slow enough (a delta every 10 ms) that a client leaving early does leave before the end: the choices had
    not all been generated."""
    import random
    import time

    rng = random.Random(seed)
    tokens_per_delta, leave_at = rng.choice([1, 3]), LEAVE_AT[seed % 3]
    backend.reset(tokens_per_delta=tokens_per_delta, delay_s=0.01)
    num_prompts = rng.choice([1, 1, 2, 3])  # a batch of prompts: n choices each
    n = rng.randint(2 if num_prompts == 1 else 1, 5)
    data_lines = 2 * n * num_prompts * -(-len(backend.script) // tokens_per_delta)  # "data: ..." and a blank line
    leave_after = {"the headers": 0, "mid-way": rng.randint(1, data_lines // 4), "after the end": data_lines + 4}
    prompt = "hi" if num_prompts == 1 else ["hi", "ho", "a b"][:num_prompts]
    body = {**BASE["completions"][1], "prompt": prompt, "n": n, "stream": True, "max_tokens": 60, "seed": seed}
    n *= num_prompts  # the choices in all
    with httpx.Client(base_url=server[0], timeout=10) as http, http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200, r.read()
        lines = 0
        for lines, _ in enumerate(r.iter_lines() if leave_after[leave_at] else (), 1):
            if lines >= leave_after[leave_at]:
                break
        assert leave_at != "after the end" or lines < leave_after[leave_at]  # the stream ended first
    deadline = time.monotonic() + 5
    while backend.num_closed < len(backend.requests) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(backend.requests) <= n and backend.num_closed == len(backend.requests)
    if leave_at == "after the end":
        assert backend.num_yielded == n * len(backend.script)
    else:  # left before the end: some choice was cut short
        assert backend.num_yielded < n * len(backend.script), (leave_at, lines, backend.num_yielded)


def test_several_served_names_are_each_accepted_and_listed(tokenizer: Any) -> None:
    """vLLM's several --served-model-name: any of them (or its last path part) is accepted; responses carry the
    first; /v1/models lists each."""
    backend = FakeBackend(tokenizer)
    backend.model_names = ("org/fake-model", "alias")
    with serve(create_app(backend)) as url:
        for name in ("org/fake-model", "fake-model", "alias"):
            response = httpx.post(f"{url}/v1/completions", json={"model": name, "prompt": "hi", "max_tokens": 2})
            assert response.status_code == 200 and response.json()["model"] == name
        assert httpx.post(f"{url}/v1/completions", json={"model": "other", "prompt": "hi"}).status_code == 404
        assert [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]] == ["org/fake-model", "alias"]
        assert httpx.get(f"{url}/v1/models/alias").json()["id"] == "alias"


@pytest.mark.parametrize("stream", [False, True])
def test_include_stop_str_and_skip_special_tokens(
    http: httpx.Client, backend: FakeBackend, tokenizer: Any, stream: bool
) -> None:
    def text_of(body: dict[str, Any]) -> str:
        body = {**BASE["completions"][1], "max_tokens": 60, "stream": stream, **body}
        response = http.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
        if not stream:
            return str(response.json()["choices"][0]["text"])
        chunks = [json.loads(p) for p in sse_payloads(response)[:-1]]
        return "".join(c["choices"][0]["text"] for c in chunks if c["choices"])

    cut = TEXT.index("brown")
    assert text_of({"stop": ["brown"]}) == TEXT[:cut]
    assert text_of({"stop": ["brown"], "include_stop_str_in_output": True}) == TEXT[: cut + len("brown")]
    # EOS (a stop token, as stop_token_ids are) ends the output without its text, as in vLLM; its text shows only
    # with include_stop_str_in_output, and then only unless it is skipped as a special token
    eos = tokenizer.decode(backend.script[-1:])
    assert eos and text_of({}) == text_of({"skip_special_tokens": False}) == TEXT
    assert text_of({"include_stop_str_in_output": True}) == TEXT
    assert text_of({"skip_special_tokens": False, "include_stop_str_in_output": True}) == TEXT + eos


def test_generation_config_sets_the_defaults_of_unset_fields(tmp_path: Path, tokenizer: Any) -> None:
    """As vLLM's --generation-config auto: the model's generation_config.json sets temperature, top_p, top_k, min_p,
    repetition_penalty and max_new_tokens for requests that leave them out; "vllm" ignores the file."""
    from pdserve.api.intake import sampling_defaults

    (tmp_path / "generation_config.json").write_text(
        json.dumps({"temperature": 0.3, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.1, "max_new_tokens": 7,
                    "do_sample": True, "bos_token_id": 1})
    )  # fmt: skip
    defaults = sampling_defaults(tmp_path)
    assert defaults == {"temperature": 0.3, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.1, "max_tokens": 7}
    assert sampling_defaults(tmp_path, "vllm") == {} and sampling_defaults(tmp_path / "absent") == {}
    backend = FakeBackend(tokenizer)
    with serve(create_app(backend, sampling_defaults=defaults)) as url:
        httpx.post(f"{url}/v1/chat/completions", json=BASE["chat"][1])
        httpx.post(f"{url}/v1/completions", json={**BASE["completions"][1], "temperature": 0.9, "max_tokens": 3})
        httpx.post(f"{url}/v1/chat/completions", json={**BASE["chat"][1], "max_completion_tokens": 4})
    unset, explicit, other_name = backend.requests
    assert (unset.temperature, unset.top_p, unset.top_k, unset.repetition_penalty, unset.max_tokens) == (
        0.3, 0.8, 20, 1.1, 7
    )  # fmt: skip
    assert (explicit.temperature, explicit.max_tokens, explicit.top_p) == (0.9, 3, 0.8)
    assert other_name.max_tokens == 4  # the client's limit under its other name, below max_new_tokens


# (server cap, generation_config's max_new_tokens, endpoint, the limit field as sent — absent, null or a value —,
# prompt tokens) -> the backend's max_tokens ("room": what the context has left), or the 400's param.
# MAX_MODEL_LEN is 128. As vLLM: the request's own limit (a completion's unset one is OpenAI's 16) must fit the
# context; the result is the smallest of it, the room left, the server's cap and the model's default; the model's
# default and the server's cap lower it, never refuse it (a completion's 16 is its own limit: 400 when it does not fit).
ABSENT, ROOM = object(), "room"
OUTPUT_LIMITS = [
    (None, None, "completions", ABSENT, 60, 16),
    (None, None, "completions", None, 60, ROOM),  # null: the context's room, as the field's comment always said
    (None, None, "completions", 9, 120, "max_tokens"),
    (None, None, "completions", ABSENT, 120, "max_tokens"),  # 16 does not fit
    (None, 100, "completions", ABSENT, 60, 16),  # the model's default only lowers the request's limit
    (None, 7, "completions", ABSENT, 60, 7),
    (None, 100, "completions", 30, 60, 30),
    (None, 40, "completions", 60, 10, 40),  # a cap whatever the client asked (vLLM's min), never a 400
    (None, 40, "chat", 60, 2, 40),
    (None, 100, "completions", None, 60, ROOM),
    (None, 100, "chat", ABSENT, 20, ROOM),  # was a 400: the default was checked as if the client had sent it
    (None, 7, "chat", ABSENT, 20, 7),
    (None, 100, "chat", 90, 20, "max_tokens"),
    (50, 100, "completions", ABSENT, 2, 16),
    (50, 100, "chat", ABSENT, 2, 50),
    (8, None, "completions", ABSENT, 2, 8),  # OpenAI's default is capped...
    (8, None, "completions", 16, 2, "max_tokens"),  # ...but 16 sent by the client is refused (it was capped)
    (8, None, "chat", 9, 2, "max_tokens"),
    (8, 100, "chat", None, 2, 8),
]


@pytest.mark.parametrize(("cap", "default", "endpoint", "sent", "prompt_len", "want"), OUTPUT_LIMITS)
def test_the_output_limit_is_the_smallest_and_only_the_clients_own_is_refused(
    tokenizer: Any, cap: int | None, default: int | None, endpoint: str, sent: Any, prompt_len: int, want: Any
) -> None:
    """(A chat's prompt is a message of `prompt_len` words, plus what the template adds.)"""
    from pdserve.api.intake import RequestLimits

    backend = FakeBackend(tokenizer)
    path, body = BASE[endpoint]
    if endpoint == "completions":
        body = {**body, "prompt": [5] * prompt_len}
    else:
        body = {**body, "messages": [{"role": "user", "content": " ".join(["x"] * prompt_len)}]}
    if sent is not ABSENT:
        body["max_tokens"] = sent
    defaults = {} if default is None else {"max_tokens": default}
    with serve(create_app(backend, limits=RequestLimits(max_tokens=cap), sampling_defaults=defaults)) as url:
        response = httpx.post(f"{url}{path}", json=body, timeout=10)
    if isinstance(want, str) and want != ROOM:
        assert response.status_code == 400 and response.json()["error"]["param"] == want, response.text
        assert not backend.requests
    else:
        assert response.status_code == 200, response.text
        (request,) = backend.requests
        assert request.max_tokens == (MAX_MODEL_LEN - len(request.prompt_token_ids) if want == ROOM else want)


def _choices_of(response: httpx.Response, stream: bool) -> dict[int, dict[str, Any]]:
    """Each choice's text and logprobs (lists concatenated over a stream's chunks), by index."""
    if not stream:
        return {c["index"]: {"text": c["text"], "logprobs": c["logprobs"]} for c in response.json()["choices"]}
    choices: dict[int, dict[str, Any]] = {}
    for payload in sse_payloads(response)[:-1]:
        for c in json.loads(payload)["choices"]:
            got = choices.setdefault(c["index"], {"text": "", "logprobs": None})
            got["text"] += c["text"]
            if c["logprobs"] is not None:
                merged = got["logprobs"] or {}
                got["logprobs"] = {key: (merged.get(key) or []) + (value or []) for key, value in c["logprobs"].items()}
    return choices


def test_every_one_of_n_choices_reads_as_the_single_answer(http: httpx.Client, backend: FakeBackend) -> None:
    """Random n, echo, logprobs, stop and delta sizes, whole and streamed: with a backend that answers every choice
    alike, each of the n choices is exactly the n = 1 answer to the same body — its echo, text and logprobs (text
    offsets from 0) — whichever index it has."""
    import random

    rng = random.Random(5)
    for case in range(120):
        backend.reset(tokens_per_delta=rng.choice([1, 2, 5]))
        stream = rng.random() < 0.5
        body: dict[str, Any] = {**BASE["completions"][1], "max_tokens": rng.choice([1, 3, 60]), "stream": stream}
        if rng.random() < 0.5:
            body["echo"] = True
        if rng.random() < 0.7:
            body["logprobs"] = rng.choice([0, 2])
        if rng.random() < 0.3:
            body["stop"] = [rng.choice(["brown", "quick", "o", "zzz"])]
        single = _choices_of(http.post("/v1/completions", json=body), stream)
        n = rng.randint(2, 4)
        response = http.post("/v1/completions", json={**body, "n": n})
        assert response.status_code == 200, (case, response.text)
        assert _choices_of(response, stream) == {i: single[0] for i in range(n)}, (case, body, n)


def test_a_batch_of_prompts_reads_as_each_prompt_alone(http: httpx.Client, backend: FakeBackend) -> None:
    """Random batches of 2 to 4 prompts (texts or token ids, from 1 token, repeats), n, echo, logprobs, stop and
    delta sizes, whole and streamed: choice j of prompt p, at index p * n + j, is exactly choice j of the same body
    sent with prompt p alone — echo, text, logprobs; the usage is the prompts' and the choices' sums; each prompt's
    choices are seeded as alone; every backend stream is closed."""
    import random

    rng = random.Random(9)
    words = ["hi", "the quick", "a", "brown fox jumps", "hi there", "é"]

    def reset(tokens_per_delta: int) -> None:  # an output, and a cache hit, of each prompt and seed's own
        backend.reset(tokens_per_delta=tokens_per_delta)
        backend.script_of = lambda r: backend.script[(sum(r.prompt_token_ids) + (r.seed or 0)) % 9 :]
        backend.cached_tokens = lambda r: len(r.prompt_token_ids) % 3

    for case in range(100):
        reset(rng.choice([1, 2, 5]))
        stream = rng.random() < 0.5
        if rng.random() < 0.5:
            prompts: list[Any] = [rng.choice(words) for _ in range(rng.randint(2, 4))]
        else:
            prompts = [
                [rng.randrange(5, 200) for _ in range(rng.choice([1, 1, 3, 9]))] for _ in range(rng.randint(2, 4))
            ]
        body: dict[str, Any] = {**BASE["completions"][1], "max_tokens": rng.choice([1, 3, 60]), "stream": stream,
                                "n": rng.choice([1, 1, 2, 3]), "seed": case}  # fmt: skip
        if stream:
            body["stream_options"] = {"include_usage": True}
        if rng.random() < 0.5:
            body["echo"] = True
            if rng.random() < 0.3:  # scoring the prompts, as lm-evaluation-harness's batches do
                body["max_tokens"] = 0
        if rng.random() < 0.6:
            body["logprobs"] = rng.choice([0, 2])
        if rng.random() < 0.3:
            body["stop"] = [rng.choice(["brown", "quick", "o", "zzz"])]
        alone = []
        for prompt in prompts:
            backend.requests = []
            response = http.post("/v1/completions", json={**body, "prompt": prompt})
            alone.append((_answers_of(response, stream), _usage_of(response, stream), backend.requests))
        reset(backend.tokens_per_delta)
        response = http.post("/v1/completions", json={**body, "prompt": prompts})
        assert response.status_code == 200, (case, response.text)
        n = body["n"]
        want = {p * n + j: choices[j] for p, (choices, _, _) in enumerate(alone) for j in range(n)}
        assert _answers_of(response, stream) == want, (case, body, prompts)
        usages = [usage for _, usage, _ in alone]
        got_usage = _usage_of(response, stream)
        for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
            assert got_usage[key] == sum(u[key] for u in usages), (case, key, got_usage, usages)
        cached = [u["prompt_tokens_details"]["cached_tokens"] for u in usages]
        assert got_usage["prompt_tokens_details"]["cached_tokens"] == sum(cached), (case, got_usage, usages)
        assert [r.seed for r in backend.requests if r.shares_prompt_of is None] == [case] * len(prompts)
        assert sorted(r.seed for r in backend.requests) == sorted(r.seed for _, _, rs in alone for r in rs)
        assert len({r.request_id for r in backend.requests}) == n * len(prompts) == backend.num_closed


@pytest.mark.parametrize("stream", [False, True])
def test_a_batchs_prompts_start_at_the_first_ones_first_token_their_choices_at_their_own(
    tokenizer: Any, stream: bool
) -> None:
    """The first prompt's first choice starts alone (its errors, a 429, still get a status); at its first delta the
    other prompts start together (they may hit what they share with it), and each prompt's further choices start
    at that prompt's own first delta, when its blocks are cached."""
    backend = FakeBackend(tokenizer)
    backend.reset(delay_s=0.02)
    events: list[tuple[str, str]] = []
    inner = backend.generate

    async def generate(request: GenerationRequest) -> Any:
        events.append(("start", request.request_id))
        async for delta in inner(request):
            events.append(("delta", request.request_id))
            yield delta

    backend.generate = generate  # type: ignore[method-assign]
    with serve(create_app(backend)) as url:
        body = {"model": "fake-model", "prompt": ["hi", "ho", "a b"], "n": 2, "max_tokens": 3, "stream": stream}
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=20).status_code == 200
    start = {rid: events.index(("start", rid)) for kind, rid in events if kind == "start"}
    first = {rid: events.index(("delta", rid)) for kind, rid in events if kind == "delta"}
    requests = {r.request_id: r for r in backend.requests}
    assert len(requests) == 6 and events[0] == ("start", backend.requests[0].request_id)
    heads = [r for r in backend.requests[1:] if r.shares_prompt_of is None]
    assert len(heads) == 2 and all(r.batched_with == backend.requests[0].request_id for r in heads)
    for r in backend.requests[1:]:
        after = r.shares_prompt_of or r.batched_with
        assert after is not None and start[r.request_id] > first[after], (r.request_id, events)
    assert max(start[r.request_id] for r in heads) < min(first[r.request_id] for r in heads)  # not one by one


def _answers_of(response: httpx.Response, stream: bool) -> dict[int, dict[str, Any]]:
    """Each choice's text, logprobs, finish and stop reasons, by index."""
    choices = _choices_of(response, stream)
    chunks = [json.loads(p) for p in sse_payloads(response)[:-1]] if stream else [response.json()]
    for c in (c for chunk in chunks for c in chunk["choices"]):
        if c["finish_reason"] is not None:
            choices[c["index"]] |= {"finish_reason": c["finish_reason"], "stop_reason": c.get("stop_reason")}
    return choices


def _usage_of(response: httpx.Response, stream: bool) -> dict[str, Any]:
    if not stream:
        return dict(response.json()["usage"])
    return dict(json.loads(sse_payloads(response)[-2])["usage"])


def test_stop_strings_min_tokens_and_stop_tokens_report_the_same_whatever_the_deltas(
    http: httpx.Client, backend: FakeBackend, tokenizer: Any
) -> None:
    """Random stop strings, min_tokens, include_stop_str_in_output, skip_special_tokens and max_tokens (the output
    ending at EOS or cut by the limit), whole and streamed, the backend's tokens in deltas of 1 to 8: text, finish
    reason, usage and logprobs are those of checking one token at a time (test_detokenizer's oracle) — the output
    ends with the token completing a stop string (later tokens of its delta are not reported), a stop string counts
    only past min_tokens' text, and EOS ends the output without its text unless the stop strings are included."""
    import random

    from test_detokenizer import oracle, stop_with_min_tokens, texts_after_each_token

    rng = random.Random(11)
    words = TEXT.split(" ")
    for case in range(150):
        tokens_per_delta, stream = rng.choice([1, 2, 3, 8]), rng.random() < 0.5
        backend.reset(tokens_per_delta=tokens_per_delta)
        max_tokens = rng.choice([len(backend.script), len(backend.script), rng.randint(1, len(backend.script))])
        stop = [rng.choice([w[: rng.randint(1, len(w))], w[-2:], "o", "zz"]) for w in rng.sample(words, 2)]
        body: dict[str, Any] = {
            **BASE["completions"][1], "max_tokens": max_tokens, "stream": stream, "logprobs": 0,
            "stop": stop[: rng.randint(0, 2)], "min_tokens": rng.choice([0, 0, rng.randint(1, max_tokens)]),
            "include_stop_str_in_output": rng.random() < 0.3, "skip_special_tokens": rng.random() < 0.5,
        }  # fmt: skip
        if stream:
            body["stream_options"] = {"include_usage": True}
        response = http.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
        if stream:
            chunks = [json.loads(p) for p in sse_payloads(response)[:-1]]
            choices = [c["choices"][0] for c in chunks if c["choices"]]
            text, finish = "".join(c["text"] for c in choices), choices[-1]["finish_reason"]
            tokens = [t for c in choices if c["logprobs"] for t in c["logprobs"]["tokens"]]
            usage = chunks[-1]["usage"]
        else:
            (choice,) = response.json()["choices"]
            text, finish, tokens = choice["text"], choice["finish_reason"], choice["logprobs"]["tokens"]
            usage = response.json()["usage"]

        prompt, output = backend.requests[0].prompt_token_ids, backend.script[:max_tokens]
        ends_at_eos = output[-1] == EOS_ID
        visible = output[:-1] if ends_at_eos and not body["include_stop_str_in_output"] else output
        skip = body["skip_special_tokens"]
        want_text, is_stopped, num_tokens = stop_with_min_tokens(
            texts_after_each_token(tokenizer, prompt, visible, skip), oracle(tokenizer, prompt, visible, skip),
            body["stop"], body["min_tokens"], body["include_stop_str_in_output"],
        )  # fmt: skip
        want_tokens = num_tokens if is_stopped else len(output)
        want_finish = "stop" if is_stopped or ends_at_eos else "length"
        context = (case, body, tokens_per_delta)
        assert (text, finish) == (want_text, want_finish), context
        assert usage["completion_tokens"] == len(tokens) == want_tokens, context


def test_an_empty_text_prompt_is_served_where_the_tokenizer_adds_a_bos(tokenizer: Any) -> None:
    """As OpenAI and vLLM: "" is refused only when it tokenizes to nothing (vLLM's "the prompt cannot be empty")."""
    import asyncio
    import copy

    from tokenizers import processors

    from pdserve.api.errors import APIError
    from pdserve.api.intake import Tokenization

    with_bos = copy.deepcopy(tokenizer)
    with_bos.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, BOS_ID)]
    )
    assert asyncio.run(Tokenization(with_bos).completion_prompt("")) == [BOS_ID]
    for prompt in ("", []):
        with pytest.raises(APIError, match="the prompt is empty") as refused:
            asyncio.run(Tokenization(tokenizer).completion_prompt(prompt))
        assert (refused.value.status, refused.value.param) == (400, "prompt")


def test_a_template_overflowing_the_stack_is_the_requests_400(tokenizer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The depth bound keeps client data from overflowing the renderer's stack; should anything else still do it,
    the request gets a 400 naming what it sent, not a 500 and a thousand-frame traceback in the log."""
    import asyncio

    from pdserve.api.errors import APIError
    from pdserve.api.intake import Tokenization
    from pdserve.api.protocol import ChatMessage

    def overflow(*_: Any) -> list[int]:
        raise RecursionError("maximum recursion depth exceeded")

    tokenization = Tokenization(tokenizer)
    monkeypatch.setattr(tokenization, "_apply_chat_template", overflow)
    messages = [ChatMessage(role="user", content="hi")]
    for kwargs, param in (({"x": [[1]]}, "chat_template_kwargs"), (None, "messages")):
        with pytest.raises(APIError, match="nested too deeply") as refused:
            asyncio.run(tokenization.chat_prompt(messages, kwargs))
        assert (refused.value.status, refused.value.param) == (400, param)


def test_truncate_prompt_tokens_keeps_the_prompts_last_or_first_tokens(
    http: httpx.Client, backend: FakeBackend
) -> None:
    """vLLM's `truncate_prompt_tokens`: the backend gets the prompt's last N tokens (its first N with
    `truncation_side: "right"`), counted and echoed as what is left; -1 keeps up to the context less one token; N
    past the context and 0 are 400s naming the field, before anything reaches the backend. A chat's templated
    prompt is truncated the same way."""
    ids = list(range(5, 25))
    cases = [({"truncate_prompt_tokens": 4}, ids[-4:]),
             ({"truncate_prompt_tokens": 4, "truncation_side": "left"}, ids[-4:]),
             ({"truncate_prompt_tokens": 4, "truncation_side": "right"}, ids[:4]),
             ({"truncate_prompt_tokens": 50}, ids), ({"truncate_prompt_tokens": -1}, ids), ({}, ids)]  # fmt: skip
    for fields, kept in cases:
        backend.reset()
        body = {"model": "fake-model", "prompt": ids, "max_tokens": 2, "echo": True, **fields}
        response = http.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
        assert list(backend.requests[0].prompt_token_ids) == kept, fields
        out = response.json()
        assert out["usage"]["prompt_tokens"] == len(kept)
        assert out["choices"][0]["text"].startswith(backend.tokenizer.decode(kept)), (fields, out["choices"][0]["text"])
    backend.reset()
    long = list(range(5, 5 + MAX_MODEL_LEN))  # the whole context: -1 leaves a token of room for the output
    response = http.post("/v1/completions", json={"prompt": long, "max_tokens": 1, "truncate_prompt_tokens": -1})
    assert response.status_code == 200 and list(backend.requests[0].prompt_token_ids) == long[1:], response.text
    for bad in ({"truncate_prompt_tokens": MAX_MODEL_LEN + 1}, {"truncate_prompt_tokens": 0},
                {"truncate_prompt_tokens": -2}, {"truncation_side": "middle"}):  # fmt: skip
        backend.reset()
        response = http.post("/v1/completions", json={"prompt": ids, **bad})
        assert response.status_code == 400 and response.json()["error"]["param"] in bad, (bad, response.text)
        assert backend.requests == []
    # A text longer than the context, which the character guard refuses unasked, is tokenized and cut (a document
    # sent with -1 is what the field is for)
    document = "the quick brown fox " * (MAX_MODEL_LEN * 4)
    for route, body in [("/v1/completions", {"prompt": document}),
                        ("/v1/chat/completions", {"messages": [{"role": "user", "content": document}]})]:  # fmt: skip
        backend.reset()
        assert http.post(route, json={**body, "max_tokens": 1}).status_code == 400  # unasked: too long
        response = http.post(route, json={**body, "max_tokens": 1, "truncate_prompt_tokens": -1})
        assert response.status_code == 200, (route, response.text)
        assert len(backend.requests[0].prompt_token_ids) == MAX_MODEL_LEN - 1
    backend.reset()
    chat = {"model": "fake-model", "messages": [{"role": "user", "content": "hi there"}], "max_tokens": 2}
    assert http.post("/v1/chat/completions", json=chat).status_code == 200
    whole = list(backend.requests[0].prompt_token_ids)
    backend.reset()
    assert http.post("/v1/chat/completions", json={**chat, "truncate_prompt_tokens": 3}).status_code == 200
    assert list(backend.requests[0].prompt_token_ids) == whole[-3:] and len(whole) > 3
