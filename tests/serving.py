"""A real local Ray cluster serving pdserve apps over HTTP, for end-to-end tests."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def ray_serve(port: int) -> Iterator[None]:
    import ray
    from ray import serve

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield
    finally:
        serve.shutdown()
        ray.shutdown()


@dataclass(frozen=True)
class Served:
    base_url: str  # ends in /v1
    api_key: str | None = None  # sent to /metrics when the app requires keys

    @property
    def root(self) -> str:
        return self.base_url.removesuffix("/v1")

    def metrics(self) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
        """Every sample of /metrics: name -> {sorted labels: value}."""
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else None
        text = httpx.get(f"{self.root}/metrics", timeout=10, headers=headers).text
        samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
        return samples

    def settled_total(self, name: str) -> float:
        """The sum of metric `name` over its labels once replica stats have refreshed after the last request (the
        ingress polls them every second)."""
        time.sleep(1.3)
        return sum(self.metrics().get(name, {}).values())

    def blocks_used(self) -> float:
        return sum(self.metrics().get("pdserve_kv_blocks_used", {}).values())

    def wait_blocks_used(self, want: float, timeout_s: float = 10.0) -> float:
        deadline = time.time() + timeout_s
        used = self.blocks_used()
        while used != want and time.time() < deadline:
            time.sleep(0.25)
            used = self.blocks_used()
        return used
