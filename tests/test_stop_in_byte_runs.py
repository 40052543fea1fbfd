"""With a byte-fallback tokenizer (Llama-2/Mistral style), a stop string counts at the token whose bytes complete it,
as in vLLM (its detokenizer emits a character as soon as its bytes are complete): the output ends there (usage and
logprobs), and a stop string completed within min_tokens does not count. pdserve used to see the run's text only at
the first token after the run: tokens past the stop string were reported, and min_tokens cut the text wrongly with a
200 (found in review)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from pdserve.api import create_app
from test_api import FakeBackend, serve
from tiny_models import build_sentencepiece_tokenizer

TEXT = "naïve 日本語 ok 🎉 x"  # 日本語: nine byte-fallback tokens in a row


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, FakeBackend, Any]]:
    tokenizer = build_sentencepiece_tokenizer(tmp_path_factory.mktemp("sp"))
    backend = FakeBackend(tokenizer)
    backend.script = [*tokenizer(TEXT, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    with serve(create_app(backend)) as url:
        yield url, backend, tokenizer


def test_a_stop_string_ends_the_output_at_the_token_completing_it(served: tuple[str, FakeBackend, Any]) -> None:
    url, backend, tokenizer = served
    backend.reset()
    script = backend.script
    # the token whose bytes complete "日": the third byte token of the run
    pieces = tokenizer.convert_ids_to_tokens(script)
    completing = pieces.index("<0xE6>") + 3
    assert tokenizer.decode(script[:completing]).endswith("日")
    body = {"model": "fake-model", "prompt": "Say", "max_tokens": 60, "stop": ["日"], "logprobs": 0}
    with httpx.Client(base_url=url, timeout=10) as http:
        answer = http.post("/v1/completions", json=body).json()
    (choice,) = answer["choices"]
    assert (choice["text"], choice["finish_reason"]) == (" naïve ", "stop")
    # as vLLM: the output ends with the token completing the stop string (it was 17, through "▁o" after 日本語)
    assert answer["usage"]["completion_tokens"] == len(choice["logprobs"]["tokens"]) == completing


@pytest.mark.parametrize("stream", [False, True])
def test_a_stop_string_completed_within_min_tokens_does_not_count(
    served: tuple[str, FakeBackend, Any], stream: bool
) -> None:
    """min_tokens = 16 covers the whole run 日本語 (tokens 8..16): as in vLLM (a stop string counts only when it ends
    in the text of a token past min_tokens), "日" — completed by token 10 — must not end the output (it did when the
    run's text counted at token 17, the first non-byte token after it)."""
    url, backend, tokenizer = served
    backend.reset()
    script = backend.script
    pieces = tokenizer.convert_ids_to_tokens(script)
    run_end = pieces.index("<0xE6>") + 9  # the run's last byte token (1-based count of tokens so far)
    assert tokenizer.decode(script[:run_end]).endswith("日本語")
    body: dict[str, Any] = {
        "model": "fake-model", "prompt": "Say", "max_tokens": 60, "stop": ["日"], "min_tokens": run_end,
        "stream": stream,
    }  # fmt: skip
    with httpx.Client(base_url=url, timeout=10) as http:
        response = http.post("/v1/completions", json=body)
    assert response.status_code == 200
    if stream:
        chunks = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")]
        text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    else:
        text = response.json()["choices"][0]["text"]
    assert text == " naïve 日本語 ok 🎉 x"  # the whole output: "日" was completed within min_tokens
