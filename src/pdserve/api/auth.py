"""API keys, tenants and per-key limits.

Clients send `Authorization: Bearer <key>` (as with OpenAI and vLLM's `--api-key`). The server keeps only each
key's SHA-256: a presented key is hashed, looked up, and compared with `hmac.compare_digest`, so neither a timing
difference nor a leaked config reveals a key. Each key belongs to a tenant; a tenant's requests share a private
prefix cache (the tenant goes into every block hash's salt, see `tenant_salt`) and its limits: a request rate
(token bucket) and a number of requests in flight, over every POST (generation, /tokenize, /detokenize), beyond
which requests get 429 with Retry-After.
Limits are per ingress replica (N replicas admit up to N times as much).

With keys configured every route but `/health` and `/ready` (liveness and readiness probes) needs one; without
keys the server is open, and everyone is the one anonymous tenant.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import time
from dataclasses import dataclass, field

from starlette.routing import get_route_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pdserve.api.errors import APIError, error_response

OPEN_PATHS = frozenset({"/health", "/ready"})
_TENANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def key_digest(key: str) -> str:
    """The SHA-256 of a key, hex: what configs and the server keep instead of the key."""
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Tenant:
    name: str
    requests_per_s: float | None = None  # sustained request rate; None: unlimited
    burst: int | None = None  # requests allowed at once above the rate (default: max(1, rate))
    max_concurrent: int | None = None  # POSTs in flight (generation, tokenization); None: unlimited

    def __post_init__(self) -> None:
        if not _TENANT_NAME.fullmatch(self.name):
            raise ValueError(f"tenant names are 1-64 of [A-Za-z0-9_.-], starting alphanumeric; got {self.name!r}")


def tenant_salt(tenant: str | None, client_salt: str | None) -> str | None:
    """The prefix-cache salt of a request: the tenant's, narrowed by the client's `cache_salt` if it sent one.
    A client can split its own tenant's cache further, never reach another's: the tenant part is the server's."""
    if tenant is None:  # no keys configured: one anonymous tenant
        return client_salt or None
    return f"tenant:{tenant}\x1f{client_salt or ''}"


class _Bucket:
    """A token bucket: `rate` requests per second, up to `burst` at once."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = float(burst)
        self.updated = time.monotonic()

    def take(self) -> float:
        """0 when a request may go now (one token spent), else the seconds until one may."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate

    def refund(self) -> None:
        """Give back the token of a request the server refused or failed before answering it."""
        self.tokens = min(self.burst, self.tokens + 1)


@dataclass
class _TenantState:
    tenant: Tenant
    bucket: _Bucket | None
    in_flight: int = 0


@dataclass
class APIKeys:
    """Key digests (hex SHA-256) -> tenants."""

    tenants_by_digest: dict[str, Tenant]
    # Tenants whose keys may read /metrics (cluster-wide counters: other tenants' traffic, cache hits); None: all
    metrics_tenants: frozenset[str] | None = None
    _states: dict[str, _TenantState] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for tenant in self.tenants_by_digest.values():
            if tenant.name not in self._states:
                bucket = None
                if tenant.requests_per_s is not None:
                    burst = tenant.burst or max(1, math.ceil(tenant.requests_per_s))
                    bucket = _Bucket(tenant.requests_per_s, burst)
                self._states[tenant.name] = _TenantState(tenant, bucket)

    def authenticate(self, authorization: str | None) -> Tenant | None:
        """The tenant of a `Bearer` key, None for a missing, malformed or unknown one."""
        if authorization is None:
            return None
        scheme, _, key = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return None
        digest = key_digest(key.strip())
        found = None
        for known, tenant in self.tenants_by_digest.items():  # every entry, constant-time each, no early exit
            if hmac.compare_digest(known, digest):
                found = tenant
        return found

    def admit(self, tenant: Tenant) -> float:
        """0 and one more in flight when `tenant` may start a request (a POST) now; else the seconds to wait."""
        state = self._states[tenant.name]
        limit = tenant.max_concurrent
        if limit is not None and state.in_flight >= limit:
            return 1.0
        if state.bucket is not None and (wait_s := state.bucket.take()) > 0:
            return wait_s
        state.in_flight += 1
        return 0.0

    def release(self, tenant: Tenant, refund: bool = False) -> None:
        """The end of a request `admit` let in; `refund`: the server refused or failed it before it was answered
        (busy: 429, 503; broken: 500), which must not cost the tenant its rate."""
        state = self._states[tenant.name]
        state.in_flight -= 1
        if refund and state.bucket is not None:
            state.bucket.refund()

    def in_flight(self, tenant_name: str) -> int:
        return self._states[tenant_name].in_flight


class APIKeyAuth:
    """401 without a valid key on every route but OPEN_PATHS; the tenant goes into the request's state
    (`request.state.tenant`); every POST (generation, and /tokenize and /detokenize, which share the generation
    requests' tokenizer thread) is held to the tenant's limits (429)."""

    def __init__(self, app: ASGIApp, keys: APIKeys) -> None:
        self.app, self.keys = app, keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The route's path: under a route prefix (Serve's `route_prefix`, uvicorn's --root-path) `path` keeps the
        # prefix and `root_path` names it; Starlette routes on what follows, and so must every check here.
        if scope["type"] != "http" or (path := get_route_path(scope)) in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        authorization = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value.decode("latin-1")
                break
        tenant = self.keys.authenticate(authorization)
        if tenant is None:
            error = APIError(401, "a valid API key is required (Authorization: Bearer <key>)", code="invalid_api_key")
            # Connection: close — else the server would go on reading (and dropping) whatever body the client sends
            headers = {"WWW-Authenticate": "Bearer", "Connection": "close"}
            await error_response(error, headers=headers)(scope, receive, send)
            return
        scope.setdefault("state", {})["tenant"] = tenant.name
        metrics_tenants = self.keys.metrics_tenants
        if path == "/metrics" and metrics_tenants is not None and tenant.name not in metrics_tenants:
            error = APIError(403, f"tenant {tenant.name} may not read /metrics", "permission_error", code="forbidden")
            await error_response(error, headers={"Connection": "close"})(scope, receive, send)
            return
        if scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        if (wait_s := self.keys.admit(tenant)) > 0:
            error = APIError(
                429, f"tenant {tenant.name} is over its request limit; retry later", "rate_limit_error",
                code="rate_limit_exceeded", retry_after_s=wait_s,
            )  # fmt: skip
            await error_response(error)(scope, receive, send)
            return
        status = 0

        async def observed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        failed = False
        try:
            await self.app(scope, receive, observed_send)
        except Exception:  # unhandled: UnhandledErrors, outside this middleware, answers it with a 500
            failed = True
            raise
        finally:  # a request the server was too busy for (or failed) before answering costs the tenant nothing
            self.keys.release(tenant, refund=failed or status == 429 or status >= 500)
