"""The HTTP layer over a fake backend: errors, limits, stop strings, streaming (no Ray, no model)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest
from fastapi.testclient import TestClient

from pdserve.api import CapacityError, GenerationDelta, GenerationRequest, create_app
from pdserve.api.detokenizer import IncrementalDetokenizer
from tiny_models import build_tokenizer


class FakeBackend:
    """Streams a fixed text's tokens, one per delta; records what it was asked and what was closed."""

    model_name = "fake"
    max_model_len = 64
    eos_token_ids = (2,)

    def __init__(self, tokenizer: object, text: str) -> None:
        self.tokenizer = tokenizer
        self.tokens = list(tokenizer(text, add_special_tokens=False)["input_ids"])  # type: ignore[operator]
        self.requests: list[GenerationRequest] = []
        self.closed = 0
        self.full = False

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        if self.full:
            raise CapacityError("no room", retry_after_s=2.0)
        self.requests.append(request)
        try:
            tokens = self.tokens[: request.max_tokens]
            for i, t in enumerate(tokens):
                reason = "length" if i == len(tokens) - 1 else None
                yield GenerationDelta(
                    [t], [-0.5] if request.logprobs else None, reason, len(request.prompt_token_ids), 0
                )
        finally:
            self.closed += 1

    async def is_healthy(self) -> bool:
        return True

    def render_metrics(self) -> tuple[bytes, str]:
        return b"pdserve_up 1\n", "text/plain"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> object:
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture
def backend(tokenizer: object) -> FakeBackend:
    return FakeBackend(tokenizer, "The quick brown fox jumps over the lazy dog. The end.")


@pytest.fixture
def client(backend: FakeBackend) -> TestClient:
    return TestClient(create_app(backend, max_body_bytes=4096))  # type: ignore[arg-type]


def test_streamed_text_equals_whole_text_and_usage(client: TestClient, backend: FakeBackend) -> None:
    body = {"model": "fake", "prompt": "hi", "max_tokens": 40, "stream_options": {"include_usage": True}}
    whole = client.post("/v1/completions", json=body).json()
    assert whole["choices"][0]["text"] == "The quick brown fox jumps over the lazy dog. The end."
    events = [
        line[6:]
        for line in client.post("/v1/completions", json={**body, "stream": True}).text.splitlines()
        if line.startswith("data: ")
    ]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == whole["choices"][0]["text"]
    assert chunks[-1]["usage"] == whole["usage"] and whole["usage"]["completion_tokens"] == len(backend.tokens)


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_split_across_tokens_never_leaks(client: TestClient, backend: FakeBackend, stream: bool) -> None:
    body = {"model": "fake", "prompt": "hi", "max_tokens": 40, "stop": ["lazy dog"], "stream": stream}
    response = client.post("/v1/completions", json=body)
    if stream:
        chunks = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")]
        text = "".join(c["choices"][0]["text"] for c in chunks)
        reason = chunks[-1]["choices"][0]["finish_reason"]
    else:
        text, reason = response.json()["choices"][0]["text"], response.json()["choices"][0]["finish_reason"]
    assert text == "The quick brown fox jumps over the " and reason == "stop"
    assert backend.closed == 1  # the backend's stream was closed: the request's blocks are freed


def test_detokenizer_holds_back_possible_stop_prefixes(tokenizer: object) -> None:
    ids = list(tokenizer("abc def ghi", add_special_tokens=False)["input_ids"])  # type: ignore[operator]
    d = IncrementalDetokenizer(tokenizer, stop=["f g"])
    out = "".join(d.add([t]) for t in ids) + d.flush()
    assert out == "abc de" and d.is_stopped
    plain = IncrementalDetokenizer(tokenizer, stop=[])
    assert "".join(plain.add([t]) for t in ids) + plain.flush() == "abc def ghi"


@pytest.mark.parametrize(
    ("body", "status", "param", "code"),
    [
        ({"model": "fake", "prompt": "hi", "max_tokens": -1}, 400, "max_tokens", None),
        ({"model": "fake", "prompt": "hi", "max_tokens": "x"}, 400, "max_tokens", None),
        ({"model": "fake", "prompt": "hi", "temperature": -1}, 400, "temperature", None),
        ({"model": "fake", "prompt": "hi", "n": 2}, 400, "n", None),
        ({"model": "fake", "prompt": ""}, 400, "prompt", None),
        ({"model": "fake", "prompt": [5] * 64}, 400, "prompt", "context_length_exceeded"),
        ({"model": "fake", "prompt": [5] * 60, "max_tokens": 10}, 400, "max_tokens", "context_length_exceeded"),
        ({"model": "other", "prompt": "hi"}, 404, "model", "model_not_found"),
        ({"prompt": "hi"}, 400, "model", None),
    ],
)
def test_invalid_requests_never_reach_the_backend(
    client: TestClient, backend: FakeBackend, body: dict, status: int, param: str, code: str | None
) -> None:
    response = client.post("/v1/completions", json=body)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["param"] == param and error["code"] == code and "Traceback" not in response.text
    assert backend.requests == []


def test_malformed_json_too_large_and_no_capacity(client: TestClient, backend: FakeBackend) -> None:
    bad = client.post("/v1/completions", content=b"{nope", headers={"content-type": "application/json"})
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    huge = client.post("/v1/completions", json={"model": "fake", "prompt": "x" * 10_000})
    assert huge.status_code == 413
    backend.full = True
    busy = client.post("/v1/completions", json={"model": "fake", "prompt": "hi"})
    assert busy.status_code == 429 and busy.headers["retry-after"] == "2"
    assert client.get("/nope").status_code == 404 and client.get("/nope").json()["error"]


def test_chat_models_health_metrics(client: TestClient, backend: FakeBackend) -> None:
    chat = client.post(
        "/v1/chat/completions",
        json={
            "model": "fake",
            "messages": [{"role": "user", "content": "hi"}],
            "max_completion_tokens": 3,
            "logprobs": True,
        },
    ).json()
    assert chat["choices"][0]["message"]["role"] == "assistant"
    assert [c["logprob"] for c in chat["choices"][0]["logprobs"]["content"]] == [-0.5] * 3
    assert backend.requests[0].max_tokens == 3
    assert client.get("/v1/models").json()["data"][0]["id"] == "fake"
    assert client.get("/health").status_code == 200
    assert client.get("/metrics").text == "pdserve_up 1\n"


def test_traceparent_is_carried(client: TestClient, backend: FakeBackend) -> None:
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    client.post("/v1/completions", json={"model": "fake", "prompt": "hi"}, headers={"traceparent": tp})
    assert backend.requests[0].traceparent == tp
