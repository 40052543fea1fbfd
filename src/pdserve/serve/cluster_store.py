"""Values every pdserve process of a Ray cluster reads from Ray's internal KV store, never from a deployment's
config: Serve shows configs (and an application's args) in its dashboard and status, and these are secrets. The
store is readable only by members of the cluster (Ray's token authentication guards it)."""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Mapping

from pdserve.telemetry import tracing_secrets
from pdserve.transfer import wire

_NAMESPACE = "pdserve"
_KV_SECRET_KEY = "kv-handshake-secret"
_TRACING_SECRETS_KEY = "tracing-secret-env"


def shared_kv_secret() -> bytes:
    """The secret every replica of this Ray cluster proves in KV handshakes (transfer/wire.py): PDSERVE_KV_SECRET
    if set, else one random secret the first replica stores and every other replica reads."""
    if env := wire.configured_secret():
        return env
    from ray.experimental import internal_kv

    internal_kv._internal_kv_put(_KV_SECRET_KEY, secrets.token_hex(32), overwrite=False, namespace=_NAMESPACE)
    secret = internal_kv._internal_kv_get(_KV_SECRET_KEY, namespace=_NAMESPACE)
    assert secret, "Ray's internal KV store lost the KV secret"
    return bytes(secret)


def publish_tracing_secrets(carried: Mapping[str, str], environ: Mapping[str, str] = os.environ) -> None:
    """Store the building process's exporter headers (`tracing_secrets`) for every replica, when it has any (a
    builder running on the cluster without them keeps what a driver stored), with the endpoints of the tracing
    variables the replicas carry (`carried`: the config's `tracing_env`) they are for. Without a Ray connection
    yet, nothing: the cluster `serve.run` then starts here inherits this process's environment."""
    from ray.experimental import internal_kv

    found = tracing_secrets(environ)
    if not found or not internal_kv._internal_kv_initialized():
        return
    stored = {"endpoints": _endpoints(carried), "headers": found}
    internal_kv._internal_kv_put(_TRACING_SECRETS_KEY, json.dumps(stored), overwrite=True, namespace=_NAMESPACE)


def replica_tracing_env(carried: Mapping[str, str]) -> dict[str, str]:
    """What a serving process applies before `configure_tracing`: the config's variables, then the stored headers
    if they were stored for the endpoints it exports to (a later deploy to another collector must not send it the
    first one's credentials; found in review). None outside a Ray cluster: a replica built in a plain process, as
    tests do, has its own environment."""
    from ray.experimental import internal_kv

    if not internal_kv._internal_kv_initialized():
        return dict(carried)
    raw = internal_kv._internal_kv_get(_TRACING_SECRETS_KEY, namespace=_NAMESPACE)
    stored = json.loads(raw) if raw else {}
    if stored.get("endpoints") != _endpoints(carried):
        return dict(carried)
    return {**carried, **stored.get("headers", {})}


def _endpoints(environ: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in environ.items() if k.startswith("OTEL_EXPORTER_OTLP_") and k.endswith("ENDPOINT")}
