"""The HTTP layer's Prometheus metrics: requests by route and status, end-to-end latency, errors by type."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_ROUTES = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics"})


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
        route = path if path in _ROUTES or path.startswith("/v1/models/") else "other"  # bounded label values
        route = "/v1/models/{model}" if route.startswith("/v1/models/") else route
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(route).observe(seconds)
        for error_type in error_types:
            self.errors.labels(error_type).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
