"""OpenTelemetry tracing, configured the standard way, in every process that serves (ingress and replicas).

Exporters come from the environment: OTLP when `OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT` is set (protocol from
`OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL`: `http/protobuf` (default) or `grpc`), JSON lines appended to
`PDSERVE_TRACES_FILE`, the console with `PDSERVE_TRACES_CONSOLE=1`. Sampling from `OTEL_TRACES_SAMPLER[_ARG]`,
service name from `OTEL_SERVICE_NAME` or `OTEL_RESOURCE_ATTRIBUTES` (default "pdserve"), `OTEL_TRACES_EXPORTER=none`
turns traces off. With no exporter, tracing stays off: the API's no-op
tracer, no cost. Ray workers do not inherit the driver's environment, so `configure_tracing` takes the variables
to apply (the serve config carries the driver's OTEL_*/PDSERVE_TRACES_* variables to every replica), except the
exporters' headers (`OTEL_EXPORTER_OTLP_[TRACES_]HEADERS`, which carry collectors' credentials): Serve shows a
deployment's config in its dashboard and status, so those travel through Ray's internal KV store instead
(`serve/cluster_store.py`).

The trace context crosses every Ray call explicitly, as a W3C `traceparent` string inside the typed request.
"""

from __future__ import annotations

import asyncio
import atexit
import fcntl
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

from opentelemetry import context, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter, SpanExportResult
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

from pdserve.telemetry import names

logger = logging.getLogger(__name__)
ENV_PREFIXES = ("OTEL_", "PDSERVE_TRACES_")
SECRET_SUFFIX = "_HEADERS"  # OTEL_EXPORTER_OTLP_HEADERS and the per-signal ones: API keys, bearer tokens
_PROPAGATOR = TraceContextTextMapPropagator()
_provider: TracerProvider | None = None


def tracing_env(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The variables that configure tracing, to carry from the driver to the replicas in their config: all but the
    secret ones (`tracing_secrets`)."""
    return {k: v for k, v in environ.items() if k.startswith(ENV_PREFIXES) and not is_secret_variable(k)}


def tracing_secrets(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The tracing variables that may carry credentials (exporter headers), never to be put in a config."""
    return {k: v for k, v in environ.items() if k.startswith(ENV_PREFIXES) and is_secret_variable(k)}


def is_secret_variable(name: str) -> bool:
    return name.endswith(SECRET_SUFFIX)


def configure_tracing(role: str, env: Mapping[str, str] | None = None) -> bool:
    """Set up this process's tracer provider once (later calls do nothing); `env` is applied first. Returns
    whether tracing is on."""
    global _provider
    if _provider is not None:
        return True
    if env:
        os.environ.update(env)
    exporters = _exporters()
    if not exporters:
        return False
    provider = TracerProvider(resource=resource(role))  # the sampler comes from OTEL_TRACES_SAMPLER
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    atexit.register(provider.shutdown)
    _provider = provider
    return True


def resource(role: str) -> Resource:
    """This process's resource: its role and pid, OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME (the SDK's), and
    service.name "pdserve" unless either names the service."""
    attributes: dict[str, AttributeValue] = {names.ROLE: role, "process.pid": os.getpid()}
    given = os.environ.get("OTEL_RESOURCE_ATTRIBUTES", "")
    named = any(pair.split("=", 1)[0].strip() == "service.name" for pair in given.split(","))
    if "OTEL_SERVICE_NAME" not in os.environ and not named:  # (our default overrode a name given there)
        attributes["service.name"] = "pdserve"
    return Resource.create(attributes)


def flush(timeout_s: float = 5.0) -> None:
    """Export every finished span now (tests, shutdown)."""
    if _provider is not None:
        _provider.force_flush(int(timeout_s * 1000))


def tracer() -> trace.Tracer:
    return trace.get_tracer("pdserve")


def traceparent(span: Span | None = None) -> str | None:
    """W3C traceparent of `span` (default: the current one); None when it is not recording (tracing off)."""
    span = span or trace.get_current_span()
    if not span.get_span_context().is_valid:
        return None
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, trace.set_span_in_context(span))
    return carrier.get("traceparent")


def parent_context(traceparent_header: str | None) -> context.Context:
    """The context whose span is the remote parent named by `traceparent_header` (a fresh root when None)."""
    if not traceparent_header:
        return context.Context()
    return _PROPAGATOR.extract({"traceparent": traceparent_header})


def start_span(
    name: str,
    parent: str | None,
    attributes: Mapping[str, AttributeValue | None] | None = None,
    kind: SpanKind = SpanKind.INTERNAL,
) -> Span:
    """A span under the remote parent `parent` (a traceparent), not made current: end it yourself. For code that
    crosses `await`/`yield` (async generators), where attaching a context would leak across tasks."""
    return tracer().start_span(name, parent_context(parent), kind=kind, attributes=_clean(attributes))


def child_span(parent: Span, name: str, attributes: Mapping[str, AttributeValue | None] | None = None) -> Span:
    return tracer().start_span(name, trace.set_span_in_context(parent), attributes=_clean(attributes))


@contextmanager
def span_in(
    parent: str | None, name: str, attributes: Mapping[str, AttributeValue | None] | None = None
) -> Iterator[Span]:
    """`with`: a span under `parent`, ended at exit; an exception is recorded and marks it as an error, a cancel (the
    client left, or the caller gave up) only says error.type=cancelled, as `serve/spans.py: traced_outputs` does."""
    span = start_span(name, parent, attributes)
    try:
        yield span
    except (asyncio.CancelledError, GeneratorExit):
        span.set_attribute(names.ERROR_TYPE, "cancelled")
        raise
    except BaseException as e:
        record_error(span, e)
        raise
    finally:
        span.end()


def record_error(span: Span, error: BaseException, error_type: str | None = None) -> None:
    span.record_exception(error)
    span.set_attribute(names.ERROR_TYPE, error_type or type(error).__name__)
    span.set_status(Status(StatusCode.ERROR, str(error)[:200]))


def _clean(attributes: Mapping[str, AttributeValue | None] | None) -> dict[str, AttributeValue] | None:
    """Drop None values (OpenTelemetry refuses them)."""
    return None if attributes is None else {k: v for k, v in attributes.items() if v is not None}


def _exporters() -> list[SpanExporter]:
    exporters: list[SpanExporter] = []
    env = os.environ
    if env.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":  # the standard way to turn traces off
        return exporters
    if env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        exporters.append(_otlp_exporter(protocol or "http/protobuf"))
    if env.get("PDSERVE_TRACES_FILE"):
        exporters.append(JsonLinesSpanExporter(env["PDSERVE_TRACES_FILE"]))
    if env.get("PDSERVE_TRACES_CONSOLE") == "1":
        exporters.append(ConsoleSpanExporter())
    return exporters


def _otlp_exporter(protocol: str) -> SpanExporter:
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        return GrpcExporter()
    if protocol != "http/protobuf":
        raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r} is not supported: use http/protobuf or grpc")
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

    return HttpExporter()  # endpoint, headers, timeout from the OTEL_EXPORTER_OTLP_* variables


class JsonLinesSpanExporter(SpanExporter):
    """One JSON object per span per line, appended under an exclusive lock (many processes may share the file)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = "".join(span.to_json(indent=None) + "\n" for span in spans)
        with open(self.path, "a", encoding="utf-8") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            f.write(lines)
        return SpanExportResult.SUCCESS
