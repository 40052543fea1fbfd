"""Typed messages between the ingress and the prefill/decode replicas (small: ids and counts, never tensors), and the
errors a replica raises to the ingress. Ray unpickles a message or error by its class's module, on its core-worker
thread holding the GIL: every class here (and each module it comes from) imports no torch, or the ingress's first
such message would import it there, stalling all its calls for seconds (tests/test_tokenizer_loading.py)."""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.engine.request import TokenLogprob
from pdserve.kvcache import KVEventBatch
from pdserve.router import ReplicaReport
from pdserve.transfer import KVEndpoint


@dataclass(frozen=True)
class Reservation:
    """Decode replica -> ingress -> prefill replica: where the prompt's KV must go."""

    request_id: str
    replica_id: str  # the decode replica holding the blocks; later calls are pinned to it
    epoch: int  # stamped on every block the transfer writes; commit checks it
    block_ids: tuple[int, ...]  # one per prompt block, in order
    num_cached_tokens: int  # prompt tokens the decode replica already holds: only later blocks move
    endpoint: KVEndpoint  # how to reach the decode replica's KV cache
    lease_s: float  # a duration on the decode replica's own clock: renew it (`DecodeServer.renew`) while the
    # prefill works; without a commit, abort or renewal within it, the reservation is revoked (clocks of different
    # machines are never compared: the decode replica enforces its lease, and every write checks it there)


@dataclass(frozen=True)
class PrefillResult:
    """Prefill replica -> ingress."""

    first_token_id: int
    first_logprob: TokenLogprob | None
    finish_reason: str | None  # set when the first token already ends the request
    num_prompt_tokens: int
    num_cached_tokens: int  # prefill replica's own prefix-cache hit
    num_blocks_sent: int
    num_bytes_sent: int
    transfer_s: float
    transfer_wait_s: float  # from the prompt computed to the KV in place: what the transfer adds to TTFT
    prefill_s: float  # queue + compute on the prefill replica
    queue_s: float  # waiting in the prefill replica's engine
    prompt_logprobs: list[TokenLogprob] | None = None  # when asked for (SamplingParams.prompt_logprobs)


@dataclass(frozen=True)
class ModelInfo:
    model_path: str
    max_model_len: int
    eos_token_ids: tuple[int, ...]
    block_size: int
    kv_bytes_per_token: int
    tokenizer_class: str | None = None  # the class AutoTokenizer loads the tokenizer with (api/intake.py)


@dataclass(frozen=True)
class ReplicaStats:
    replica_id: str
    role: str  # "prefill" | "decode" | "engine"
    num_blocks: int
    num_used_blocks: int
    num_cached_blocks: int
    num_running: int
    num_waiting: int
    num_held: int
    prefix_cache_hit_tokens: int  # since start
    kv_transfer_bytes: int  # since start, sent (prefill) or received (decode)
    kv_transfer_blocks: int
    kv_transfer_s: float
    num_reserved_blocks: int = 0
    num_fenced_blocks: int = 0
    num_reaped_leases: int = 0  # since start, as the rest below
    num_reaped_held: int = 0
    num_fenced_aborts: int = 0
    num_aborts: int = 0
    num_fenced_writes: int = 0  # writes this replica refused (decode) or stopped (prefill) at the fence
    # the planner's signals (planner/signals.py), rendered for dashboards
    queued_prefill_tokens: int = 0
    prefill_tokens: int = 0  # since start, computed
    busy_s: float = 0.0  # since start, in model steps
    decode_steps: int = 0  # since start, steps without a prompt chunk
    decode_step_s: float = 0.0
    borrowed_core_steps: int = 0  # since start, steps x cores borrowed from idle peers (lend_idle_cores)
    core_home_waits: int = 0  # since start, steps that waited for a borrower to hand this replica's cores back
    steps: int = 0  # since start, model steps (decode-only ones included)


@dataclass(frozen=True)
class ReplicaSync:
    """Replica -> ingress router, every sync period: load and room, and the KV events after the router's cursor."""

    report: ReplicaReport
    events: KVEventBatch


class MisroutedCallError(RuntimeError):
    """A call pinned to one replica reached another (the target is gone): a server fault, never served."""


class PushAbandoned(RuntimeError):
    """A prefill call ended before its push started: the push sends nothing."""
