"""`build_app(config)`: the Serve application for a validated `ServeConfig`."""

from __future__ import annotations

import logging
from typing import Any

from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.deployment import Application

from pdserve.serve.cluster_store import publish_tracing_secrets
from pdserve.serve.config import PoolConfig, ServeConfig
from pdserve.serve.ingress import Ingress
from pdserve.serve.replicas import DecodeServer, EngineServer, PrefillServer

_PINNED_ROUTER = "pdserve.serve.routing.PinnedRequestRouter"  # an import path: `serve deploy` resolves it too
_PLANNER = "pdserve.serve.autoscaling:PoolPlanner"
logger = logging.getLogger(__name__)


def build_app(config: ServeConfig, model_path: str | None = None, deploy_config: bool = False) -> Application:
    """Prefill + decode pools behind an ingress, or one colocated engine pool when `config.colocated`.
    `device` "auto" is resolved here, once, from the GPUs of the Ray cluster (or of this machine without one), so
    that every replica sees "cuda" or "cpu". `model_path`: the model's directory when the caller resolved it
    already; replicas on a node without it resolve `config.model` again there (`ServeConfig.model_dir`).
    `deploy_config`: built from a deploy config's entry (`app_builder`), where the planner can be the policy."""
    config = config.with_device(cluster_gpus())
    if config.autoscaling.enabled and not config.colocated and not deploy_config:
        logger.warning(
            "autoscaling.enabled: Serve takes the planner as an application's policy only from a deploy config "
            "(`pdserve serve`, or `deploy_application` in a `serve deploy` file); an application built here and "
            "run with serve.run is sized by Serve's default policy instead (docs/AUTOSCALING.md)"
        )
    # the exporters' headers reach the replicas outside the config (serve/cluster_store.py)
    publish_tracing_secrets(config.tracing_env)
    model_path = model_path or config.resolve_model_path()
    ingress = _deployment(Ingress, "Ingress", config.ingress, config)
    if config.colocated:
        engine = _deployment(EngineServer, "EngineServer", config.engine, config, is_engine=True, pinned=True)
        return ingress.bind(config, model_path, engine=engine.bind(config, model_path))
    scaled = config.autoscaling.enabled
    prefill = _deployment(
        PrefillServer, "PrefillServer", config.prefill, config, is_engine=True, pinned=True, autoscaled=scaled
    )
    decode = _deployment(
        DecodeServer, "DecodeServer", config.decode, config, is_engine=True, pinned=True, autoscaled=scaled
    )
    return ingress.bind(
        config, model_path, prefill=prefill.bind(config, model_path), decode=decode.bind(config, model_path)
    )


def app_builder(args: dict[str, Any]) -> Application:
    """Entry for `serve run` / `serve deploy` configs: `import_path: pdserve.serve.app:app_builder`, args = a
    ServeConfig as a mapping."""
    return build_app(ServeConfig.model_validate(args), deploy_config=True)


def deploy_application(config: ServeConfig, name: str = "pdserve", route_prefix: str = "/") -> dict[str, Any]:
    """The application entry of a `serve deploy` config for `config` (what `pdserve serve` deploys): the builder
    and its args, and with autoscaling the planner as the application's policy (`serve/autoscaling.py`), which
    Serve only takes from a deploy config."""
    app: dict[str, Any] = {
        "name": name,
        "route_prefix": route_prefix,
        "import_path": "pdserve.serve.app:app_builder",
        "args": config.model_dump(mode="json"),
    }
    if config.autoscaling.enabled:
        app["autoscaling_policy"] = {"policy_function": _PLANNER, "policy_kwargs": config.planner_kwargs()}
    return app


def cluster_gpus() -> float:
    """GPUs of the Ray cluster this process is connected to; without a connection, whether this machine has CUDA."""
    import ray

    if ray.is_initialized():
        return float(ray.cluster_resources().get("GPU", 0))
    import torch

    return float(torch.cuda.device_count())


def actor_options(pool: PoolConfig, device: str, is_engine: bool) -> dict[str, Any]:
    """A replica's Ray actor options: the pool's, plus one GPU per engine replica on CUDA unless the pool says how
    many (Ray then puts every engine replica, prefill and decode alike, on a GPU of its own)."""
    if is_engine and device == "cuda" and "num_gpus" not in pool.ray_actor_options:
        return {**pool.ray_actor_options, "num_gpus": 1}
    return pool.ray_actor_options


def autoscaling_options(pool: PoolConfig, config: ServeConfig) -> dict[str, Any]:
    """Serve's `autoscaling_config` for a pool the planner sizes: its bounds, the report interval, and no delays or
    smoothing of Serve's own (the planner has its cool-downs and hysteresis: Serve's would stack on them)."""
    interval = config.autoscaling.interval_s
    return {
        "min_replicas": pool.min_replicas,
        "max_replicas": pool.max_replicas,
        "initial_replicas": pool.num_replicas,
        "metrics_interval_s": interval,
        "look_back_period_s": 5 * interval,  # replicas record a report every look_back * 0.2 = interval
        "upscale_delay_s": 0.0,
        "downscale_delay_s": 0.0,
    }


def _deployment(
    cls: type,
    name: str,
    pool: PoolConfig,
    config: ServeConfig,
    is_engine: bool = False,
    pinned: bool = False,
    autoscaled: bool = False,
) -> Any:
    options: dict[str, Any] = {
        "name": name,
        "ray_actor_options": actor_options(pool, config.device, is_engine),
        "max_ongoing_requests": pool.max_ongoing_requests,
        "health_check_period_s": config.health_check_period_s,
        "health_check_timeout_s": config.health_check_timeout_s,
        "graceful_shutdown_timeout_s": config.drain_grace_s,
    }
    if autoscaled:
        options["autoscaling_config"] = autoscaling_options(pool, config)
    else:
        options["num_replicas"] = pool.num_replicas
    if pinned:
        options["request_router_config"] = RequestRouterConfig(request_router_class=_PINNED_ROUTER)  # type: ignore[arg-type]
    deployment: Any = serve.deployment(cls)
    return deployment.options(**options)
