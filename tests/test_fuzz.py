"""Fuzzing the HTTP API (hypothesis) over real HTTP and the fake backend of test_api: well-formed requests with
wrong types, huge numbers, lone surrogates, long strings and unknown fields, and bytes that are not JSON at all.
Never a 5xx; every refusal a small OpenAI error body that echoes no input and carries no traceback.

    PDSERVE_FUZZ_EXAMPLES=10000 python -m pytest tests/test_fuzz.py -q     # the long run (CI runs a short one)
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pdserve.api import create_app
from pdserve.api.protocol import is_plain_name
from test_api import FakeBackend, serve

EXAMPLES = int(os.environ.get("PDSERVE_FUZZ_EXAMPLES", "150"))
MAX_BODY = 1 << 20
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
MARKER = "ZqXw"  # planted in every generated string: an error body must not echo it


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from tiny_models import build_tokenizer

    backend = FakeBackend(build_tokenizer(tmp_path_factory.mktemp("tokenizer")))
    with serve(create_app(backend, max_body_bytes=MAX_BODY)) as base:
        yield base


def _texts() -> st.SearchStrategy[str]:
    plain = st.text(max_size=40).map(lambda s: MARKER + s)
    surrogate = st.sampled_from(["\ud800", "\udfff", "a\ud83d", "\udc00b"]).map(lambda s: MARKER + s)
    long = st.integers(1, 300_000).map(lambda n: MARKER + "x" * n)
    return st.one_of(plain, plain, surrogate, long)


_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(1 << 70), 1 << 70), st.floats(allow_nan=True, allow_infinity=True),
    _texts(),
)  # fmt: skip
_ANY = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_texts(), inner, max_size=3),
                    max_leaves=8)  # fmt: skip
_PART = st.fixed_dictionaries({"type": st.just("text"), "text": _texts()})
_MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "developer", "tool", "nobody"]) | _ANY},
    optional={"content": st.one_of(_texts(), st.lists(_PART, max_size=3), _ANY)},
)
_COMMON: dict[str, st.SearchStrategy[Any]] = {
    "model": st.sampled_from(["fake-model", "org/fake-model"]) | _texts(),
    "max_tokens": st.integers(-5, 1 << 40) | _ANY,
    "temperature": st.floats(-1, 3) | _ANY,
    "top_p": st.floats(-1, 2) | _ANY,
    "top_k": st.integers(-3, 1 << 40) | _ANY,
    "seed": st.integers(-(1 << 70), 1 << 70) | _ANY,
    "stop": _texts() | st.lists(_texts(), max_size=6) | _ANY,
    "stream": st.booleans() | _ANY,
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans() | _ANY,
                                                          "continuous_usage_stats": st.booleans()}) | _ANY,
    "logprobs": st.integers(-1, 30) | st.booleans() | _ANY,
    "n": st.integers(-1, 5) | _ANY,
    "min_tokens": st.integers(-1, 1 << 40) | _ANY,
    "stop_token_ids": st.lists(st.integers(-(1 << 40), 1 << 40), max_size=5) | _ANY,
    "ignore_eos": st.booleans() | _ANY,
    "cache_salt": _texts() | _ANY,
    "logit_bias": st.dictionaries(_texts(), st.floats(-100, 100), max_size=2) | _ANY,
    "unknown_field": _ANY,
}  # fmt: skip
COMPLETION = st.fixed_dictionaries(
    {"model": _COMMON["model"], "prompt": _texts() | st.lists(st.integers(-5, 1 << 40), max_size=20) | _ANY},
    optional={k: v for k, v in _COMMON.items() if k != "model"} | {"echo": st.booleans(), "suffix": _texts()},
)
CHAT = st.fixed_dictionaries(
    {"model": _COMMON["model"], "messages": st.lists(_MESSAGE, max_size=4) | _ANY},
    optional={k: v for k, v in _COMMON.items() if k != "model"} | {"max_completion_tokens": st.integers(-1, 1 << 40)},
)


def _check(response: httpx.Response) -> None:
    assert response.status_code < 500, response.text[:500]
    if response.status_code >= 400:
        assert len(response.content) < 2048, response.text[:300]  # small: no echoed input
        error = response.json()["error"]
        assert {"message", "type", "param", "code"} <= error.keys()
        text = response.text
        assert "Traceback" not in text and 'File "' not in text
        if MARKER in text:  # only a name: the unknown model (cut at 64 characters), or an unrecognized field's name
            named = error["message"].removeprefix("unrecognized request argument supplied: ")  # as OpenAI names it
            is_field_name = named == error["param"] and is_plain_name(named.split(".")[-1])
            assert error["code"] == "model_not_found" or is_field_name


def _post(url: str, route: str, content: bytes) -> httpx.Response:
    return httpx.post(url + route, content=content, headers={"Content-Type": "application/json"}, timeout=30)


def _encoded(body: Any) -> bytes:
    # ensure_ascii escapes lone surrogates as \\udXXX, the way a client's JSON carries them
    return json.dumps(body, ensure_ascii=True, allow_nan=True).encode()


@FUZZ
@given(body=COMPLETION)
def test_completions_never_5xx(url: str, body: dict[str, Any]) -> None:
    _check(_post(url, "/v1/completions", _encoded(body)))


@FUZZ
@given(body=CHAT)
@example(body={"model": "fake-model", "messages": [], "stream_options": {MARKER: None}})  # its name, as OpenAI
def test_chat_never_5xx(url: str, body: dict[str, Any]) -> None:
    _check(_post(url, "/v1/chat/completions", _encoded(body)))


@FUZZ
@given(raw=st.binary(max_size=300) | _texts().map(lambda s: s.encode("utf-8", "surrogatepass")),
       route=st.sampled_from(["/v1/completions", "/v1/chat/completions"]))  # fmt: skip
def test_bytes_that_are_not_a_request_never_5xx(url: str, raw: bytes, route: str) -> None:
    _check(_post(url, route, raw))
