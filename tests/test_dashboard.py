"""The operations files in deploy/, checked offline against pdserve itself: every metric the Grafana dashboard
queries is one pdserve's /metrics renders (the ingress's registry and the HTTP layer's, built in-process and fed a
fake replica snapshot and one observation of each kind), replica series are de-duplicated across ingress replicas,
every panel queries the provisioned datasource, and the compose stack builds from and mounts files that exist."""

from __future__ import annotations

import http.server
import json
import re
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from pdserve.api.metrics import INGRESS_LABEL, APIMetrics, ingress_id
from pdserve.cli import build_parser, serve_config
from pdserve.router import CostConfig, Router
from pdserve.router.admission import Admission
from pdserve.serve.ingress_router import RouterCollector
from pdserve.serve.messages import ReplicaStats
from pdserve.serve.metrics import IngressMetrics, ReplicaStatsCollector

REPO = Path(__file__).resolve().parents[1]
GRAFANA = REPO / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "pdserve.json"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yaml"
DASHBOARD_PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "pdserve.yaml"
DOCKER = REPO / "deploy" / "docker"
COMPOSE = DOCKER / "compose.yaml"

# PromQL words that are not metric names (functions are recognised by the "(" after them).
_PROMQL_WORDS = frozenset(
    {"sum", "min", "max", "avg", "count", "group", "stddev", "stdvar", "topk", "bottomk", "quantile", "count_values",
     "limitk", "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset"}
)  # fmt: skip
_SAMPLE_SUFFIXES = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "summary": ["_sum", "_count"]}


def load_yaml(path: Path) -> dict[str, Any]:
    with open(path) as f:
        data: dict[str, Any] = yaml.safe_load(f)
    return data


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects."""
    expr = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)  # string literals (label values, regexes)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", expr)  # label matchers, range durations
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)  # label lists
    names = set()
    for match in re.finditer(r"(?<![\w:.])[A-Za-z_:][\w:]*", expr):
        is_call = expr[match.end() :].lstrip().startswith("(")
        if not is_call and match.group() not in _PROMQL_WORDS:
            names.add(match.group())
    return names


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, rows' nested panels included, rows themselves excluded."""
    found = []
    for panel in dashboard.get("panels", []):
        found.extend(panels(panel) if panel["type"] == "row" else [panel])
    return found


def exprs(dashboard: dict[str, Any]) -> list[str]:
    return [target["expr"] for panel in panels(dashboard) for target in panel["targets"]]


def replica_snapshot() -> list[ReplicaStats]:
    return [
        ReplicaStats("p0", "prefill", 64, 8, 4, 1, 2, 0, 16, 4096, 2, 0.01),
        ReplicaStats("d0", "decode", 64, 16, 4, 3, 0, 1, 32, 0, 0, 0.0, num_reserved_blocks=2),
    ]


def render_once() -> str:
    """pdserve's /metrics text (the ingress's exposition, then the HTTP layer's) after one observation of each
    kind, so that every labelled family has samples."""
    router = SimpleNamespace(router=Router(CostConfig()))  # the part of IngressRouter that RouterCollector reads
    ingress = IngressMetrics(RouterCollector(router, Admission(1000)))  # type: ignore[arg-type]
    ingress.replicas.snapshot = replica_snapshot()
    ingress.ttft.labels("disaggregated").observe(0.2)
    ingress.tpot.labels("disaggregated").observe(0.02)
    ingress.queue.labels("disaggregated").observe(0.01)
    ingress.requests.labels("disaggregated", "stop").inc()
    ingress.observe_prompt("disaggregated", 100, 32)
    api = APIMetrics()
    api.observe("POST", "/v1/completions", 200, 0.5, [])
    api.observe("POST", "/v1/completions", 400, 0.01, ["context_length_exceeded"])
    body, _ = ingress.render()
    return (body + api.render()).decode()


@pytest.fixture(scope="module")
def exposed() -> set[str]:
    """Every sample name /metrics can show: the rendered samples, plus each family's names by type (a family with
    no samples yet, such as the router's decisions before the first route, still names them)."""
    names = set()
    for family in text_string_to_metric_families(render_once()):
        names.update(family.name + suffix for suffix in _SAMPLE_SUFFIXES.get(family.type, [""]))
        names.update(sample.name for sample in family.samples)
    return names


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    with open(DASHBOARD) as f:
        data: dict[str, Any] = json.load(f)
    return data


# ---- the dashboard's queries against what pdserve renders ----


def test_metric_names_are_parsed_from_promql() -> None:
    expr = (
        'histogram_quantile(0.9, sum by (le, mode) (rate(pdserve_a_bucket{route=~"/v1/(x|y)"}[$__rate_interval])))'
        " / on() group_left sum without (ingress) (pdserve_b) * 1e9 + max(max by (replica, role) (pdserve_c))"
    )
    assert metric_names(expr) == {"pdserve_a_bucket", "pdserve_b", "pdserve_c"}


def test_every_dashboard_metric_is_rendered_by_pdserve(dashboard: dict[str, Any], exposed: set[str]) -> None:
    used = {name for expr in exprs(dashboard) for name in metric_names(expr)}
    assert len(used) >= 15, used  # the parser found the queries' metrics, not nothing
    assert used - exposed == set()


def test_a_misspelled_metric_fails_the_check(exposed: set[str]) -> None:
    assert metric_names("rate(pdserve_time_to_first_token_second_bucket[5m])") - exposed
    assert metric_names("pdserve_requests_running") - exposed  # a name from before the vLLM-style renames


def test_every_series_carries_the_ingress_label() -> None:
    families = list(text_string_to_metric_families(render_once()))
    samples = [s for family in families for s in family.samples]
    assert samples and all(s.labels[INGRESS_LABEL] == ingress_id() for s in samples)


def test_replica_series_are_deduplicated_across_ingress_replicas(dashboard: dict[str, Any]) -> None:
    """Each ingress renders its own copy of every replica's series: a query must take one copy (max by replica,
    role) before it adds replicas up, or N ingress replicas would count every replica N times."""
    collector = ReplicaStatsCollector()
    collector.snapshot = replica_snapshot()
    replica_metrics = {s.name for family in collector.collect() for s in family.samples}
    for expr in exprs(dashboard):
        for name in metric_names(expr) & replica_metrics:
            num_uses = len(re.findall(rf"\b{name}\b", expr))
            assert len(re.findall(rf"max by \(replica, role\) \((?:rate\()?{name}\b", expr)) == num_uses, expr


def test_replica_gauges_follow_the_snapshot() -> None:
    collector = ReplicaStatsCollector()
    collector.update(replica_snapshot(), taken_at=1234.5)
    samples = [s for family in collector.collect() for s in family.samples]
    values = {(s.name, s.labels["role"]): s.value for s in samples if "role" in s.labels}
    # the snapshot's own age: when its stats were asked for
    assert [s.value for s in samples if s.name == "pdserve_replica_stats_timestamp_seconds"] == [1234.5]
    assert values[("pdserve_kv_cache_usage_perc", "decode")] == 16 / 64
    assert values[("pdserve_num_requests_running", "decode")] == 3
    assert values[("pdserve_num_requests_waiting", "prefill")] == 2
    assert values[("pdserve_prefix_cache_hits_total", "decode")] == 32


# ---- the dashboard against the provisioning files ----


def test_every_panel_queries_the_provisioned_datasource(dashboard: dict[str, Any]) -> None:
    (source,) = load_yaml(DATASOURCES)["datasources"]
    expected = {"type": source["type"], "uid": source["uid"]}
    assert panels(dashboard)
    for panel in panels(dashboard):
        assert panel["datasource"] == expected, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == expected and target["expr"], panel["title"]


def test_panels_have_unique_ids(dashboard: dict[str, Any]) -> None:
    rows = [panel for panel in dashboard["panels"] if panel["type"] == "row"]
    ids = [panel["id"] for panel in rows + panels(dashboard)]
    assert len(ids) == len(set(ids))


# ---- the compose stack ----


def compose_services() -> dict[str, Any]:
    services: dict[str, Any] = load_yaml(COMPOSE)["services"]
    return services


def test_compose_builds_from_and_mounts_files_that_exist() -> None:
    compose = load_yaml(COMPOSE)
    build = compose["services"]["pdserve"]["build"]
    context = (COMPOSE.parent / build["context"]).resolve()
    assert (context / build["dockerfile"]).is_file() and (context / "pyproject.toml").is_file()
    num_bind_mounts = 0
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                num_bind_mounts += 1
                assert (COMPOSE.parent / source).exists(), f"{name} mounts {source}, which is not in the repo"
            else:
                assert source in compose["volumes"], f"{name} mounts an undeclared volume {source}"
    assert num_bind_mounts >= 3


def test_compose_wires_prometheus_grafana_and_jaeger_to_pdserve() -> None:
    services = compose_services()
    mounts = {v.split(":")[1]: v.split(":")[0] for s in services.values() for v in s.get("volumes", [])}
    # Grafana loads its dashboards from where compose mounts deploy/grafana/dashboards.
    (provider,) = load_yaml(DASHBOARD_PROVIDERS)["providers"]
    assert (COMPOSE.parent / mounts[provider["options"]["path"]]).resolve() == DASHBOARD.parent
    # The datasource is the prometheus service, which scrapes the pdserve service's published port.
    (source,) = load_yaml(DATASOURCES)["datasources"]
    assert source["url"] == "http://prometheus:9090"
    prometheus = load_yaml(COMPOSE.parent / mounts["/etc/prometheus/prometheus.yml"])
    (job,) = prometheus["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["pdserve:8000"] and "8000:8000" in services["pdserve"]["ports"]
    # Traces go to the jaeger service over OTLP/HTTP.
    assert services["pdserve"]["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4318"
    assert "jaeger" in services


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfiles(name: str) -> None:
    text = (DOCKER / name).read_text()
    assert 'ENTRYPOINT ["pdserve", "serve"]' in text and "EXPOSE 8000" in text
    assert re.search(r"^USER pdserve$", text, re.M) and "useradd" in text
    # Listening on every interface is a variable the image sets, not a CMD that arguments after the image replace
    # (`docker run pdserve:cpu --colocated` served on the container's loopback, the published port dead)
    assert re.search(r"^ENV PDSERVE_HOST=0\.0\.0\.0$", text, re.M) and not re.search(r"^CMD ", text, re.M)
    assert serve_config(build_parser()[0].parse_args(["serve"]), {"PDSERVE_HOST": "0.0.0.0"}).host == "0.0.0.0"
    # The health check's command, run here: it reaches /health on PDSERVE_PORT (default 8000), and fails without it.
    health = json.loads(re.search(r"^HEALTHCHECK .*\n\s+CMD (\[.*\])$", text, re.M).group(1))  # type: ignore[union-attr]
    assert health[:2] == ["python", "-c"]

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        port = str(server.server_address[1])
        check = [sys.executable, "-c", health[2]]
        assert subprocess.run(check, env={"PDSERVE_PORT": port}, capture_output=True, timeout=30).returncode == 0
        server.shutdown()
    assert subprocess.run(check, env={"PDSERVE_PORT": port}, capture_output=True, timeout=30).returncode != 0
    assert "pip install torch==2.13.0 --index-url" in text
    installed = re.findall(r'pip install "?\.\[(\w+)\]', text)
    assert installed == (["gpu"] if name.endswith("cuda") else [])
    pyproject = (REPO / "pyproject.toml").read_text()
    assert all(re.search(rf"^{extra} = \[", pyproject, re.M) for extra in installed)  # an extra pyproject has
