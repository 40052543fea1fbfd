"""The ingress's request metrics (vLLM's names) through the real API and `Ingress.generate` over a scripted engine,
without Ray: a request the API ends itself (a stop string) is a finished request like any other."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pdserve.api import create_app
from pdserve.engine import RequestOutput
from pdserve.engine.request import FinishReason
from pdserve.router.admission import Admission
from pdserve.serve.config import ServeConfig
from pdserve.serve.failover import BrokenReplicas
from pdserve.serve.ingress import Ingress
from pdserve.serve.ingress_router import RouterCollector
from pdserve.serve.metrics import IngressMetrics
from test_api import EOS_ID, TEXT, serve


class _Engine:
    """A colocated engine handle whose every request streams the same script, a token per output."""

    def __init__(self, script: list[int]) -> None:
        self.script = script
        self.generate = self
        self.delay_s = 0.001  # per output

    def options(self, **_: Any) -> _Engine:
        return self

    def remote(self, request: Any, **_: Any) -> _Stream:
        return _Stream(request, self.script[: request.sampling.max_tokens], self.delay_s)


class _Stream:
    """A streaming call's response, as far as the ingress uses it: iterated, or cancelled."""

    def __init__(self, request: Any, script: list[int], delay_s: float) -> None:
        self.request, self.script, self.delay_s = request, script, delay_s

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._outputs()

    async def _outputs(self) -> AsyncIterator[RequestOutput]:
        for i, token in enumerate(self.script):
            await asyncio.sleep(self.delay_s)
            reason = None if i + 1 < len(self.script) else FinishReason.STOP if token == EOS_ID else FinishReason.LENGTH
            yield RequestOutput(self.request.request_id, [token], None, reason, len(self.request.prompt_token_ids), 0)

    def cancel(self) -> None:
        pass


class _Ingress:
    """What `Ingress.generate` and the API read of a colocated ingress replica, with its real metrics."""

    generate = Ingress.generate
    render_metrics = Ingress.render_metrics
    _admit, _finish = Ingress._admit, Ingress._finish
    _observe_first, _observe_end = Ingress._observe_first, Ingress._observe_end
    router = channels = prefill = decode = None
    model_name, model_names, max_model_len, eos_token_ids = "fake-model", ("fake-model",), 128, (EOS_ID,)
    mode = "colocated"
    config = ServeConfig()  # what `_admit` reads: the block size

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.engine = _Engine([*tokenizer(TEXT, add_special_tokens=False)["input_ids"], EOS_ID])
        self.broken = BrokenReplicas()
        self.admission = Admission(1 << 30)
        self.metrics = IngressMetrics(RouterCollector(None, self.admission))

    async def is_healthy(self) -> bool:
        return True

    async def is_ready(self) -> bool:
        return True


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from tiny_models import build_tokenizer

    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def _samples(ingress: _Ingress) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = ingress.render_metrics()[0].decode()
    return {
        (s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k not in ("ingress", "mode")))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_ended_by_its_stop_string_counts_as_finished(tokenizer: Any, stream: bool) -> None:
    """A stop string ends a request in the API, which closes the backend's stream: the ingress took that for a
    client gone and counted no success, no TPOT and no generated tokens (found in review)."""
    ingress = _Ingress(tokenizer)
    with serve(create_app(ingress)) as url:  # type: ignore[arg-type]
        body = {"model": "fake-model", "prompt": "hi", "max_tokens": 40, "stream": stream, "stop": ["fox"]}
        answer = httpx.post(f"{url}/v1/completions", json=body, timeout=20)
        assert answer.status_code == 200 and '"finish_reason":"stop"' in answer.text.replace(" ", "")
    got = _samples(ingress)
    assert got[("pdserve_request_success_total", (("finished_reason", "stop"),))] == 1
    assert got[("pdserve_request_time_per_output_token_seconds_count", ())] == 1
    assert got[("pdserve_time_to_first_token_seconds_count", ())] == 1
    assert got[("pdserve_generation_tokens_total", ())] > 0


def test_the_ttft_of_every_choice_counts_from_the_requests_arrival(tokenizer: Any) -> None:
    """With n > 1 the other choices start after the first choice's first token, so their TTFT, measured from their
    own start, left out the wait their client had (found in review: 0.3 s steps, first tokens seen at 0.37 and 0.67
    s, TTFTs recorded 0.3 each)."""
    ingress = _Ingress(tokenizer)
    ingress.engine.delay_s = 0.2
    with serve(create_app(ingress)) as url:  # type: ignore[arg-type]
        body = {"model": "fake-model", "prompt": "hi", "max_tokens": 2, "n": 3}
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=20).status_code == 200
    got = _samples(ingress)
    assert got[("pdserve_time_to_first_token_seconds_count", ())] == 3
    assert got[("pdserve_time_to_first_token_seconds_sum", ())] >= 0.2 + 2 * 0.4 - 0.05  # 0.6 before


def test_ttft_counts_the_wait_for_the_tokenizer(tokenizer: Any) -> None:
    """TTFT counts from the request's arrival at the API: it was stamped after tokenization, so a request queued
    behind another's long prompt on the one tokenizer thread recorded 0.002 s for a 0.5 s wait (found in review)."""
    ingress = _Ingress(tokenizer)
    app = create_app(ingress)  # type: ignore[arg-type]
    with serve(app) as url:
        app.state.pdserve.tokenization._executor.submit(time.sleep, 0.5)  # another request's prompt
        body = {"model": "fake-model", "prompt": "hi", "max_tokens": 2}
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=20).status_code == 200
    assert _samples(ingress)[("pdserve_time_to_first_token_seconds_sum", ())] >= 0.45


@pytest.mark.parametrize("prompt", ["hi", ["hi", "the quick brown", "a"]])
def test_the_request_span_and_prompt_counters_are_the_first_choices(tokenizer: Any, prompt: Any) -> None:
    """With n > 1 every choice set the request span's TTFT, so it read the last choice's (0.4 s for a first token
    at 0.2 s), and the prompt counted n times where `usage.prompt_tokens` counts it once (found in review). A batch
    of prompts: each prompt counts once, the span is the first prompt's first choice's."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter, provider = InMemorySpanExporter(), TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    ingress = _Ingress(tokenizer)
    ingress.engine.delay_s = 0.2
    tracer = provider.get_tracer("test")

    async def generate(request: Any) -> Any:  # the request's span current, as FastAPI's is in the handler
        with tracer.start_as_current_span("request"):
            async for delta in Ingress.generate(ingress, request):  # type: ignore[arg-type]
                yield delta

    ingress.generate = generate  # type: ignore[method-assign]
    with serve(create_app(ingress)) as url:  # type: ignore[arg-type]
        body = {"model": "fake-model", "prompt": prompt, "max_tokens": 2, "n": 3}
        answer = httpx.post(f"{url}/v1/completions", json=body, timeout=20)
        assert answer.status_code == 200
        assert len(answer.json()["choices"]) == 3 * (len(prompt) if isinstance(prompt, list) else 1)
    spans = [s for s in exporter.get_finished_spans() if s.attributes and "pdserve.ttft_s" in s.attributes]
    first = min(s.attributes["pdserve.ttft_s"] for s in spans)  # type: ignore[index, type-var]
    assert len(spans) == 1 and first < 0.35, [s.attributes for s in spans]  # choice 0's span only
    got = _samples(ingress)
    assert got[("pdserve_prompt_tokens_total", ())] == answer.json()["usage"]["prompt_tokens"]


@pytest.mark.parametrize("stream", [False, True])
def test_a_stop_string_completed_by_the_last_token_counts_as_stop(tokenizer: Any, stream: bool) -> None:
    """The stop string completes on the output that also ends the request for length: the response says "stop",
    and the metric said "length" (the ingress counted the end before the API read it; found in review)."""
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    last = next(i for i in range(1, len(ids) + 1) if "fox" in tokenizer.decode(ids[:i]))
    ingress = _Ingress(tokenizer)
    with serve(create_app(ingress)) as url:  # type: ignore[arg-type]
        body = {"model": "fake-model", "prompt": "hi", "max_tokens": last, "stop": ["fox"], "stream": stream}
        answer = httpx.post(f"{url}/v1/completions", json=body, timeout=20)
        assert answer.status_code == 200 and '"finish_reason":"stop"' in answer.text.replace(" ", "")
    got = _samples(ingress)
    assert got.get(("pdserve_request_success_total", (("finished_reason", "stop"),))) == 1, got
    assert ("pdserve_request_success_total", (("finished_reason", "length"),)) not in got


@pytest.mark.parametrize("stream", [False, True])
def test_a_batch_of_prompts_is_admitted_or_refused_whole(tokenizer: Any, stream: bool) -> None:
    """A batch whose prompts together do not fit the admission budget beside a waiting request is a 429 before any
    of its prompts reaches the engine (not a 200 cut short by the budget at its third prompt); once alone, the same
    batch is served whole though it holds more than the budget."""
    ingress = _Ingress(tokenizer)
    ingress.engine.delay_s = 0.3
    ingress.admission = Admission(40)
    prompts = [[5] * 15, [6] * 15, [7] * 15]  # 45 tokens in all
    seen: list[Any] = []
    remote = ingress.engine.remote
    ingress.engine.remote = lambda request, **kw: seen.append(request.request_id) or remote(request, **kw)  # type: ignore[method-assign]
    app = create_app(ingress)  # type: ignore[arg-type]
    with serve(app) as url:

        async def both() -> tuple[httpx.Response, httpx.Response]:
            async with httpx.AsyncClient(base_url=url, timeout=20) as client:
                body = {"model": "fake-model", "max_tokens": 1, "stream": stream}
                waiting = asyncio.ensure_future(client.post("/v1/completions", json={**body, "prompt": [5] * 10}))
                while ingress.admission.num_queued == 0:
                    await asyncio.sleep(0.01)
                batch = await client.post("/v1/completions", json={**body, "prompt": prompts})
                return await waiting, batch

        waiting, batch = asyncio.run(both())
        assert waiting.status_code == 200
        assert batch.status_code == 429 and batch.json()["error"]["type"] == "rate_limit_error", batch.text
        assert len(seen) == 1  # only the waiting request's
        body = {"model": "fake-model", "max_tokens": 1, "prompt": prompts, "stream": stream}
        alone = httpx.post(f"{url}/v1/completions", json=body, timeout=20)
        assert alone.status_code == 200 and alone.text.count('"index":2') == 1, alone.text
    assert ingress.admission.num_queued_tokens == 0 and ingress.admission.num_queued == 0


@pytest.mark.parametrize("stream", [False, True])
def test_a_batch_holds_its_room_and_its_further_prompts_are_never_refused(tokenizer: Any, stream: bool) -> None:
    """Admitted alone, a batch over the budget (3 x 30 tokens against 40) holds the whole budget until its first
    prompt's first token: a request arriving meanwhile is a 429 (the room was checked, not held: found in review).
    Its further prompts then join a queue they overflow (30 + 30 > 40), never refused: the answer is whole, no error
    event inside."""
    ingress = _Ingress(tokenizer)
    ingress.engine.delay_s = 0.3
    ingress.admission = Admission(40)
    prompts = [[5] * 30, [6] * 30, [7] * 30]
    with serve(create_app(ingress)) as url:  # type: ignore[arg-type]

        async def both() -> tuple[httpx.Response, httpx.Response]:
            async with httpx.AsyncClient(base_url=url, timeout=20) as client:
                body = {"model": "fake-model", "max_tokens": 2, "stream": stream}
                batch = asyncio.ensure_future(client.post("/v1/completions", json={**body, "prompt": prompts}))
                while ingress.admission.num_queued == 0:
                    await asyncio.sleep(0.01)
                late = await client.post("/v1/completions", json={**body, "prompt": [8] * 5})
                return await batch, late

        batch, late = asyncio.run(both())
    assert late.status_code == 429, late.text
    assert batch.status_code == 200 and '"error"' not in batch.text, batch.text
    assert {c["index"] for c in _choices(batch, stream)} == {0, 1, 2}
    assert ingress.admission.num_queued_tokens == 0 and ingress.admission.num_queued == 0


def _choices(response: httpx.Response, stream: bool) -> list[dict[str, Any]]:
    if not stream:
        return list(response.json()["choices"])
    events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ") and line != "data: [DONE]"]
    return [c for e in events for c in json.loads(e)["choices"]]
