"""Internal configuration: frozen dataclasses, each passed whole to the component that needs it.

Outside input (YAML, CLI, HTTP) is validated with pydantic at its boundary and turned into these.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

SchedulingPolicy = Literal["fcfs", "shortest_prefill_first"]


@dataclass(frozen=True)
class ModelConfig:
    path: str  # local HF directory: config.json + *.safetensors (+ tokenizer files)
    # "auto": bfloat16 on CUDA and on CPUs with native bf16 (avx512_bf16 / amx_bf16), float32 elsewhere; a float16
    # checkpoint runs in float16 on CUDA.
    dtype: str = "auto"
    device: str = "cpu"
    max_model_len: int | None = None  # None: the checkpoint's max_position_embeddings (capped by the KV pool)


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16  # tokens per KV block
    num_blocks: int | None = None  # None: as many as fit in memory_bytes
    memory_bytes: int = 1 << 30  # KV memory when num_blocks is None
    enable_prefix_caching: bool = True
    # Allocate the KV tensors in this shared-memory file so same-node peers can write blocks into them directly.
    shared_path: str | None = None
    # A prefill-only result nobody releases (its caller died) is released after this long: the reaper's backstop.
    held_ttl_s: float = 60.0
    # After a reservation's write permits are revoked, its blocks stay unused this long past the last moment a
    # writer may have started a layer (a layer write in flight then lands in blocks no one else uses yet).
    fence_grace_s: float = 1.0


@dataclass(frozen=True)
class SchedulerConfig:
    # Tokens computed per step across all sequences (decode tokens + prefill chunks). Larger raises matmul
    # efficiency and TTFT under load; smaller bounds the step time that running decodes wait for.
    max_num_batched_tokens: int = 512
    max_num_seqs: int = 64  # sequences running at once
    # The order prompts are prefilled in once decodes have their tokens: "fcfs" (arrival order; a long prompt holds
    # every prompt behind it for its whole prefill) or "shortest_prefill_first" (the fewest prompt tokens left first,
    # so a chat prompt overtakes a long document's remaining chunks; each second a prompt waits counts as
    # `prefill_aging_tokens_per_s` fewer tokens, so none starves).
    policy: SchedulingPolicy = "fcfs"
    prefill_aging_tokens_per_s: float = 32.0

    def __post_init__(self) -> None:  # an engine built directly must not run fcfs on a misspelt policy
        if self.policy not in get_args(SchedulingPolicy):
            raise ValueError(f"unknown scheduling policy {self.policy!r}: fcfs or shortest_prefill_first")
        if self.prefill_aging_tokens_per_s < 0:
            raise ValueError("prefill_aging_tokens_per_s must be >= 0")


@dataclass(frozen=True)
class EmulatedStep:
    """Pads each engine step with a sleep up to a modeled accelerator's time for the step: base + per prompt token +
    per sequence. For demonstrations and tests on CPU-only machines, where replicas otherwise share the same cores
    and adding one adds no capacity; with padding, a replica's throughput is the modeled device's and the sleeping
    replicas leave the cores free, as GPU-bound replicas would. Never for real serving."""

    base_s: float = 0.0
    per_prompt_token_s: float = 0.0
    per_seq_s: float = 0.0

    def seconds(self, num_prompt_tokens: int, num_seqs: int) -> float:
        return self.base_s + self.per_prompt_token_s * num_prompt_tokens + self.per_seq_s * num_seqs


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    emulated_step: EmulatedStep | None = None  # CPU demonstrations only (see EmulatedStep)
