"""A real local Ray cluster serving pdserve apps over HTTP, for end-to-end tests."""

from __future__ import annotations

import random
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families


def free_port() -> int:
    """A free TCP port on 127.0.0.1 between Ray's worker ports (10002-19999) and the kernel's ephemeral range. A port
    bound to 0 and released comes from the ephemeral range, where every process binding port 0 meanwhile may take
    it (a benchmark's HAProxy once failed to bind one: a Ray process started since had it)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768  # Linux's default
    rng = random.SystemRandom()
    for _ in range(200 if low > 20000 else 0):
        port = rng.randrange(20000, low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # no room outside the ephemeral range
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_shared_port: int | None = None  # Serve's HTTP port on the session's Ray cluster, while it runs


@contextmanager
def ray_serve(port: int) -> Iterator[None]:
    """A local Ray cluster of its own with Serve over HTTP on 127.0.0.1:`port`, stopped when the context ends (the
    load tests: each system they compare starts on a fresh cluster). Stops the session's shared cluster first."""
    import ray
    from ray import serve

    stop_shared()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield
    finally:
        serve.shutdown()
        ray.shutdown()


@contextmanager
def shared_serve() -> Iterator[int]:
    """The session's local Ray cluster with Serve over HTTP on 127.0.0.1, as Serve's port: the test modules share
    one (starting Ray and Serve takes ~8 s and ~11 s of CPU on a 2-core box, stopping them ~6 s). A module gets it
    with no application deployed, and the applications it deployed are deleted when it leaves; `stop_shared` (at the
    session's end, or before anything that starts Ray itself) shuts it down."""
    global _shared_port
    from ray import serve

    if _shared_port is None:
        import ray

        port = free_port()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        _shared_port = port
    _delete_apps()  # left by a module that ended without its teardown
    try:
        yield _shared_port
    finally:
        _delete_apps()


def _delete_apps() -> None:
    from ray import serve
    from ray.serve.context import _get_global_client

    names = list(serve.status().applications)
    if names:
        _get_global_client().delete_apps(names, blocking=True)


def stop_shared() -> None:
    """Shut the session's cluster down (a no-op when none runs)."""
    global _shared_port
    if _shared_port is None:
        return
    import ray
    from ray import serve

    _shared_port = None
    try:
        serve.shutdown()
    finally:
        ray.shutdown()


def deploy(apps: dict[str, tuple[Any, str]]) -> None:
    """Deploy pdserve apps (name -> (ServeConfig, route prefix)) in one call and wait until every one runs: their
    replicas start side by side instead of one app after another (the module fixtures' setup time)."""
    from ray import serve

    from pdserve.serve.app import build_app

    serve.run_many(
        [serve.RunTarget(build_app(config), name=name, route_prefix=prefix) for name, (config, prefix) in apps.items()]
    )


def reporting_replicas(samples: dict[str, dict[tuple[tuple[str, str], ...], float]]) -> set[str]:
    """The engine replicas whose stats a /metrics snapshot holds."""
    return {dict(labels)["replica"] for labels in samples.get("pdserve_kv_blocks_total", {})}


def live_engine_replicas(app: str) -> set[str]:
    """The replica ids of `app`'s live engine replicas (Serve's named actors), as the replicas' stats label them."""
    import ray

    roles = ("EngineServer", "PrefillServer", "DecodeServer")
    names = [actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)]
    return {n.rsplit("#", 1)[1] for n in names if n.startswith(f"SERVE_REPLICA::{app}#") and n.split("#")[1] in roles}


@dataclass(frozen=True)
class Served:
    base_url: str  # ends in /v1
    api_key: str | None = None  # sent to /metrics when the app requires keys
    # Engine replicas a fresh snapshot must show (None: at least one; set where the count is fixed, so a pool whose
    # stats broadcast failed cannot pass for an idle one).
    num_engine_replicas: int | None = None

    @property
    def root(self) -> str:
        return self.base_url.removesuffix("/v1")

    def metrics(self) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
        """Every sample of /metrics: name -> {sorted labels: value}. Replica series may be up to a refresh old."""
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else None
        text = httpx.get(f"{self.root}/metrics", timeout=10, headers=headers).text
        samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
        return samples

    def fresh_metrics(
        self, timeout_s: float = 15.0, check_count: bool = True
    ) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
        """/metrics once its replica series were asked of the replicas after this call began (the ingress refreshes
        them every second): they show the state after everything that happened before the call. With
        `check_count`, the snapshot must hold `num_engine_replicas` engine replicas (at least one when unset)."""
        since = time.time()
        while True:
            samples = self.metrics()
            taken = max(samples.get("pdserve_replica_stats_timestamp_seconds", {}).values(), default=0.0)
            if taken >= since:
                if check_count:
                    replicas, want = reporting_replicas(samples), self.num_engine_replicas
                    assert len(replicas) == want if want is not None else replicas, f"replicas in snapshot: {replicas}"
                return samples
            assert time.time() - since < timeout_s, f"replica stats not refreshed within {timeout_s} s"
            time.sleep(0.1)

    def settled_total(self, name: str) -> float:
        """The sum of metric `name` over its labels in a snapshot taken after the last request."""
        return sum(self.fresh_metrics().get(name, {}).values())

    def blocks_used(self) -> float:
        """KV blocks in use on every engine replica, from a snapshot taken after this call."""
        return self.settled_total("pdserve_kv_blocks_used")

    def wait_blocks_used(self, want: float, timeout_s: float = 10.0) -> float:
        deadline = time.time() + timeout_s
        used = self.blocks_used()
        while used != want and time.time() < deadline:
            used = self.blocks_used()
        return used


async def greedy_text(client: Any, model: str, prompt: list[int], max_tokens: int, stream: bool = False) -> str:
    """A greedy completion's text through the official client (`openai.AsyncOpenAI`), after checking it is whole:
    `max_tokens` tokens (ignore_eos), finish reason "length". The oracle's text comparison alone passed a response
    cut short at a near-tie, or any text at all with a near-tie at its first token (found in review)."""
    extra = {"ignore_eos": True}
    if not stream:
        out = await client.completions.create(
            model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, extra_body=extra
        )
        choice = out.choices[0]
        assert (out.usage.completion_tokens, choice.finish_reason) == (max_tokens, "length"), (out.usage, choice)
        return str(choice.text)
    chunks = await client.completions.create(
        model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body=extra,
    )  # fmt: skip
    text, finish, usage = "", None, None
    async for chunk in chunks:
        if chunk.choices:
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
        usage = chunk.usage or usage
    assert usage is not None and (usage.completion_tokens, finish) == (max_tokens, "length"), (usage, finish)
    return text
