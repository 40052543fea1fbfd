"""With n > 1, stream_options.continuous_usage_stats puts the usage so far of each chunk's own choice in that chunk,
as vLLM does (serving_chat/serving_completion: `completion_tokens = previous_num_tokens[i]`); only the final usage
chunk sums every choice (pdserve put the sum over all choices into every chunk; found in review)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from pdserve.api import create_app
from test_api import FakeBackend, serve, sse_payloads
from tiny_models import build_tokenizer


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, FakeBackend]]:
    backend = FakeBackend(build_tokenizer(tmp_path_factory.mktemp("tokenizer")))
    with serve(create_app(backend)) as url:
        yield url, backend


def _continuous_usage_chunks(url: str, endpoint: str, n: int) -> list[dict[str, Any]]:
    """The chunks of a streamed request for `n` choices of 5 tokens with continuous usage stats ([DONE] left out)."""
    body: dict[str, Any] = {"model": "fake-model", "max_tokens": 5, "n": n, "stream": True,
                            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}  # fmt: skip
    if endpoint == "chat":
        path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": "hi"}]
    else:
        path, body["prompt"] = "/v1/completions", "hi"
    with httpx.Client(base_url=url, timeout=10) as http:
        return [json.loads(p) for p in sse_payloads(http.post(path, json=body))[:-1]]


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_continuous_usage_of_n_choices_counts_each_chunks_own_choice(
    server: tuple[str, FakeBackend], endpoint: str
) -> None:
    url, backend = server
    backend.reset(tokens_per_delta=1)
    chunks = _continuous_usage_chunks(url, endpoint, n=2)
    seen: dict[int, int] = {}  # tokens of each choice so far (one token per delta, each with visible text)
    got, want = [], []
    for chunk in chunks[:-1]:
        (choice,) = chunk["choices"]
        i = choice["index"]
        text = choice["delta"].get("content") if endpoint == "chat" else choice["text"]
        seen[i] = seen.get(i, 0) + (1 if text else 0)
        got.append((i, chunk["usage"]["completion_tokens"]))
        want.append((i, seen[i]))
    assert got == want  # each chunk: its own choice's completion tokens so far, as vLLM reports
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 10  # the sum, at the end


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_every_chunk_reports_the_prompts_cache_hit_as_the_final_usage_does(
    server: tuple[str, FakeBackend], endpoint: str
) -> None:
    """The prompt is one: its cache hit is choice 0's, which computed it (the final usage's). The other choices,
    started after its first token, hit its blocks; their chunks reported their own hit, and their opening chunks
    (sent before they started) 0 (found in review)."""
    url, backend = server
    backend.reset(tokens_per_delta=2)
    backend.cached_tokens = lambda request: 3 if request.request_id.endswith("-0") else 7
    chunks = _continuous_usage_chunks(url, endpoint, n=3)
    indexes = {chunk["choices"][0]["index"] for chunk in chunks[:-1]}
    assert indexes == {0, 1, 2}
    hits = [chunk["usage"]["prompt_tokens_details"]["cached_tokens"] for chunk in chunks]
    assert hits == [3] * len(chunks), hits
