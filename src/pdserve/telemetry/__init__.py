"""Telemetry, a leaf any package may import: OpenTelemetry tracing (setup, W3C traceparent across Ray calls) and
the span/attribute names (`names`)."""

from pdserve.telemetry import names
from pdserve.telemetry.tracing import (
    child_span,
    configure_tracing,
    flush,
    is_secret_variable,
    parent_context,
    record_error,
    span_in,
    start_span,
    traceparent,
    tracer,
    tracing_env,
    tracing_secrets,
)

__all__ = [
    "child_span",
    "configure_tracing",
    "flush",
    "is_secret_variable",
    "names",
    "parent_context",
    "record_error",
    "span_in",
    "start_span",
    "traceparent",
    "tracer",
    "tracing_env",
    "tracing_secrets",
]
