"""The serving configuration: validated with pydantic where it arrives (YAML, CLI), then turned into the engine's
frozen dataclasses."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pdserve.api.auth import APIKeys, Tenant, key_digest
from pdserve.api.intake import RequestLimits
from pdserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from pdserve.router import CostConfig
from pdserve.telemetry import tracing_env


class PoolConfig(BaseModel):
    """Where one role's replicas run: Ray actor options (resources, label selectors, num_gpus)."""

    model_config = ConfigDict(extra="forbid")

    num_replicas: int = Field(1, ge=0)
    # Dev/CI default: no CPU reservation, so prefill, decode and ingress fit on a 2-core box together.
    ray_actor_options: dict[str, Any] = Field(default_factory=lambda: {"num_cpus": 0})
    max_ongoing_requests: int = Field(256, ge=1)
    # torch intra-op threads per engine replica (None: one per core the replica may run on)
    num_threads: int | None = Field(None, ge=1)
    # Pin the pool's engine replicas to these CPU cores (Linux ids; every replica of the pool on a node shares
    # them): keeps a prefill and a decode replica on one machine from competing for the same cores.
    cpus: list[int] | None = Field(None, min_length=1)


class APIKeyConfig(BaseModel):
    """One API key and its tenant. Configs hold the key's SHA-256 (`key_sha256`); a plain `key` given here (a
    file, the CLI) is hashed at once and never kept."""

    model_config = ConfigDict(extra="forbid")

    key_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    tenant: str = "default"
    requests_per_s: float | None = Field(None, gt=0)
    burst: int | None = Field(None, ge=1)
    max_concurrent: int | None = Field(None, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _hash_plain_key(cls, data: Any) -> Any:
        if isinstance(data, dict) and "key" in data:
            data = dict(data)
            key = data.pop("key")
            if not isinstance(key, str) or len(key) < 8:
                raise ValueError("an API key needs at least 8 characters")
            data["key_sha256"] = key_digest(key)
        return data

    def tenant_entry(self) -> Tenant:
        return Tenant(self.tenant, self.requests_per_s, self.burst, self.max_concurrent)


class LimitsConfig(BaseModel):
    """What one request may ask for (api/intake.py RequestLimits)."""

    model_config = ConfigDict(extra="forbid")

    max_stop_strings: int = Field(4, ge=0)
    max_stop_string_chars: int = Field(256, ge=1)
    max_messages: int = Field(1024, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    allow_ignore_eos: bool = True

    def request_limits(self) -> RequestLimits:
        return RequestLimits(**self.model_dump())


class RouterSettings(BaseModel):
    """The ingress's global router (docs/ROUTER.md): policy, index sync, and the cost model's weights."""

    model_config = ConfigDict(extra="forbid")

    # cache_aware: pdserve's router picks the (prefill, decode) pair; pow2: Serve's default power-of-two choices.
    policy: Literal["cache_aware", "pow2"] = "cache_aware"
    sync_period_s: float = Field(0.1, gt=0)  # how often the ingress pulls every replica's KV events and stats
    optimistic_ttl_s: float = Field(2.0, gt=0)  # how long routed-but-unconfirmed blocks count as cached
    replica_timeout_s: float = Field(10.0, gt=0)  # a replica silent this long leaves the index
    prefill_tokens_per_s: float = Field(CostConfig.prefill_tokens_per_s, gt=0)
    local_prefill_tokens_per_s: float = Field(CostConfig.local_prefill_tokens_per_s, gt=0)
    decode_step_per_seq_s: float = Field(CostConfig.decode_step_per_seq_s, ge=0)
    expected_output_tokens: int = Field(CostConfig.expected_output_tokens, ge=1)
    same_node_bytes_per_s: float = Field(CostConfig.same_node_bytes_per_s, gt=0)
    cross_node_bytes_per_s: float = Field(CostConfig.cross_node_bytes_per_s, gt=0)
    disaggregation_overhead_s: float = Field(CostConfig.disaggregation_overhead_s, ge=0)
    local_prefill_max_tokens: int = Field(CostConfig.local_prefill_max_tokens, ge=0)

    def cost_config(self, block_size: int, kv_bytes_per_token: int) -> CostConfig:
        weights = self.model_dump(exclude={"policy", "sync_period_s", "optimistic_ttl_s", "replica_timeout_s"})
        return CostConfig(**weights, kv_bytes_per_token=kv_bytes_per_token, block_size=block_size)


class ServeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str | None = None  # local HF directory or "SmolLM2-135M-Instruct" (None: the latter)
    served_model_name: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "cpu"
    max_model_len: int | None = Field(None, ge=2)
    block_size: int = Field(16, ge=1)
    kv_cache_memory_bytes: int = Field(1 << 30, ge=1 << 20)
    num_kv_blocks: int | None = Field(None, ge=1)
    enable_prefix_caching: bool = True
    max_num_batched_tokens: int = Field(512, ge=16)
    max_num_seqs: int = Field(64, ge=1)
    # Tokens per streamed message after a stream's first (vLLM's --stream-interval): each message through Serve
    # costs ~1-3 ms of CPU across the hops to the client, so 4 cuts that per token by ~4x; 1 streams every token.
    stream_interval: int = Field(1, ge=1)
    # One streamed message per engine step from each engine replica to each ingress replica, carrying every
    # request's new tokens (serve/channels.py), instead of one message per request per step.
    output_channels: bool = True
    # The scheduling niceness of pdserve's replicas (engines and ingress). Ray starts its workers at 15, below every
    # ordinary process on the host, so a load client, a benchmark tool or any busy program at 0 takes the cores from
    # the engines (aiperf at 0 made streams ~4x slower). 0 puts them level with ordinary processes, as vLLM's are;
    # lowering niceness needs root or CAP_SYS_NICE (without it a warning, and Ray's 15 stays); None keeps Ray's.
    niceness: int | None = Field(0, ge=-20, le=19)
    # With keys, every route but /health and /ready needs `Authorization: Bearer <key>` (api/auth.py).
    api_keys: list[APIKeyConfig] = Field(default_factory=list)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)

    colocated: bool = False  # one EngineServer pool doing prefill and decode (the baseline)
    prefill: PoolConfig = Field(default_factory=PoolConfig)
    decode: PoolConfig = Field(default_factory=PoolConfig)
    engine: PoolConfig = Field(default_factory=PoolConfig)  # colocated mode
    ingress: PoolConfig = Field(default_factory=PoolConfig)
    router: RouterSettings = Field(default_factory=RouterSettings)

    # auto picks per pair by topology: GPU KV over CUDA IPC to the same GPU, NCCL to others; host KV over shared
    # memory on one node, TCP across nodes. gloo: NCCL's protocol over host memory (the CPU twin; tests, CPUs).
    kv_transport: Literal["auto", "shm", "tcp", "gloo", "nccl", "cuda_ipc"] = "auto"
    # Communicator pairs (NCCL/gloo) each side keeps at most; the least recently used idle one is closed beyond it
    # (an NCCL communicator holds ~50-100 MB of GPU memory).
    kv_max_pairs: int = Field(8, ge=1)
    # Where decode replicas listen for TCP KV transfers: 127.0.0.1 keeps them on one node; 0.0.0.0 for prefill and
    # decode on different nodes (the connection is not authenticated: keep it inside the cluster's network).
    kv_host: str = "127.0.0.1"
    kv_transfer_timeout_s: float = Field(30.0, gt=0)
    # Send layer i while layer i+1 computes (on GPU after that layer's CUDA event), instead of after the prompt.
    # Off by default: on the 2-core dev CPU the sender thread slows the prefill by more than the transfer it hides
    # (benchmarks/kv_pipeline.py); it pays where cores are spare and the link is slow.
    kv_pipelined_push: bool = False
    reservation_lease_s: float = Field(60.0, gt=0)  # a reservation never committed is freed after this
    # Health: Serve calls each replica's check_health this often and replaces a replica that fails it (its engine
    # thread died, or one step or command ran longer than engine_step_timeout_s: wedged).
    # Admission: prompt tokens admitted and still waiting for their first token, per prefill (or colocated
    # engine) replica; beyond it requests get 429 + Retry-After before any work. Disaggregated requests that find
    # no decode room wait for it up to queue_ttl_s (below the lease), as colocated ones queue in their engine.
    max_queued_prefill_tokens: int = Field(16384, ge=1)
    queue_ttl_s: float = Field(20.0, gt=0)
    # A prefill call (queue on the prefill replica + compute + KV push) that has not answered by then is cancelled
    # and retried on another prefill replica; every other remote call has its own timeout too.
    prefill_timeout_s: float = Field(60.0, gt=0)
    # Scale-down drains: a replica being removed gets no new calls and has this long to finish the streams it serves
    # (Serve's graceful shutdown); a stream still running then fails over (greedy and seeded ones migrate).
    drain_grace_s: float = Field(30.0, ge=0)
    health_check_period_s: float = Field(2.0, gt=0)
    health_check_timeout_s: float = Field(10.0, gt=0)
    engine_step_timeout_s: float = Field(120.0, gt=0)
    # OTEL_* / PDSERVE_TRACES_* variables for every replica (default: the building process's; docs/TELEMETRY.md)
    tracing_env: dict[str, str] = Field(default_factory=tracing_env)
    max_body_bytes: int = Field(1 << 20, ge=1024)
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    # HTTPS on the HTTP port (Serve's proxy terminates TLS): PEM files readable on every node running a proxy.
    ssl_keyfile: str | None = None
    ssl_certfile: str | None = None

    def http_options(self) -> dict[str, Any]:
        """Serve's `http_options` for this config: where to listen, and TLS when both files are given."""
        options: dict[str, Any] = {"host": self.host, "port": self.port}
        if (self.ssl_keyfile is None) != (self.ssl_certfile is None):
            raise ValueError("TLS needs both ssl_keyfile and ssl_certfile")
        if self.ssl_keyfile is not None:
            options.update(ssl_keyfile=self.ssl_keyfile, ssl_certfile=self.ssl_certfile)
        return options

    @model_validator(mode="after")
    def _queue_ttl_below_the_lease(self) -> ServeConfig:
        if self.queue_ttl_s >= self.reservation_lease_s:
            raise ValueError("queue_ttl_s must be below reservation_lease_s")
        return self

    @model_validator(mode="after")
    def _transport_fits_the_device(self) -> ServeConfig:
        is_gpu = self.device.startswith("cuda")
        gpu_only, host_only = ("nccl", "cuda_ipc"), ("shm", "tcp", "gloo")
        if (is_gpu and self.kv_transport in host_only) or (not is_gpu and self.kv_transport in gpu_only):
            allowed = "auto, " + ", ".join(gpu_only if is_gpu else host_only)
            raise ValueError(f"kv_transport {self.kv_transport} cannot move KV on {self.device}: use {allowed}")
        return self

    def engine_config(self, model_path: str) -> EngineConfig:
        return EngineConfig(
            model=ModelConfig(model_path, self.dtype, self.device, self.max_model_len),
            cache=CacheConfig(
                self.block_size, self.num_kv_blocks, self.kv_cache_memory_bytes, self.enable_prefix_caching
            ),
            scheduler=SchedulerConfig(self.max_num_batched_tokens, self.max_num_seqs),
        )


def api_keys_of(config: ServeConfig) -> APIKeys | None:
    """The ingress's key table; None (an open server) when no key is configured."""
    if not config.api_keys:
        return None
    tenants: dict[str, Tenant] = {}
    by_digest: dict[str, Tenant] = {}
    for entry in config.api_keys:
        tenant = tenants.setdefault(entry.tenant, entry.tenant_entry())
        if tenant != entry.tenant_entry():
            raise ValueError(f"tenant {entry.tenant!r} is given different limits by two of its keys")
        by_digest[entry.key_sha256] = tenant
    return APIKeys(by_digest)
