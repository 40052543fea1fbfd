"""The files users launch pdserve with, checked offline: every `ray up` YAML in cluster_configs/ passes Ray's own
validation and starts Ray with token auth and a loopback dashboard; every Serve config in deploy/ passes Serve's
schema and builds the intended deployments; and on every GPU cluster a prefill replica can only land on a prefill
node and a decode replica only on a decode node (asserted from the parsed files, the on-prem start commands run
in bash with `ray` and `ip` stubbed)."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER_CONFIGS = REPO / "cluster_configs"
DEPLOY = REPO / "deploy"
POOL_LABEL = "pdserve.io/pool"
PINNED_ROUTER = "pdserve.serve.routing.PinnedRequestRouter"


def load(path: Path) -> dict[str, Any]:
    with open(path) as f:
        data: dict[str, Any] = yaml.safe_load(f)
    return data


def serve_config(path: Path) -> dict[str, Any]:
    """The Serve config a deploy/ file carries (a RayService holds it as a string in spec.serveConfigV2)."""
    data = load(path)
    if data.get("kind") == "RayService":
        return dict(yaml.safe_load(data["spec"]["serveConfigV2"]))
    return data


def names(paths: list[Path]) -> list[str]:
    return sorted(p.name for p in paths)


def test_the_shipped_files() -> None:
    assert names(list(CLUSTER_CONFIGS.glob("*"))) == ["aws-gpu.yaml", "gcp-gpu.yaml", "local-cpu.yaml", "onprem.yaml"]
    assert names(list(DEPLOY.glob("*"))) == [
        "cpu-1p1d.yaml",
        "docker",
        "gpu-autoscale.yaml",
        "gpu-colocated.yaml",
        "gpu-npmd.yaml",
        "grafana",
        "kuberay-rayservice.yaml",
    ]


# ---- cluster_configs/: Ray's validation, token auth, dashboard ----


@pytest.mark.parametrize("path", sorted(CLUSTER_CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_cluster_config_passes_rays_validation(path: Path) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(load(path))
    validate_config(config)  # raises on any schema or consistency error
    assert config["head_node_type"] in config["available_node_types"]


def start_commands(config: dict[str, Any]) -> list[str]:
    return [c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"] if "ray start" in c]


@pytest.mark.parametrize("path", sorted(CLUSTER_CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_node_starts_with_token_auth_and_the_dashboard_on_loopback(path: Path) -> None:
    config = load(path)
    starts = start_commands(config)
    heads = [c for c in starts if "--head" in c]
    assert len(heads) == 1 and len(starts) == (1 if path.name == "local-cpu.yaml" else 2)
    assert all(c.count("RAY_AUTH_MODE=token ray start") == 1 for c in starts)
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"  # the same token on every node
    assert "--dashboard-host=127.0.0.1" in heads[0]
    every_command = json.dumps([config.get(k) for k in config if k.endswith("commands")])
    assert "0.0.0.0" not in every_command


@pytest.mark.parametrize("name", ["aws-gpu.yaml", "gcp-gpu.yaml", "onprem.yaml"])
def test_gpu_clusters_install_pdserve_from_a_wheel_on_every_node(name: str) -> None:
    config = load(CLUSTER_CONFIGS / name)
    assert config["file_mounts"]["~/pdserve-dist"] == "./dist"
    setup = "\n".join(config["setup_commands"])
    newest = '"$(ls -t ~/pdserve-dist/pdserve-*.whl | head -n 1)'
    assert f'~/pdserve-venv/bin/pip install -q {newest}[gpu]"' in setup
    # a wheel rebuilt at the same version replaces the installed one (pip keeps it otherwise: a rerun ran old code)
    assert f'~/pdserve-venv/bin/pip install -q --force-reinstall --no-deps {newest}"' in setup
    assert "echo 'export PATH=\"$HOME/pdserve-venv/bin:$PATH\"' >> ~/.bashrc" in setup  # `ray down` finds `ray`
    # pdserve needs Python 3.11+: an Ubuntu 22.04 image's python3 is 3.10, so its venv's Python comes from uv
    images = json.dumps(config["available_node_types"]) if "available_node_types" in config else ""
    if "ubuntu-2204" in images:
        assert "uv venv --python 3.11 --seed ~/pdserve-venv" in setup and "python3 -m venv" not in setup


# ---- nodes and their pools, as Ray would see them ----


@dataclass(frozen=True)
class Node:
    name: str  # node type (cloud, KubeRay group) or host address (on-prem)
    resources: dict[str, float]
    labels: dict[str, str]


_STUBS = (
    'ray() { if [ "$1" = start ]; then printf "%s\\n" "$@"; fi; }; '
    "ulimit() { :; }; "
    'ip() { echo "$RAY_HEAD_IP via 10.0.0.1 dev eth0 src $NODE_ADDRESS uid 0"; }; '
)


def ray_start_node(name: str, commands: list[str], env: dict[str, str]) -> Node:
    """Run a node's start commands in bash with `ray`, `ip` and `ulimit` stubbed; parse the `ray start` flags."""
    script = _STUBS + "; ".join(commands)
    out = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, check=True).stdout
    return node_from_args(name, out.splitlines())


def node_from_args(name: str, args: list[str]) -> Node:
    from ray._private.label_utils import parse_node_labels_string

    flags = dict(a.removeprefix("--").split("=", 1) for a in args if a.startswith("--") and "=" in a)
    resources = {k: float(v) for k, v in json.loads(flags.get("resources", "{}")).items()}
    resources["GPU"] = float(flags.get("num-gpus", 0))
    return Node(name, resources, parse_node_labels_string(flags.get("labels", "")))


def cloud_nodes(config: dict[str, Any]) -> list[Node]:
    types = config["available_node_types"]
    return [Node(n, {k: float(v) for k, v in t["resources"].items()}, t["labels"]) for n, t in types.items()]


def onprem_nodes(config: dict[str, Any]) -> list[Node]:
    provider = config["provider"]
    env = {"PATH": "/usr/bin:/bin", "RAY_HEAD_IP": provider["head_ip"]}
    head = ray_start_node(provider["head_ip"], config["head_start_ray_commands"], env)
    workers = [
        ray_start_node(ip, config["worker_start_ray_commands"], {**env, "NODE_ADDRESS": ip})
        for ip in provider["worker_ips"]
    ]
    return [head, *workers]


def kuberay_nodes(service: dict[str, Any]) -> list[Node]:
    cluster = service["spec"]["rayClusterConfig"]
    groups = [("head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in cluster["workerGroupSpecs"]]
    nodes = []
    for name, group in groups:
        params = dict(group["rayStartParams"])
        if "resources" in params:  # KubeRay's format: a JSON object inside a quoted string
            params["resources"] = params["resources"].strip('"').replace('\\"', '"')
        nodes.append(node_from_args(name, [f"--{k}={v}" for k, v in params.items()]))
    return nodes


def test_onprem_worker_outside_every_pool_refuses_to_start() -> None:
    config = load(CLUSTER_CONFIGS / "onprem.yaml")
    env = {"PATH": "/usr/bin:/bin", "RAY_HEAD_IP": "10.0.0.10", "NODE_ADDRESS": "10.0.9.99"}
    script = _STUBS + "; ".join(config["worker_start_ray_commands"])
    run = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True)
    assert (run.returncode, run.stdout) == (1, "")
    assert "pdserve: worker 10.0.9.99 is in no pool; add it to onprem.yaml" in run.stderr


def test_local_cpu_head_carries_both_pools() -> None:
    config = load(CLUSTER_CONFIGS / "local-cpu.yaml")
    nodes = onprem_nodes(config)
    assert nodes == [
        Node("127.0.0.1", {"prefill_pool": 2.0, "decode_pool": 2.0, "GPU": 0.0}, {POOL_LABEL: "prefill-decode"})
    ]
    assert config["provider"] == {"type": "local", "head_ip": "127.0.0.1", "worker_ips": []}


# ---- replicas and where they can land ----


@dataclass(frozen=True)
class Replica:
    resources: dict[str, float]  # what the scheduler must find free on one node (CPU aside: nodes detect theirs)
    label_selector: dict[str, str]


def replica(pool: dict[str, Any]) -> Replica:
    options = pool["ray_actor_options"]
    resources = {"GPU": float(options.get("num_gpus", 0)), **options.get("resources", {})}
    return Replica({k: v for k, v in resources.items() if v > 0}, options.get("label_selector", {}))


def fits(r: Replica, node: Node, use_labels: bool = True) -> bool:
    has_resources = all(node.resources.get(k, 0) >= v for k, v in r.resources.items())
    return has_resources and (not use_labels or all(node.labels.get(k) == v for k, v in r.label_selector.items()))


def landing(r: Replica, nodes: list[Node], use_labels: bool = True) -> list[str]:
    return [n.name for n in nodes if fits(r, n, use_labels)]


GPU_CLUSTERS = {
    "aws-gpu.yaml": (["prefill.h100"], ["decode.h200"], ["ray.head.cpu"]),
    "gcp-gpu.yaml": (["prefill_h100"], ["decode_h200"], ["ray_head_cpu"]),
    "onprem.yaml": (["10.0.1.11", "10.0.1.12"], ["10.0.2.21", "10.0.2.22"], ["10.0.0.10"]),
}


def gpu_cluster_nodes(name: str) -> list[Node]:
    config = load(CLUSTER_CONFIGS / name)
    return onprem_nodes(config) if config["provider"]["type"] == "local" else cloud_nodes(config)


def gpu_args(path: Path) -> dict[str, Any]:
    (app,) = serve_config(path)["applications"]
    return dict(app["args"])


@pytest.mark.parametrize("cluster", sorted(GPU_CLUSTERS))
def test_prefill_and_decode_replicas_can_only_land_on_their_own_pool(cluster: str) -> None:
    nodes = gpu_cluster_nodes(cluster)
    prefill_nodes, decode_nodes, head_nodes = GPU_CLUSTERS[cluster]
    assert sorted(n.name for n in nodes) == sorted(prefill_nodes + decode_nodes + head_nodes)
    args = gpu_args(DEPLOY / "gpu-npmd.yaml")
    prefill, decode, ingress = replica(args["prefill"]), replica(args["decode"]), replica(args["ingress"])
    assert prefill == Replica({"GPU": 1.0, "prefill_pool": 1}, {POOL_LABEL: "prefill"})
    assert decode == Replica({"GPU": 1.0, "decode_pool": 1}, {POOL_LABEL: "decode"})
    for use_labels in (True, False):  # the pool resources alone already keep the pools apart
        assert landing(prefill, nodes, use_labels) == prefill_nodes
        assert landing(decode, nodes, use_labels) == decode_nodes
    assert landing(ingress, nodes) == head_nodes


@pytest.mark.parametrize("cluster", sorted(GPU_CLUSTERS))
def test_pool_nodes_offer_one_pool_unit_per_gpu_and_the_head_none(cluster: str) -> None:
    for node in gpu_cluster_nodes(cluster):
        pool = node.labels[POOL_LABEL]
        pools = {k: v for k, v in node.resources.items() if k.endswith("_pool")}
        if pool == "head":
            assert (pools, node.resources["GPU"]) == ({}, 0.0)
        else:
            assert pools == {f"{pool}_pool": 8.0} and node.resources["GPU"] == 8.0, node


def test_kuberay_groups_keep_the_pools_apart_and_serve_the_gpu_config() -> None:
    service = load(DEPLOY / "kuberay-rayservice.yaml")
    nodes = kuberay_nodes(service)
    args = gpu_args(DEPLOY / "kuberay-rayservice.yaml")
    assert args == gpu_args(DEPLOY / "gpu-npmd.yaml")  # one source of truth for the GPU app, twice written
    assert landing(replica(args["prefill"]), nodes, use_labels=False) == ["prefill-h100"]
    assert landing(replica(args["decode"]), nodes, use_labels=False) == ["decode-h200"]
    assert landing(replica(args["ingress"]), nodes) == ["head"]
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["authOptions"] == {"mode": "token"} and cluster["rayVersion"] == "2.60.0"
    for group in cluster["workerGroupSpecs"]:
        (container,) = group["template"]["spec"]["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 8 == int(group["rayStartParams"]["num-gpus"])


# ---- deploy/: Serve's schema, import paths, the built deployments ----


@pytest.mark.parametrize("path", sorted(DEPLOY.glob("*.yaml")), ids=lambda p: p.name)
def test_deploy_file_passes_serves_schema_and_its_import_paths_resolve(path: Path) -> None:
    from ray._common.utils import import_attr
    from ray.serve.schema import ServeDeploySchema

    from pdserve.serve.app import app_builder
    from pdserve.serve.config import ServeConfig

    schema = ServeDeploySchema.model_validate(serve_config(path))
    for app in schema.applications:
        assert import_attr(app.import_path) is app_builder
        assert app.deployments == []  # pools are configured in args only: no per-deployment overrides
        ServeConfig.model_validate(app.args)
    if schema.tracing_config is not None and schema.tracing_config.exporter_import_path:
        assert callable(import_attr(schema.tracing_config.exporter_import_path))


CPU = {"num_cpus": 0}
GPU = {"num_cpus": 8, "num_gpus": 1}
GPU_PREFILL = {**GPU, "resources": {"prefill_pool": 1}, "label_selector": {POOL_LABEL: "prefill"}}
GPU_DECODE = {**GPU, "resources": {"decode_pool": 1}, "label_selector": {POOL_LABEL: "decode"}}
GPU_INGRESS = {"num_cpus": 4, "label_selector": {POOL_LABEL: "head"}}
NPMD = {"PrefillServer": (8, GPU_PREFILL), "DecodeServer": (8, GPU_DECODE), "Ingress": (2, GPU_INGRESS)}
DEPLOYMENTS = {
    "cpu-1p1d.yaml": {
        "PrefillServer": (1, {**CPU, "resources": {"prefill_pool": 1}}),
        "DecodeServer": (1, {**CPU, "resources": {"decode_pool": 1}}),
        "Ingress": (1, CPU),
    },
    "gpu-npmd.yaml": NPMD,
    "kuberay-rayservice.yaml": NPMD,
    "gpu-colocated.yaml": {"EngineServer": (16, GPU), "Ingress": (2, GPU_INGRESS)},
}


@pytest.mark.slow  # builds the app: materializes SmolLM2 (float32 and bfloat16) once
@pytest.mark.parametrize("name", sorted(DEPLOYMENTS))
def test_deploy_file_builds_the_intended_deployments(name: str) -> None:
    from ray._common.utils import import_attr
    from ray.serve._private.build_app import build_app

    (app,) = serve_config(DEPLOY / name)["applications"]
    built = build_app(import_attr(app["import_path"])(app["args"]), name=app["name"], make_deployment_handle=_no_handle)
    assert built.ingress_deployment_name == "Ingress"
    got = {d.name: (d.num_replicas, d.ray_actor_options) for d in built.deployments}
    assert got == DEPLOYMENTS[name]
    for d in built.deployments:
        router = d._deployment_config.request_router_config.request_router_class
        assert import_attr(router) is not None  # `serve deploy` and every ingress replica import it
        # engine calls are pinned (disaggregated) or route around failed replicas (every pool)
        assert (router == PINNED_ROUTER) == (d.name in ("PrefillServer", "DecodeServer", "EngineServer"))


def _no_handle(deployment: Any, app_name: str) -> None:
    return None


# ---- deploy/gpu-autoscale.yaml: the planner's bounds, its policy, and room for them in the clusters ----


def test_autoscale_file_names_the_planner_with_the_settings_of_its_args() -> None:
    from ray._common.utils import import_attr

    from pdserve.serve.autoscaling import PoolPlanner
    from pdserve.serve.config import ServeConfig

    (app,) = serve_config(DEPLOY / "gpu-autoscale.yaml")["applications"]
    config = ServeConfig.model_validate(app["args"])
    assert config.autoscaling.enabled and not config.colocated
    policy = app["autoscaling_policy"]
    assert import_attr(policy["policy_function"].replace(":", ".")) is PoolPlanner
    # the policy's kwargs are what `pdserve serve` passes for these args (it had only the SLO settings: the planner
    # assumed 64 sequences per decode replica where the engines take 256): one cannot drift from the other
    assert policy["policy_kwargs"] == config.planner_kwargs()
    planner = PoolPlanner(**policy["policy_kwargs"]).planner.config
    assert (planner.ttft_slo_s, planner.tpot_slo_s) == (config.autoscaling.ttft_slo_s, config.autoscaling.tpot_slo_s)


@pytest.mark.parametrize("cluster", ["aws-gpu.yaml", "gcp-gpu.yaml"])
def test_each_pools_max_replicas_fit_its_node_types_max_workers(cluster: str) -> None:
    """A pool's max_replicas (one GPU each) must fit the GPUs the Ray autoscaler may bring up for it, and its
    min_replicas those of the pool's always-on nodes (min_workers): the planner never asks for what cannot come."""
    args = gpu_args(DEPLOY / "gpu-autoscale.yaml")
    types = load(CLUSTER_CONFIGS / cluster)["available_node_types"]
    for pool in ("prefill", "decode"):
        node_types = [t for t in types.values() if t.get("labels", {}).get(POOL_LABEL) == pool]
        most = sum(t["max_workers"] * t["resources"]["GPU"] for t in node_types)
        least = sum(t["min_workers"] * t["resources"]["GPU"] for t in node_types)
        assert args[pool]["min_replicas"] <= least and args[pool]["max_replicas"] <= most, (pool, least, most)


@pytest.mark.slow  # builds the app: materializes SmolLM2 once
def test_autoscale_file_builds_autoscaled_pools() -> None:
    from ray._common.utils import import_attr
    from ray.serve._private.build_app import build_app

    (app,) = serve_config(DEPLOY / "gpu-autoscale.yaml")["applications"]
    built = build_app(import_attr(app["import_path"])(app["args"]), name=app["name"], make_deployment_handle=_no_handle)
    got = {d.name: d for d in built.deployments}
    for name, pool in (("PrefillServer", "prefill"), ("DecodeServer", "decode")):
        scaling = got[name]._deployment_config.autoscaling_config
        bounds = app["args"][pool]
        assert (scaling.min_replicas, scaling.initial_replicas, scaling.max_replicas) == (
            bounds["min_replicas"], bounds["num_replicas"], bounds["max_replicas"],
        )  # fmt: skip
        assert got[name].ray_actor_options == (GPU_PREFILL if pool == "prefill" else GPU_DECODE)
    assert got["Ingress"]._deployment_config.autoscaling_config is None
