"""Traces and metrics from real traffic on a local Ray cluster (1 prefill + 1 decode, tiny Llama), exported over
OTLP/HTTP to a real receiver in this process and decoded with opentelemetry-proto; /metrics parsed with
prometheus_client's parser."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from otlp_receiver import OTLPReceiver, ReceivedSpan, otlp_receiver
from pdserve.telemetry import names
from serving import Served, deploy, shared_serve

pytestmark = pytest.mark.serve_cluster

PROMPT = list(range(40, 40 + 37))  # 3 blocks of 16: 2 full + 1 partial
MAX_TOKENS = 6
CLIENT_TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN_ID = "00f067aa0ba902b7"
BLOCK_BYTES = 2 * 2 * 16 * 2 * 32 * 4  # K and V x 2 layers x 16 tokens x 2 KV heads x 32 dims x 4 bytes (fp32)


@pytest.fixture(scope="module")
def traced(tiny_models: dict[str, Path]) -> Iterator[tuple[Served, Served, OTLPReceiver]]:
    """A traced 1P1D app at / and a broken one (KV transfers always time out) at /broken. The receiver wants a
    token, as a collector behind auth does; it is set in this (the building) process's environment only after Ray
    started, so the replicas inherit nothing and can only have it from Ray's internal KV store, never from their
    config (which must not carry it)."""

    from ray.experimental import internal_kv

    from pdserve.serve import cluster_store
    from pdserve.serve.config import ServeConfig

    token = "Bearer t0ken-for-the-collector"
    auth = {"authorization": token}
    with otlp_receiver(auth) as (receiver, endpoint), shared_serve() as port, pytest.MonkeyPatch.context() as mp:
        mp.setenv("OTEL_EXPORTER_OTLP_HEADERS", f"authorization={token}")
        env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_SERVICE_NAME": "pdserve-test",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        }
        common = {
            "model": str(tiny_models["llama"]), "dtype": "float32", "served_model_name": "tiny",
            "num_kv_blocks": 64, "tracing_env": env, "router": {"local_prefill_max_tokens": 0},
            "kv_pipelined_push": True,
        }  # fmt: skip
        broken = ServeConfig(**common, kv_transfer_timeout_s=1e-9)
        assert token not in ServeConfig(**common).model_dump_json() + broken.model_dump_json()
        deploy({"traced": (ServeConfig(**common), "/"), "broken": (broken, "/broken")})
        mp.delenv("OTEL_EXPORTER_OTLP_HEADERS")
        try:
            yield (
                Served(f"http://127.0.0.1:{port}/v1", num_engine_replicas=2),
                Served(f"http://127.0.0.1:{port}/broken/v1", num_engine_replicas=2),
                receiver,
            )
        finally:  # the session's later modules share this cluster
            internal_kv._internal_kv_del(cluster_store._TRACING_SECRETS_KEY, namespace="pdserve")


def client(served: Served, **headers: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=served.base_url, api_key="unused", max_retries=0, timeout=60, default_headers=headers or None
    )


def trace_of(spans: list[ReceivedSpan], response_id: str) -> list[ReceivedSpan]:
    """Every span of the trace whose HTTP span answered `response_id`."""
    roots = [s for s in spans if s.attributes.get(names.GEN_AI_RESPONSE_ID) == response_id]
    return [s for s in spans if roots and s.trace_id == roots[0].trace_id]


def by_name(spans: list[ReceivedSpan]) -> dict[str, ReceivedSpan]:
    """Spans by name; the request's SERVER span (FastAPI's) as "http"."""
    return {"http" if s.kind == SERVER else s.name: s for s in spans}


SERVER = 2  # SpanKind.SERVER in OTLP
HTTP_SPAN = "POST /v1/completions"
REQUEST_SPANS = {
    HTTP_SPAN, names.SPAN_TOKENIZE, names.SPAN_ROUTE, names.SPAN_RESERVE, names.SPAN_PREFILL, names.SPAN_KV_TRANSFER,
    names.SPAN_DECODE,
}  # fmt: skip


def test_one_trace_per_request_across_processes(traced) -> None:  # type: ignore[no-untyped-def]
    served, _, receiver = traced
    out = client(served).completions.create(
        model="tiny", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, extra_body={"ignore_eos": True}
    )
    spans = receiver.wait_for(lambda got: {s.name for s in trace_of(got, out.id)} >= REQUEST_SPANS)
    trace = by_name(trace_of(spans, out.id))
    http, prefill, transfer = trace["http"], trace[names.SPAN_PREFILL], trace[names.SPAN_KV_TRANSFER]
    assert http.name == HTTP_SPAN and http.attributes["http.route"] == "/v1/completions"
    # One trace, rooted at the HTTP span, spanning the ingress, prefill and decode processes.
    assert http.parent_span_id == ""
    assert {s.resource[names.ROLE] for s in trace.values()} == {"ingress", "prefill", "decode"}
    assert receiver.num_refused == 0  # every process sent the collector's token (from Ray's KV store)
    assert len({s.resource["process.pid"] for s in trace.values()}) == 3
    assert all(s.resource["service.name"] == "pdserve-test" for s in trace.values())
    for name in (names.SPAN_TOKENIZE, names.SPAN_ROUTE, names.SPAN_RESERVE, names.SPAN_PREFILL, names.SPAN_DECODE):
        assert trace[name].parent_span_id == http.span_id, name
    assert transfer.parent_span_id == prefill.span_id
    # Attributes agree with the response and with each other.
    assert out.usage is not None
    assert http.attributes[names.HTTP_STATUS] == 200
    assert http.attributes[names.GEN_AI_INPUT_TOKENS] == out.usage.prompt_tokens == len(PROMPT)
    assert http.attributes[names.GEN_AI_OUTPUT_TOKENS] == out.usage.completion_tokens == MAX_TOKENS
    assert http.attributes[names.GEN_AI_FINISH_REASONS] == [out.choices[0].finish_reason]
    assert 0 < http.attributes[names.TTFT_S] < 60
    assert trace[names.SPAN_DECODE].attributes[names.GEN_AI_OUTPUT_TOKENS] == MAX_TOKENS - 1  # 1st from prefill
    assert prefill.attributes[names.PROMPT_TOKENS] == len(PROMPT)
    assert prefill.attributes[names.COMPUTED_TOKENS] == len(PROMPT) - prefill.attributes[names.CACHED_TOKENS]
    assert trace[names.SPAN_ROUTE].attributes[names.MODE] == "disaggregated"
    assert trace[names.SPAN_ROUTE].attributes[names.PREFILL_REPLICA] == prefill.attributes[names.REPLICA_ID]
    num_blocks = transfer.attributes[names.TRANSFER_BLOCKS]
    assert num_blocks == 3 - trace[names.SPAN_RESERVE].attributes[names.CACHED_TOKENS] // 16
    assert transfer.attributes[names.TRANSFER_BYTES] == num_blocks * BLOCK_BYTES
    assert [e[1][names.LAYER] for e in transfer.events if e[0] == names.EVENT_LAYER_SENT] == [0, 1]
    assert transfer.attributes[names.PIPELINED] is True
    assert not any(s.is_error for s in trace.values())


def test_client_traceparent_is_continued(traced) -> None:  # type: ignore[no-untyped-def]
    served, _, receiver = traced
    header = f"00-{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-01"
    stream = client(served, traceparent=header).completions.create(
        model="tiny", prompt=PROMPT[::-1], max_tokens=MAX_TOKENS, temperature=0, stream=True,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    response_id = next(iter(stream)).id
    list(stream)
    spans = receiver.wait_for(lambda got: {s.name for s in trace_of(got, response_id)} >= REQUEST_SPANS)
    trace = by_name(trace_of(spans, response_id))
    assert {s.trace_id for s in trace.values()} == {CLIENT_TRACE_ID}
    assert trace["http"].parent_span_id == CLIENT_SPAN_ID
    assert trace["http"].attributes[names.GEN_AI_OUTPUT_TOKENS] == MAX_TOKENS


def test_failed_prefills_are_error_spans_and_the_decode_replica_takes_over(traced, oracle) -> None:  # type: ignore[no-untyped-def]
    """Every KV transfer of the broken app times out: both prefill attempts fail (error spans, with the transfer's
    exception), and the decode replica that reserved the blocks prefills the prompt itself — one trace, a 200,
    with the oracle's tokens (layers the cut pushes wrote must not reach it)."""
    _, broken, receiver = traced
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    response = httpx.post(f"{broken.base_url}/completions", json=body, timeout=60)
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 4
    assert response.json()["choices"][0]["text"] == oracle(list(PROMPT), 4)

    def failed_transfers(got: list[ReceivedSpan]) -> list[ReceivedSpan]:
        return [s for s in got if s.name == names.SPAN_KV_TRANSFER and s.is_error]

    def complete(got: list[ReceivedSpan]) -> bool:
        # Every span the test checks: each process exports its own in batches, so the retry's prefill span can land
        # after the ingress's and the decode replica's (a CI run read the trace with the first attempt's alone).
        failed = failed_transfers(got)
        trace = trace_of_span(got, failed[0]) if failed else []
        seen = {s.name for s in trace}
        prefills = sum(s.name == names.SPAN_PREFILL for s in trace)
        return names.SPAN_GENERATE in seen and prefills >= 2 and any(s.kind == SERVER for s in trace)

    spans = receiver.wait_for(complete)
    trace = trace_of_span(spans, failed_transfers(spans)[0])
    prefills = [s for s in trace if s.name == names.SPAN_PREFILL]
    transfers = [s for s in trace if s.name == names.SPAN_KV_TRANSFER]
    assert len(prefills) == 2 and all(s.is_error for s in prefills)  # the first attempt and its retry
    assert all(s.is_error and s.attributes[names.ERROR_TYPE] == "TransferError" for s in transfers)
    assert any(name == "exception" for name, _ in transfers[0].events)
    http = by_name(trace)["http"]
    assert not http.is_error and http.attributes[names.HTTP_STATUS] == 200
    assert names.SPAN_GENERATE in {s.name for s in trace}  # the decode replica's own prefill and decode
    assert broken.wait_blocks_used(0) == 0  # the failed reservation and the local request both freed


def trace_of_span(spans: list[ReceivedSpan], span: ReceivedSpan) -> list[ReceivedSpan]:
    return [s for s in spans if s.trace_id == span.trace_id]


def test_metrics_parse_and_count_the_traffic(traced) -> None:  # type: ignore[no-untyped-def]
    served, _, _ = traced

    def count(name: str, **labels: str) -> float:
        samples = served.metrics().get(name, {})
        return sum(v for k, v in samples.items() if set(labels.items()) <= set(k))

    ok_before = count("pdserve_http_requests_total", route="/v1/completions", status="200")
    bad_before = count("pdserve_errors_total", type="context_length_exceeded")
    finished_before = count("pdserve_request_success_total", finished_reason="length")
    for _ in range(3):
        client(served).completions.create(model="tiny", prompt=PROMPT, max_tokens=3, extra_body={"ignore_eos": True})
    with pytest.raises(openai.BadRequestError):
        client(served).completions.create(model="tiny", prompt=[5] * 5000, max_tokens=3)
    assert count("pdserve_http_requests_total", route="/v1/completions", status="200") == ok_before + 3
    assert count("pdserve_http_requests_total", route="/v1/completions", status="400") >= 1
    assert count("pdserve_errors_total", type="context_length_exceeded") == bad_before + 1
    assert count("pdserve_request_success_total", finished_reason="length") == finished_before + 3
    assert count("pdserve_e2e_request_latency_seconds_count", route="/v1/completions") >= 4
    assert count("pdserve_time_to_first_token_seconds_count") >= 3
    assert count("pdserve_request_queue_time_seconds_count") >= 3
    assert count("pdserve_router_decisions_total", mode="disaggregated") >= 3
    ratio = count("pdserve_prompt_tokens_cached_total") / count("pdserve_prompt_tokens_total")
    assert count("pdserve_prefix_cache_hit_ratio") == pytest.approx(ratio)
    assert count("pdserve_kv_transfer_seconds_total", role="prefill") > 0


def test_a_request_with_several_choices_carries_their_usage_on_its_span(traced) -> None:  # type: ignore[no-untyped-def]
    """With n > 1 the request's span had no output tokens nor finish reasons (found in review)."""
    served, _, receiver = traced
    out = client(served).completions.create(
        model="tiny", prompt=PROMPT[1:], max_tokens=3, temperature=0, n=2, extra_body={"ignore_eos": True}
    )
    spans = receiver.wait_for(lambda got: any(s.kind == SERVER for s in trace_of(got, out.id)))
    http = by_name(trace_of(spans, out.id))["http"]
    assert out.usage is not None and http.attributes[names.GEN_AI_OUTPUT_TOKENS] == out.usage.completion_tokens == 6
    assert http.attributes[names.GEN_AI_FINISH_REASONS] == ["length", "length"]
