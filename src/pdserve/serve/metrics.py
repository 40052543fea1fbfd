"""Prometheus metrics served at the ingress's /metrics: ingress-measured latencies and token counts, and each
replica's KV state and counters labelled by replica and role (refreshed from the replicas' stats in the background).

Names follow vLLM's after the `pdserve_` prefix where the meaning is the same (`time_to_first_token_seconds`,
`num_requests_running`, `kv_cache_usage_perc`, `prefix_cache_hits`, ...). Every series also carries `ingress`
(`pdserve.api.metrics.render_as_ingress`): replica series are copies, one per ingress replica, of the same value,
so dashboards take `max by (replica, role)` of them; ingress-measured series are that ingress's share: `sum`."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from pdserve.api.metrics import render_as_ingress
from pdserve.serve.messages import ReplicaStats

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

# name after `pdserve_` -> (family, help, the ReplicaStats field it renders)
_REPLICA_FAMILIES: dict[str, tuple[type[GaugeMetricFamily] | type[CounterMetricFamily], str, str]] = {
    "kv_blocks_total": (GaugeMetricFamily, "KV blocks in the replica's pool", "num_blocks"),
    "kv_blocks_used": (GaugeMetricFamily, "KV blocks referenced by requests", "num_used_blocks"),
    "kv_blocks_cached": (GaugeMetricFamily, "KV blocks in the prefix cache", "num_cached_blocks"),
    "kv_blocks_held": (GaugeMetricFamily, "prefill results and reservations holding blocks", "num_held"),
    "kv_blocks_reserved": (GaugeMetricFamily, "blocks of open reservations", "num_reserved_blocks"),
    "kv_blocks_fenced": (GaugeMetricFamily, "blocks of revoked reservations kept unused", "num_fenced_blocks"),
    "kv_reaped_leases": (CounterMetricFamily, "reservations revoked at lease end", "num_reaped_leases"),
    "kv_reaped_held": (CounterMetricFamily, "prefill results released by the reaper", "num_reaped_held"),
    "kv_fenced_aborts": (CounterMetricFamily, "reservations aborted with a writer maybe live", "num_fenced_aborts"),
    "requests_aborted": (CounterMetricFamily, "requests aborted in the engine", "num_aborts"),
    "kv_fenced_writes": (CounterMetricFamily, "KV writes refused by the fence", "num_fenced_writes"),
    "num_requests_running": (GaugeMetricFamily, "requests being computed", "num_running"),
    "num_requests_waiting": (GaugeMetricFamily, "requests queued in the engine", "num_waiting"),
    "kv_transfer_bytes": (CounterMetricFamily, "KV bytes pushed to decode replicas", "kv_transfer_bytes"),
    "kv_transfer_blocks": (CounterMetricFamily, "KV blocks pushed to decode replicas", "kv_transfer_blocks"),
    "kv_transfer_seconds": (CounterMetricFamily, "time spent pushing KV blocks", "kv_transfer_s"),
    "prefill_queued_tokens": (GaugeMetricFamily, "prompt tokens accepted, not yet computed", "queued_prefill_tokens"),
    "prefill_computed_tokens": (CounterMetricFamily, "prompt tokens computed (cache hits excluded)", "prefill_tokens"),
    "engine_busy_seconds": (CounterMetricFamily, "time spent in model steps", "busy_s"),
    "engine_steps": (CounterMetricFamily, "model steps", "steps"),
    "decode_steps": (CounterMetricFamily, "model steps without a prompt chunk", "decode_steps"),
    "decode_step_seconds": (CounterMetricFamily, "time spent in those steps", "decode_step_s"),
    "borrowed_core_steps": (
        CounterMetricFamily,
        "steps x cores borrowed from idle replicas on the node (lend_idle_cores)",
        "borrowed_core_steps",
    ),
    "core_home_waits": (
        CounterMetricFamily,
        "steps that waited for a borrower to hand the replica's own cores back",
        "core_home_waits",
    ),
    "prefix_cache_hits": (
        CounterMetricFamily,
        "prompt tokens served from the prefix cache (prefill/engine: computed ones skipped; decode: not transferred)",
        "prefix_cache_hit_tokens",
    ),
}


class ReplicaStatsCollector(Collector):
    """Renders the latest `ReplicaStats` of every replica; the ingress replaces the snapshot as it refreshes."""

    def __init__(self) -> None:
        self.snapshot: list[ReplicaStats] = []
        self.taken_at = 0.0  # Unix time the snapshot's stats were asked for (0: none yet)

    def update(self, snapshot: list[ReplicaStats], taken_at: float) -> None:
        self.snapshot, self.taken_at = snapshot, taken_at

    def collect(self) -> Iterable[Metric]:
        labels = ["replica", "role"]
        for name, (family_cls, doc, field) in _REPLICA_FAMILIES.items():
            family = family_cls(f"pdserve_{name}", doc, labels=labels)
            for s in self.snapshot:
                family.add_metric([s.replica_id, s.role], float(getattr(s, field)))
            yield family
        usage = GaugeMetricFamily("pdserve_kv_cache_usage_perc", "fraction of KV blocks in use, 0 to 1", labels=labels)
        for s in self.snapshot:
            usage.add_metric([s.replica_id, s.role], s.num_used_blocks / max(s.num_blocks, 1))
        yield usage
        # How old the replica series are: a reader that needs state after some moment (an idle check after the
        # last request) waits for a snapshot asked for later; a growing age also flags a stuck refresh.
        yield GaugeMetricFamily(
            "pdserve_replica_stats_timestamp_seconds",
            "Unix time the replica series above were asked of the replicas",
            value=self.taken_at,
        )


class PlannerCollector(Collector):
    """Renders the autoscaling planner's last decision per pool (serve/autoscaling.py publishes it)."""

    def __init__(self) -> None:
        self.decision: dict[str, Any] | None = None

    def collect(self) -> Iterable[Metric]:
        families = {
            key: GaugeMetricFamily(f"pdserve_planner_{key}_replicas", doc, labels=["pool"])
            for key, doc in (
                ("target", "replicas the planner asks of the pool"),
                ("current", "replicas the pool had at the planner's last decision"),
                ("needed", "replicas the planner's model says the load needs (before bounds and hysteresis)"),
            )
        }
        predicted = GaugeMetricFamily(
            "pdserve_planner_predicted", "the planner's model at the current size", labels=["quantity"]
        )
        if self.decision is not None:
            for pool, d in self.decision.get("pools", {}).items():
                for key, family in families.items():
                    family.add_metric([pool], float(d[key]))
            for quantity, value in self.decision.get("prediction", {}).items():
                predicted.add_metric([quantity], float(value))
        yield from families.values()
        yield predicted


class IngressMetrics:
    def __init__(self, router: Collector) -> None:
        self.registry = CollectorRegistry()
        self.replicas = ReplicaStatsCollector()
        self.registry.register(self.replicas)
        self.planner = PlannerCollector()
        self.registry.register(self.planner)
        self.registry.register(router)
        self.requests = Counter(
            "pdserve_request_success", "finished requests", ["mode", "finished_reason"], registry=self.registry
        )
        self.ttft = Histogram(
            "pdserve_time_to_first_token_seconds",
            "time to first token",
            ["mode"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.tpot = Histogram(
            "pdserve_request_time_per_output_token_seconds",
            "one request's decode time per output token after the first",
            ["mode"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )

        self.queue = Histogram(
            "pdserve_request_queue_time_seconds",
            "time the prompt waited in the computing replica's engine before its first step",
            ["mode"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "pdserve_prompt_tokens", "prompt tokens of requests that started", ["mode"], registry=self.registry
        )
        self.generation_tokens = Counter(
            "pdserve_generation_tokens", "tokens generated by requests that ended (vLLM's generation_tokens)", ["mode"],
            registry=self.registry,
        )  # fmt: skip
        self.cached_tokens = Counter(
            "pdserve_prompt_tokens_cached",
            "prompt tokens the computing replica took from its prefix cache (hit ratio: this / prompt tokens)",
            ["mode"],
            registry=self.registry,
        )

        self.hit_ratio = Gauge(
            "pdserve_prefix_cache_hit_ratio",
            "prompt tokens taken from a prefix cache / prompt tokens, since start",
            ["mode"],
            registry=self.registry,
        )
        self._tokens: dict[str, list[int]] = {}  # mode -> [prompt, cached]

    def observe_prompt(self, mode: str, num_prompt_tokens: int, num_cached_tokens: int) -> None:
        self.prompt_tokens.labels(mode).inc(num_prompt_tokens)
        self.cached_tokens.labels(mode).inc(num_cached_tokens)
        totals = self._tokens.setdefault(mode, [0, 0])
        totals[0] += num_prompt_tokens
        totals[1] += num_cached_tokens
        self.hit_ratio.labels(mode).set(totals[1] / max(totals[0], 1))

    def render(self) -> tuple[bytes, str]:
        return render_as_ingress(self.registry), CONTENT_TYPE_LATEST
