"""API keys, tenants and per-key limits over real HTTP (uvicorn) and the fake backend of test_api: every route
but the probes needs a key (enumerated from the app, not listed by hand), the official client authenticates, limits
answer 429 with Retry-After and count back to zero, and a tenant's prefix-cache salt is the server's."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from fastapi.routing import APIRoute

from pdserve.api import create_app
from pdserve.api.auth import OPEN_PATHS, APIKeys, Tenant, key_digest, tenant_salt
from pdserve.api.backend import CapacityError, ServerError
from pdserve.api.intake import RequestLimits, Tokenization
from test_api import FakeBackend, serve, wait_until

KEY_A, KEY_B, KEY_SLOW = "sk-tenant-a-0123456789", "sk-tenant-b-9876543210", "sk-slow-5555"


def keys() -> APIKeys:
    return APIKeys(
        {
            key_digest(KEY_A): Tenant("team-a"),
            key_digest(KEY_B): Tenant("team-b", requests_per_s=0.5, burst=2),
            key_digest(KEY_SLOW): Tenant("slow", max_concurrent=1),
        }
    )


@pytest.fixture(scope="module")
def secured(tokenizer: Any) -> Iterator[tuple[str, FakeBackend, Any]]:
    backend = FakeBackend(tokenizer)
    app = create_app(backend, api_keys=keys())
    with serve(app) as url:
        yield url, backend, app


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from tiny_models import build_tokenizer

    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def api_routes(routes: list[Any]) -> list[APIRoute]:
    """Every APIRoute of an app, through included routers (FastAPI wraps them)."""
    found: list[APIRoute] = []
    for route in routes:
        if isinstance(route, APIRoute):
            found.append(route)
        elif (inner := getattr(route, "original_router", None) or getattr(route, "router", None)) is not None:
            found += api_routes(list(inner.routes))
    return found


def _concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "x", path)


# What each generation route would serve: a refused key must be what stops it, not the body.
VALID_BODIES = {  # the routes that reach the backend
    "/v1/completions": {"model": "fake-model", "prompt": "hi", "max_tokens": 2},
    "/v1/chat/completions": {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
}


def test_every_route_but_the_probes_needs_a_key(secured: tuple[str, FakeBackend, Any]) -> None:
    url, backend, app = secured
    backend.reset()
    routes = [(r.path, sorted(r.methods)) for r in api_routes(app.routes)]
    assert len(routes) >= 7 and VALID_BODIES.keys() <= {path for path, _ in routes}
    served = []
    with httpx.Client(base_url=url, timeout=5) as http:
        for path, methods in routes:
            for method in methods:
                body = VALID_BODIES.get(path, {}) if method == "POST" else {}
                no_key = http.request(method, _concrete(path), json=body)
                wrong = http.request(method, _concrete(path), json=body, headers={"Authorization": "Bearer sk-wrong"})
                basic = http.request(method, _concrete(path), json=body, headers={"Authorization": f"Basic {KEY_A}"})
                good = http.request(method, _concrete(path), json=body, headers={"Authorization": f"Bearer {KEY_A}"})
                if path in OPEN_PATHS:
                    assert no_key.status_code == 200, path
                    continue
                for refused in (no_key, wrong, basic):
                    assert refused.status_code == 401, (method, path)
                    assert refused.json()["error"]["code"] == "invalid_api_key"
                    assert refused.headers["www-authenticate"] == "Bearer"
                    assert refused.headers["connection"] == "close"  # not left reading the body of a stranger
                assert good.status_code != 401, (method, path)
                if method == "POST" and path in VALID_BODIES:
                    assert good.status_code == 200, (path, good.text)
                    served.append(good.json()["id"])
    # Only the good key's requests reached the backend: the same bodies with no key, a wrong one or the wrong
    # scheme did not.
    assert len(served) == len(VALID_BODIES) and [r.request_id for r in backend.requests] == served


def test_the_official_client_authenticates(secured: tuple[str, FakeBackend, Any]) -> None:
    url, backend, _ = secured
    backend.reset()
    good = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY_A, max_retries=0, timeout=5)
    assert good.completions.create(model="fake-model", prompt="hi", max_tokens=3).choices[0].text
    bad = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-nope", max_retries=0, timeout=5)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model="fake-model", prompt="hi", max_tokens=3)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_rate_limit_answers_429_with_retry_after(secured: tuple[str, FakeBackend, Any]) -> None:
    url, backend, _ = secured
    backend.reset()
    body = {"model": "fake-model", "prompt": "hi", "max_tokens": 2}
    with httpx.Client(base_url=url, timeout=5, headers={"Authorization": f"Bearer {KEY_B}"}) as http:
        statuses = [http.post("/v1/completions", json=body) for _ in range(3)]
    assert [r.status_code for r in statuses] == [200, 200, 429]  # a burst of 2, then 0.5 per second
    error = statuses[2].json()["error"]  # the same type and code as the backend's 429 (errors.py)
    assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
    assert int(statuses[2].headers["retry-after"]) >= 1
    assert len(backend.requests) == 2


def test_tokenizing_counts_against_the_tenants_rate(tokenizer: Any) -> None:
    """/tokenize and /detokenize run on the tokenizer thread that generation requests wait for: a tenant's limits
    hold them too (a burst of 2: the third request of any of them is a 429)."""
    backend = FakeBackend(tokenizer)
    auth = {"Authorization": f"Bearer {KEY_B}"}
    with (
        serve(create_app(backend, api_keys=keys())) as url,
        httpx.Client(base_url=url, timeout=5, headers=auth) as http,
    ):
        statuses = [
            http.post("/tokenize", json={"prompt": "hi"}).status_code,
            http.post("/detokenize", json={"tokens": [5]}).status_code,
            http.post("/tokenize", json={"prompt": "hi"}).status_code,
            http.get("/version").status_code,  # not a POST: never limited
        ]
    assert statuses == [200, 200, 429, 200]


@pytest.mark.parametrize(
    "error",
    [
        CapacityError("busy"),
        CapacityError("down", status_code=503),
        ServerError("replica died", 1.0),
        RuntimeError("a bug"),  # unhandled: it passes this middleware as an exception, answered 500 outside it
    ],
)
def test_a_request_the_server_refused_costs_the_tenant_nothing(tokenizer: Any, error: Exception) -> None:
    """A tenant's rate counts the requests the server took, not those it was too busy for or failed before answering:
    team-b (a burst of 2, 0.5 per second) is refused by the server 4 times, then still has its burst of 2."""
    backend = FakeBackend(tokenizer)
    backend.reset(error=error)
    body = {"model": "fake-model", "prompt": "hi", "max_tokens": 2}
    auth = {"Authorization": f"Bearer {KEY_B}"}
    with (
        serve(create_app(backend, api_keys=keys())) as url,
        httpx.Client(base_url=url, timeout=5, headers=auth) as http,
    ):
        refused = [http.post("/v1/completions", json=body).status_code for _ in range(4)]
        backend.reset()
        statuses = [http.post("/v1/completions", json=body).status_code for _ in range(3)]
    want = error.status_code if isinstance(error, CapacityError) else 503 if isinstance(error, ServerError) else 500
    assert set(refused) == {want}
    assert statuses == [200, 200, 429]


def test_concurrency_limit_counts_streams_until_they_end(secured: tuple[str, FakeBackend, Any]) -> None:
    url, backend, app = secured
    backend.reset(delay_s=0.05)
    api_keys: APIKeys = app.state.api_keys
    body = {"model": "fake-model", "prompt": "hi", "max_tokens": 20, "stream": True}
    headers = {"Authorization": f"Bearer {KEY_SLOW}"}
    with (
        httpx.Client(base_url=url, timeout=10, headers=headers) as http,
        httpx.Client(base_url=url, timeout=10, headers=headers) as other,
    ):
        with http.stream("POST", "/v1/completions", json=body) as first:
            lines = first.iter_lines()  # (an iterator dropped closes the response: keep it)
            next(lines)
            assert api_keys.in_flight("slow") == 1
            second = other.post("/v1/completions", json=body)
            assert second.status_code == 429 and second.headers["retry-after"] == "1"
        wait_until(lambda: api_keys.in_flight("slow") == 0)  # the client left mid-stream: released
        assert other.post("/v1/completions", json={**body, "stream": False}).status_code == 200
    assert api_keys.in_flight("slow") == 0


def test_a_tenant_salt_is_the_servers(secured: tuple[str, FakeBackend, Any]) -> None:
    url, backend, _ = secured
    backend.reset()
    body = {"model": "fake-model", "prompt": "hi", "max_tokens": 1}

    def salt(key: str, client_salt: str | None) -> str | None:
        extra = {} if client_salt is None else {"cache_salt": client_salt}
        r = httpx.post(f"{url}/v1/completions", json={**body, **extra}, headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200
        return backend.requests[-1].cache_salt

    a, a_narrowed = salt(KEY_A, None), salt(KEY_A, "project-1")
    b_forging_a = salt(KEY_SLOW, a)  # another tenant sends team-a's salt as its own: still its own cache
    assert a is not None and a_narrowed is not None and b_forging_a is not None
    assert len({a, a_narrowed, b_forging_a}) == 3
    assert salt(KEY_A, None) == a  # stable: team-a's repeat hits its own blocks
    assert tenant_salt(None, "x") == "x" and tenant_salt(None, None) is None  # no keys: the client's, as before


def test_tenant_names_are_checked() -> None:
    with pytest.raises(ValueError, match="tenant names"):
        Tenant("a b")
    with pytest.raises(ValueError, match="tenant names"):
        Tenant("t\x1fx")


def test_without_keys_everything_is_open(tokenizer: Any) -> None:
    backend = FakeBackend(tokenizer)
    with serve(create_app(backend)) as url:
        assert httpx.get(f"{url}/v1/models").status_code == 200
        assert httpx.get(f"{url}/metrics").status_code == 200


def test_limits_hold_under_concurrent_clients(tokenizer: Any) -> None:
    """40 clients at once against max_concurrent=3: never more than 3 streams in the backend (counted there, not by
    the limiter), the others 429, and the count back at 0 after (some clients leave mid-stream)."""
    backend = FakeBackend(tokenizer)
    backend.reset(delay_s=0.02)
    api_keys = APIKeys({key_digest(KEY_A): Tenant("team-a", max_concurrent=3)})
    app = create_app(backend, api_keys=api_keys)
    open_streams = peak = 0
    original = backend.generate

    async def counting(request: Any) -> Any:
        nonlocal open_streams, peak
        open_streams += 1  # (the server's one event loop runs every stream: no lock needed)
        peak = max(peak, open_streams)
        try:
            async for delta in original(request):
                yield delta
        finally:
            open_streams -= 1

    backend.generate = counting  # type: ignore[method-assign]
    with serve(app) as url:

        async def one(i: int) -> int:
            body = {"model": "fake-model", "prompt": "hi", "max_tokens": 20, "stream": True}
            async with httpx.AsyncClient(base_url=url, timeout=10) as http:
                headers = {"Authorization": f"Bearer {KEY_A}"}
                async with http.stream("POST", "/v1/completions", json=body, headers=headers) as r:
                    async for _ in r.aiter_lines():
                        if i % 3 == 0:
                            break  # leaves mid-stream
                    return r.status_code

        async def run() -> list[int]:
            return list(await asyncio.gather(*[one(i) for i in range(40)]))

        statuses = asyncio.run(run())
        wait_until(lambda: api_keys.in_flight("team-a") == 0 and open_streams == 0)
    assert set(statuses) <= {200, 429} and statuses.count(200) >= 3
    assert statuses.count(429) >= 10, statuses  # 40 streams of 400 ms each, arriving together: most are refused
    assert 1 <= peak <= 3 and len(backend.requests) == statuses.count(200)


# --- request limits: a 4xx naming the parameter, nothing reaching the backend ------------------------------------


@pytest.fixture(scope="module")
def limited(tokenizer: Any) -> Iterator[tuple[str, FakeBackend]]:
    backend = FakeBackend(tokenizer)
    limits = RequestLimits(max_stop_strings=2, max_stop_string_chars=8, max_messages=3, max_tokens=5,
                           allow_ignore_eos=False)  # fmt: skip
    with serve(create_app(backend, limits=limits, max_body_bytes=1 << 22)) as url:
        yield url, backend


def _chat(**fields: Any) -> dict[str, Any]:
    return {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], **fields}


def _completion(**fields: Any) -> dict[str, Any]:
    return {"model": "fake-model", "prompt": "hi", **fields}


@pytest.mark.parametrize(
    ("route", "body", "param"),
    [
        ("/v1/completions", _completion(stop=["a", "b", "c"]), "stop"),
        ("/v1/completions", _completion(stop="x" * 9), "stop"),
        ("/v1/chat/completions", _chat(stop=["123456789"]), "stop"),
        ("/v1/completions", _completion(max_tokens=6), "max_tokens"),
        ("/v1/chat/completions", _chat(max_completion_tokens=6), "max_completion_tokens"),
        ("/v1/chat/completions", _chat(max_tokens=6), "max_tokens"),
        ("/v1/completions", _completion(ignore_eos=True), "ignore_eos"),
        ("/v1/chat/completions", _chat(messages=[{"role": "user", "content": "hi"}] * 4), "messages"),
    ],
)
def test_over_a_limit_is_a_400_naming_the_parameter(
    limited: tuple[str, FakeBackend], route: str, body: dict[str, Any], param: str
) -> None:
    url, backend = limited
    backend.reset()
    response = httpx.post(url + route, json=body, timeout=5)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    assert not backend.requests


def test_the_server_cap_bounds_an_open_max_tokens(limited: tuple[str, FakeBackend]) -> None:
    url, backend = limited
    backend.reset()
    for body in (_completion(), _completion(max_tokens=None), _completion(max_tokens=3)):
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=5).status_code == 200
    assert httpx.post(f"{url}/v1/chat/completions", json=_chat(), timeout=5).status_code == 200
    assert [r.max_tokens for r in backend.requests] == [5, 5, 3, 5]  # OpenAI's default 16 and "up to the context"


@pytest.mark.parametrize(
    ("route", "raw", "param"),
    [
        ("/v1/completions", '{"model": "fake-model", "prompt": "a\\ud800b"}', "prompt"),
        ("/v1/completions", '{"model": "fake-model", "prompt": "hi", "stop": ["\\udfff"]}', "stop"),
        ("/v1/chat/completions", '{"model": "fake-model", "messages": [{"role": "user", "content": "\\ud83d"}]}',
         "messages"),
        ("/v1/chat/completions",
         '{"model": "fake-model", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud83d"}]}]}',
         "messages"),
        ("/v1/completions", '{"model": "fake-model\\ud800", "prompt": "hi"}', "model"),
    ],
)  # fmt: skip
def test_lone_surrogates_are_a_400(limited: tuple[str, FakeBackend], route: str, raw: str, param: str) -> None:
    url, backend = limited
    backend.reset()
    response = httpx.post(url + route, content=raw, headers={"Content-Type": "application/json"}, timeout=5)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"].startswith(param)  # e.g. messages[0].content
    assert "\\ud8" not in response.text and "\\udf" not in response.text  # the input is not echoed
    assert not backend.requests


def test_a_prompt_too_long_for_any_tokenization_is_refused_before_tokenizing(
    limited: tuple[str, FakeBackend], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, backend = limited
    calls: list[int] = []
    original = Tokenization._run

    async def counted(self: Tokenization, fn: Any) -> Any:
        calls.append(1)
        return await original(self, fn)

    monkeypatch.setattr(Tokenization, "_run", counted)
    tokenization = Tokenization(backend.tokenizer, backend.max_model_len)
    too_long = "ab " * (backend.max_model_len * tokenization.max_token_chars)
    for route, body in (("/v1/completions", _completion(prompt=too_long)),
                        ("/v1/chat/completions", _chat(messages=[{"role": "user", "content": too_long}]))):  # fmt: skip
        response = httpx.post(url + route, json=body, timeout=10)
        assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"
    assert not calls  # never tokenized
    fits = "hello " * 3
    assert httpx.post(f"{url}/v1/completions", json=_completion(prompt=fits), timeout=5).status_code == 200
    assert calls


def test_keys_from_the_command_line_environment_and_file(tmp_path: Any) -> None:
    from pdserve.cli import api_key_entries
    from pdserve.serve.config import ServeConfig, api_keys_of

    listed = tmp_path / "keys.yaml"
    listed.write_text(
        f"- {{key: {KEY_B}, tenant: team-b, requests_per_s: 2, max_concurrent: 3}}\n"
        f"- {{key_sha256: {key_digest(KEY_SLOW)}, tenant: team-b, requests_per_s: 2, max_concurrent: 3}}\n"
    )
    entries = api_key_entries([KEY_A], listed, "sk-from-env-1234, ")
    config = ServeConfig(api_keys=entries)
    assert KEY_A not in config.model_dump_json() and KEY_B not in config.model_dump_json()  # only digests kept
    keys = api_keys_of(config)
    assert keys is not None
    by_key = {k: keys.authenticate(f"Bearer {k}") for k in (KEY_A, KEY_B, KEY_SLOW, "sk-from-env-1234", "sk-x")}
    assert {k: t.name if t else None for k, t in by_key.items()} == {
        KEY_A: "default",
        KEY_B: "team-b",
        KEY_SLOW: "team-b",
        "sk-from-env-1234": "default",
        "sk-x": None,
    }
    assert by_key[KEY_B] is by_key[KEY_SLOW] and by_key[KEY_B].max_concurrent == 3  # one tenant, shared limits
    assert api_keys_of(ServeConfig()) is None
    with pytest.raises(ValueError, match="at least 8"):
        api_key_entries(["short"], None, "")
    with pytest.raises(ValueError, match="printable ASCII"):  # a header never carries it: it could never log in
        ServeConfig(api_keys=api_key_entries(["sk-clé-secrète"], None, ""))


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([{"key": "sk-shared-key", "tenant": "alice"}, {"key": "sk-shared-key", "tenant": "bob"}], "listed twice"),
        ([{"key": "sk-shared-key"}, {"key": "sk-shared-key"}], "listed twice"),
        ([{"key": "sk-only-burst", "burst": 10}], "burst needs requests_per_s"),
        (
            [{"key": "sk-dave-one1", "tenant": "dave", "max_concurrent": 1}, {"key": "sk-dave-two2", "tenant": "dave"}],
            "different limits",
        ),
        ([{"key": "sk-infinite", "requests_per_s": float("inf")}], "finite number"),
        ([{"key": "sk-glacial", "requests_per_s": 1e-320}], "greater than or equal to 0.000001"),
        ([{"key": "sk-trailing-space "}], "begin or end with spaces"),
        ([{"key": " sk-leading-space"}], "begin or end with spaces"),
    ],
)
def test_contradictory_or_unusable_keys_are_refused_by_the_config(entries: list[dict[str, Any]], message: str) -> None:
    """Refused when the config is read, not when the ingress starts (or never: the same key under two tenants logged
    in as whichever came last, a burst without a rate limited nothing, an infinite rate stopped the ingress from
    starting, a near-zero one made every 429 a 500, and a key with edge spaces could never log in)."""
    from pdserve.serve.config import ServeConfig

    with pytest.raises(ValueError, match=message):
        ServeConfig(api_keys=entries)


def test_router_and_pool_settings_refuse_infinity() -> None:
    """An infinite optimistic TTL kept routed-but-never-stored blocks forever (and grew the expiry queue)."""
    from pdserve.serve.config import ServeConfig

    for router in ({"optimistic_ttl_s": float("inf")}, {"replica_timeout_s": float("nan")}):
        with pytest.raises(ValueError, match="finite number"):
            ServeConfig(router=router)


def test_metrics_can_be_kept_to_named_tenants(tokenizer: Any) -> None:
    """/metrics counts the whole cluster (every tenant's traffic and cache hits): `metrics_tenants` keeps it to the
    named tenants' keys (403 for the others, 401 without a key); generation is unaffected. The config refuses a name
    that is no tenant of its keys."""
    from pdserve.serve.config import ServeConfig, api_keys_of

    config = ServeConfig(
        api_keys=[{"key": KEY_A, "tenant": "team-a"}, {"key": KEY_B, "tenant": "ops"}], metrics_tenants=["ops"]
    )
    api_keys = api_keys_of(config)
    assert api_keys is not None and api_keys.metrics_tenants == {"ops"}
    backend = FakeBackend(tokenizer)
    with serve(create_app(backend, api_keys=api_keys)) as url:

        def get(path: str, key: str | None) -> httpx.Response:
            return httpx.get(f"{url}{path}", headers={"Authorization": f"Bearer {key}"} if key else {}, timeout=5)

        assert get("/metrics", KEY_B).status_code == 200
        refused = get("/metrics", KEY_A)
        assert refused.status_code == 403 and refused.json()["error"]["type"] == "permission_error"
        assert get("/metrics", None).status_code == 401
        assert get("/v1/models", KEY_A).status_code == 200
        body = {"model": "fake-model", "prompt": "hi", "max_tokens": 2}
        answer = httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY_A}"})
        assert answer.status_code == 200
    with pytest.raises(ValueError, match="metrics_tenants names no tenant of api_keys: nobody"):
        ServeConfig(api_keys=[{"key": KEY_A}], metrics_tenants=["nobody"])


@pytest.mark.parametrize("root_path", ["", "/tenants"])
def test_limits_and_open_paths_hold_under_a_route_prefix(tokenizer: Any, root_path: str) -> None:
    """Under a route prefix (Serve's `route_prefix`, uvicorn's --root-path) the scope's path keeps the prefix: the
    checks read it raw, so a tenant's rate and concurrency limits and the /metrics tenant check were skipped, and the
    probes wanted a key (found in review). They read the route's path now, as Starlette routes."""
    api_keys = APIKeys({key_digest(KEY_A): Tenant("team-a", requests_per_s=0.001, burst=1)}, metrics_tenants={"ops"})
    backend = FakeBackend(tokenizer)
    app = create_app(backend, api_keys=api_keys)
    with serve(app, root_path=root_path) as url:
        with httpx.Client(base_url=url, timeout=5, headers={"Authorization": f"Bearer {KEY_A}"}) as http:
            body = {"model": "fake-model", "prompt": "hi", "max_tokens": 2}
            assert [http.post("/v1/completions", json=body).status_code for _ in range(3)] == [200, 429, 429]
            assert http.get("/metrics").status_code == 403
        assert httpx.get(f"{url}/health", timeout=5).status_code == 200
    assert len(backend.requests) == 1
    assert b'route="/v1/completions"' in app.state.pdserve.metrics.render()  # the route's label, not "other"
