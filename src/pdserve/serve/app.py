"""`build_app(config)`: the Serve application for a validated `ServeConfig`."""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.deployment import Application

from pdserve.hub import resolve_model
from pdserve.serve.config import PoolConfig, ServeConfig
from pdserve.serve.ingress import Ingress
from pdserve.serve.replicas import DecodeServer, EngineServer, PrefillServer

_PINNED_ROUTER = "pdserve.serve.routing.PinnedRequestRouter"  # an import path: `serve deploy` resolves it too


def build_app(config: ServeConfig) -> Application:
    """Prefill + decode pools behind an ingress, or one colocated engine pool when `config.colocated`."""
    model_path = str(resolve_model(config.model, _checkpoint_dtype(config.dtype)))
    ingress = _deployment(Ingress, "Ingress", config.ingress, config)
    if config.colocated:
        engine = _deployment(EngineServer, "EngineServer", config.engine, config).bind(config, model_path)
        return ingress.bind(config, model_path, engine=engine)
    prefill = _deployment(PrefillServer, "PrefillServer", config.prefill, config, pinned=True).bind(config, model_path)
    decode = _deployment(DecodeServer, "DecodeServer", config.decode, config, pinned=True).bind(config, model_path)
    return ingress.bind(config, model_path, prefill=prefill, decode=decode)


def app_builder(args: dict[str, Any]) -> Application:
    """Entry for `serve run` / `serve deploy` configs: `import_path: pdserve.serve.app:app_builder`, args = a
    ServeConfig as a mapping."""
    return build_app(ServeConfig.model_validate(args))


def _deployment(cls: type, name: str, pool: PoolConfig, config: ServeConfig, pinned: bool = False) -> Any:
    options: dict[str, Any] = {
        "name": name,
        "num_replicas": pool.num_replicas,
        "ray_actor_options": pool.ray_actor_options,
        "max_ongoing_requests": pool.max_ongoing_requests,
        "health_check_period_s": config.health_check_period_s,
        "health_check_timeout_s": config.health_check_timeout_s,
        "graceful_shutdown_timeout_s": config.drain_grace_s,
    }
    if pinned:
        options["request_router_config"] = RequestRouterConfig(request_router_class=_PINNED_ROUTER)  # type: ignore[arg-type]
    deployment: Any = serve.deployment(cls)
    return deployment.options(**options)


def _checkpoint_dtype(dtype: str) -> str:
    """Which SmolLM2 conversion to materialize: bf16 weights when serving bf16, else fp32."""
    return "bfloat16" if dtype == "bfloat16" else "float32"
