"""The HTTP layer's Prometheus metrics: requests by route and status, end-to-end latency, errors by type.

Every series an ingress process renders carries `ingress="<host>:<pid>"` (`render_as_ingress`): a scrape through
Serve's proxy reaches one of several ingress replicas each time, and without the label their counters would take
turns in one series (each turn a fake counter reset)."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

INGRESS_LABEL = "ingress"
_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_ROUTES = frozenset({
    "/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize", "/detokenize", "/version", "/health",
    "/ready", "/metrics",
})  # fmt: skip
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"})


def ingress_id() -> str:
    """This process's `ingress` label value: unique per live ingress replica, stable for its lifetime."""
    return f"{socket.gethostname()}:{os.getpid()}"


class _Labelled:
    """A collector's metrics with one more label on every sample."""

    def __init__(self, collector: Collector, name: str, value: str) -> None:
        self.collector, self.name, self.value = collector, name, value

    def collect(self) -> Iterator[Metric]:
        for family in self.collector.collect():
            labelled = Metric(family.name, family.documentation, family.type, family.unit)
            labelled.samples = [s._replace(labels={**s.labels, self.name: self.value}) for s in family.samples]
            yield labelled


def render_as_ingress(registry: Collector) -> bytes:
    """`registry` in the Prometheus text format, every sample labelled with this process's `ingress`."""
    return generate_latest(_Labelled(registry, INGRESS_LABEL, ingress_id()))


class APIMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "pdserve_http_requests", "HTTP requests by route and status", ["method", "route", "status"],
            registry=self.registry,
        )  # fmt: skip
        self.latency = Histogram(
            "pdserve_e2e_request_latency_seconds", "from the request's arrival to its response's last byte",
            ["route"], buckets=_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.errors = Counter(
            "pdserve_errors", "errors answered, by OpenAI error code or type", ["type"], registry=self.registry
        )

    def observe(self, method: str, path: str, status: int, seconds: float, error_types: list[str]) -> None:
        method = method if method in _METHODS else "_OTHER"  # bounded: a client picks the method
        route = path if path in _ROUTES or path.startswith("/v1/models/") else "other"  # bounded label values
        route = "/v1/models/{model}" if route.startswith("/v1/models/") else route
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(route).observe(seconds)
        for error_type in error_types:
            self.errors.labels(error_type).inc()

    def render(self) -> bytes:
        return render_as_ingress(self.registry)
