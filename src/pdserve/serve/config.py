"""The serving configuration: validated with pydantic where it arrives (YAML, CLI), then turned into the engine's
frozen dataclasses."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pdserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig


class PoolConfig(BaseModel):
    """Where one role's replicas run: Ray actor options (resources, label selectors, num_gpus)."""

    model_config = ConfigDict(extra="forbid")

    num_replicas: int = Field(1, ge=0)
    # Dev/CI default: no CPU reservation, so prefill, decode and ingress fit on a 2-core box together.
    ray_actor_options: dict[str, Any] = Field(default_factory=lambda: {"num_cpus": 0})
    max_ongoing_requests: int = Field(256, ge=1)
    num_threads: int | None = Field(None, ge=1)  # torch intra-op threads per replica (None: torch's default)


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

    colocated: bool = False  # one EngineServer pool doing prefill and decode (the baseline)
    prefill: PoolConfig = Field(default_factory=PoolConfig)
    decode: PoolConfig = Field(default_factory=PoolConfig)
    engine: PoolConfig = Field(default_factory=PoolConfig)  # colocated mode
    ingress: PoolConfig = Field(default_factory=PoolConfig)

    kv_transport: Literal["auto", "shm", "tcp"] = "auto"  # auto: shared memory on one node, TCP across nodes
    kv_transfer_timeout_s: float = Field(30.0, gt=0)
    reservation_lease_s: float = Field(60.0, gt=0)  # a reservation never committed is freed after this
    max_body_bytes: int = Field(1 << 20, ge=1024)
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)

    def engine_config(self, model_path: str) -> EngineConfig:
        return EngineConfig(
            model=ModelConfig(model_path, self.dtype, self.device, self.max_model_len),
            cache=CacheConfig(
                self.block_size, self.num_kv_blocks, self.kv_cache_memory_bytes, self.enable_prefix_caching
            ),
            scheduler=SchedulerConfig(self.max_num_batched_tokens, self.max_num_seqs),
        )
