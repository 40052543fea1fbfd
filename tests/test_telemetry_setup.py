"""Tracing setup from the standard environment, W3C traceparent round trips, the JSON-lines exporter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor

from pdserve.telemetry import parent_context, tracing_env, tracing_secrets
from pdserve.telemetry.tracing import JsonLinesSpanExporter, _exporters, traceparent

HEADER = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, []),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, [HttpExporter]),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, [HttpExporter]),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, [GrpcExporter]),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_EXPORTER": "none"}, []),  # found in review
        (
            {"PDSERVE_TRACES_FILE": "/tmp/t.jsonl", "PDSERVE_TRACES_CONSOLE": "1"},
            [JsonLinesSpanExporter, ConsoleSpanExporter],
        ),
    ],
)
def test_exporters_come_from_the_standard_environment(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], expected: list[type]
) -> None:
    for key in list(tracing_env()):
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert [type(e) for e in _exporters()] == expected


def test_unsupported_protocol_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")
    with pytest.raises(ValueError, match="http/protobuf or grpc"):
        _exporters()


def test_tracing_env_keeps_only_tracing_variables_and_never_credentials() -> None:
    env = {
        "OTEL_SERVICE_NAME": "x", "PDSERVE_TRACES_FILE": "f", "PATH": "/bin", "PDSERVE_CACHE_DIR": "c",
        "OTEL_EXPORTER_OTLP_HEADERS": "authorization=Bearer s3cret", "OTEL_EXPORTER_OTLP_TRACES_HEADERS": "x-key=k",
    }  # fmt: skip
    assert tracing_env(env) == {"OTEL_SERVICE_NAME": "x", "PDSERVE_TRACES_FILE": "f"}
    assert tracing_secrets(env) == {
        "OTEL_EXPORTER_OTLP_HEADERS": "authorization=Bearer s3cret", "OTEL_EXPORTER_OTLP_TRACES_HEADERS": "x-key=k"
    }  # fmt: skip


def test_a_config_never_carries_exporter_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """Serve shows a deployment's config (and an app's args) in its dashboard and status."""
    from pdserve.serve.config import ServeConfig

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "authorization=Bearer s3cret")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "svc")
    config = ServeConfig()
    assert config.tracing_env["OTEL_SERVICE_NAME"] == "svc"
    assert "s3cret" not in config.model_dump_json()
    with pytest.raises(ValueError, match="tracing_env must not carry OTEL_EXPORTER_OTLP_TRACES_HEADERS"):
        ServeConfig(tracing_env={"OTEL_EXPORTER_OTLP_TRACES_HEADERS": "authorization=Bearer s3cret"})


def test_traceparent_round_trip_and_json_lines(tmp_path: Path) -> None:
    path = tmp_path / "spans.jsonl"
    provider = TracerProvider()  # a local provider: the process's global one stays untouched
    provider.add_span_processor(SimpleSpanProcessor(JsonLinesSpanExporter(str(path))))
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("child", context=parent_context(HEADER)) as span:
        header = traceparent(span)
    assert header is not None and header.split("-")[1] == HEADER.split("-")[1]  # same trace
    assert header.split("-")[2] == format(span.get_span_context().span_id, "016x")
    assert traceparent() is None  # no current span outside: tracing off means no header of ours
    assert parent_context(None) == parent_context("")  # a fresh root
    (line,) = path.read_text().splitlines()
    record = json.loads(line)
    assert record["name"] == "child" and record["parent_id"] == "0x00f067aa0ba902b7"


@pytest.mark.parametrize("seed", [5, 2**63 - 1, 2**63, 2**64 - 1])
def test_a_seed_past_int64_is_left_off_the_span_which_still_encodes(seed: int) -> None:
    """The API takes seeds up to 2^64 - 1 (as vLLM), OTLP's integers are int64: the attribute failed to encode, with
    a logged traceback per request (found in review)."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from pdserve.api.app import request_attributes
    from pdserve.api.backend import GenerationRequest
    from pdserve.api.formats import ResponseMeta

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    request = GenerationRequest("r", [1], 4, 1.0, 1.0, 0, seed, [], False, 0, False)
    with provider.get_tracer("t").start_as_current_span("POST /v1/completions") as span:
        span.set_attributes(request_attributes([request], ResponseMeta.new("cmpl", "m")))
    [finished] = exporter.get_finished_spans()
    assert (finished.attributes or {}).get("gen_ai.request.seed") == (seed if seed < 2**63 else None)
    encode_spans([finished])  # raised for seeds past int64


def test_a_cancelled_span_is_not_a_server_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A client gone during a prefill or a reservation cancels its replica call: span_in marked that span an ERROR
    (status and exception event), where the streams' spans (traced_outputs) call it error.type=cancelled only."""
    import asyncio

    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import StatusCode

    from pdserve.telemetry import tracing

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(tracing, "tracer", lambda: provider.get_tracer("t"))
    with pytest.raises(asyncio.CancelledError), tracing.span_in(None, "cancelled"):
        raise asyncio.CancelledError
    with pytest.raises(ValueError), tracing.span_in(None, "failed"):
        raise ValueError("bad")
    cancelled, failed = exporter.get_finished_spans()
    assert cancelled.status.status_code is StatusCode.UNSET and not cancelled.events
    assert (cancelled.attributes or {})["error.type"] == "cancelled"
    assert failed.status.status_code is StatusCode.ERROR and (failed.attributes or {})["error.type"] == "ValueError"


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({}, "pdserve"),
        ({"OTEL_SERVICE_NAME": "mine"}, "mine"),
        ({"OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=prod,service.name=myapp"}, "myapp"),  # found in review
    ],
)
def test_the_service_name_given_either_standard_way_is_kept(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], name: str
) -> None:
    from pdserve.telemetry.tracing import resource

    for key in ("OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert resource("ingress").attributes["service.name"] == name
