"""The replay simulator: a request trace through the real `Router` against modeled replicas.

One discrete-event run per policy, deterministic for a seed. The router sees what the real ingress sees: every
replica's report and KV events once per `sync_period_s` (the "oracle" policy instead syncs right before each
decision: the same cost model with a perfect, instant index). A request's life, as in serve/handoff.py:

  disaggregated: route -> hop -> D reserves the prompt (reusing its cached blocks; retried while D lacks room)
                 -> hop -> P's FIFO queue -> P prefills the uncached tokens -> D's missing blocks transfer + hop
                 -> D commits: first token, joins D's decode batch
  local:         route -> hop -> D's queue -> D prefills the missing tokens inside its next decode step
                 -> first token at the step's end
then one token per decode step until `output_len`; blocks are freed at the end and stay cached until evicted.
"""

from __future__ import annotations

import dataclasses
import functools
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from pdserve.kvcache import hash_block_chain
from pdserve.router.cost import CostConfig, RouteMode
from pdserve.router.index import SyncCursor
from pdserve.router.router import Router
from pdserve.router.sim_replicas import DecodeReplica, EventQueue, PrefillReplica, ReplicaModel, SimRequest
from pdserve.router.trace import TraceRequest

SIM_POLICIES = ("cache_aware", "pow2", "oracle")


@dataclass(frozen=True)
class SimConfig:
    num_prefill: int = 2
    num_decode: int = 2
    replica: ReplicaModel = field(default_factory=ReplicaModel)
    sync_period_s: float = 0.15  # the ingress polls every replica's report and KV events this often
    hop_overhead_s: float = 0.003  # one Ray call
    bytes_per_s: float = 5e9  # P -> D transfer bandwidth
    kv_bytes_per_token: int = 23040
    reserve_retry_s: float = 0.05  # a reserve refused for lack of room is retried this much later
    optimistic_ttl_s: float = 2.0
    policy: str = "cache_aware"
    cost: CostConfig = field(default_factory=CostConfig)  # the router's weights (see `calibrated_cost`)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.policy not in SIM_POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; use one of {SIM_POLICIES}")
        if self.cost.block_size != self.replica.block_size:
            raise ValueError(f"cost.block_size {self.cost.block_size} != replica block_size {self.replica.block_size}")
        if self.num_decode < 1 or self.num_prefill < 1:
            raise ValueError("the simulator needs at least one prefill and one decode replica")


def calibrated_cost(config: SimConfig) -> CostConfig:
    """`config.cost` with its rate and size weights set to what the modeled replicas really cost; the policy knobs
    (local_prefill_max_tokens, expected_output_tokens, disaggregation_overhead_s) are kept."""
    model = config.replica
    return dataclasses.replace(
        config.cost,
        prefill_tokens_per_s=model.prefill_tokens_per_s,
        local_prefill_tokens_per_s=model.prefill_tokens_per_s,
        decode_step_per_seq_s=model.decode_step_per_seq_s,
        kv_bytes_per_token=config.kv_bytes_per_token,
        same_node_bytes_per_s=config.bytes_per_s,
        block_size=model.block_size,
    )


@dataclass(frozen=True)
class RequestRecord:
    request_id: str
    mode: RouteMode
    prefill_replica_id: str | None  # None when local
    decode_replica_id: str
    arrival_s: float
    first_token_s: float
    finish_s: float
    num_prompt_tokens: int
    num_cached_tokens: int  # realized hit on the replica that computed the prompt
    num_computed_tokens: int
    num_transferred_blocks: int  # blocks the decode replica lacked (0 when local)
    num_preemptions: int  # times the decode replica evicted it for room and recomputed it

    @property
    def ttft_s(self) -> float:
        return self.first_token_s - self.arrival_s


@dataclass(frozen=True)
class SimResult:
    policy: str
    records: tuple[RequestRecord, ...]  # in arrival order
    expected_hit_rate: float  # what the router's decisions expected (a stale index overestimates)
    num_referenced_blocks_at_end: int  # over every pool; anything but 0 is a leak

    @property
    def hit_rate(self) -> float:
        """Realized cached prompt tokens / prompt tokens."""
        return sum(r.num_cached_tokens for r in self.records) / max(sum(r.num_prompt_tokens for r in self.records), 1)

    @property
    def mean_ttft_s(self) -> float:
        return float(np.mean([r.ttft_s for r in self.records]))

    @property
    def p90_ttft_s(self) -> float:
        return float(np.percentile([r.ttft_s for r in self.records], 90))

    @property
    def num_transferred_blocks(self) -> int:
        return sum(r.num_transferred_blocks for r in self.records)

    @property
    def num_preemptions(self) -> int:
        return sum(r.num_preemptions for r in self.records)

    @property
    def decisions(self) -> dict[RouteMode, int]:
        return {mode: sum(r.mode is mode for r in self.records) for mode in RouteMode}

    @property
    def makespan_s(self) -> float:
        return max((r.finish_s for r in self.records), default=0.0)


def simulate(trace: Sequence[TraceRequest], config: SimConfig) -> SimResult:
    """Replay `trace` (any order; arrivals are scheduled by time) under `config.policy`."""
    return _Simulation(trace, config).run()


class _Simulation:
    def __init__(self, trace: Sequence[TraceRequest], config: SimConfig) -> None:
        self.config = config
        self.queue = EventQueue()
        policy = "cache_aware" if config.policy == "oracle" else config.policy
        self.router = Router(
            config.cost, policy, config.optimistic_ttl_s, rng=random.Random(config.seed), clock=self._now
        )
        model = config.replica
        self.prefills = {
            f"p{i}": PrefillReplica(f"p{i}", model, self.queue, self._prefilled) for i in range(config.num_prefill)
        }
        self.decodes = {
            f"d{i}": DecodeReplica(f"d{i}", model, self.queue, self._first_token, self._finished)
            for i in range(config.num_decode)
        }
        self.replicas: list[PrefillReplica | DecodeReplica] = [*self.prefills.values(), *self.decodes.values()]
        self.requests = [SimRequest(t, hash_block_chain(t.prompt_token_ids, model.block_size)) for t in trace]
        for t in trace:
            if len(t.prompt_token_ids) + t.output_len > model.num_blocks * model.block_size:
                raise ValueError(f"request {t.request_id} does not fit one replica's KV pool; raise num_blocks")
        self.num_unfinished = len(self.requests)

    def run(self) -> SimResult:
        self.queue.at(0.0, self._periodic_sync)  # first, so the router knows every replica before any arrival
        for req in self.requests:
            self.queue.at(req.trace.arrival_s, functools.partial(self._arrive, req))
        self.queue.run()
        if self.num_unfinished:
            raise RuntimeError(f"{self.num_unfinished} requests stalled for KV room; raise the replicas' num_blocks")
        assert self.router.num_in_flight == 0
        num_referenced = sum(r.pool.stats().num_used_blocks for r in self.replicas)
        assert num_referenced == 0, f"{num_referenced} KV blocks leaked"
        counters = self.router.counters
        ordered = sorted(self.requests, key=lambda r: r.trace.arrival_s)
        return SimResult(
            self.config.policy,
            tuple(_record(r) for r in ordered),
            counters.expected_hit_tokens / max(counters.num_prompt_tokens, 1),
            num_referenced,
        )

    def _now(self) -> float:
        return self.queue.now

    def _sync_all(self) -> None:
        cursors = self.router.cursors()
        for replica in self.replicas:
            cursor = cursors.get(replica.replica_id, SyncCursor(None, 0))
            self.router.apply_report(replica.report(), replica.pool.events_since(cursor.seq, cursor.incarnation))

    def _periodic_sync(self) -> None:
        self._sync_all()
        if self.num_unfinished and len(self.queue):  # nothing else pending: the run is over (or stalled)
            self.queue.after(self.config.sync_period_s, self._periodic_sync)

    def _arrive(self, req: SimRequest) -> None:
        if self.config.policy == "oracle":
            self._sync_all()
        t = req.trace
        req.decision = self.router.route(t.request_id, req.block_hashes, len(t.prompt_token_ids), t.output_len)
        decode = self.decodes[req.decision.decode_replica_id]
        if req.decision.mode is RouteMode.LOCAL:
            self.queue.after(self.config.hop_overhead_s, lambda: decode.add_local(req))
        else:
            self.queue.after(self.config.hop_overhead_s, lambda: self._reserve(req))

    def _reserve(self, req: SimRequest) -> None:
        assert req.decision is not None and req.decision.prefill_replica_id is not None
        if not self.decodes[req.decision.decode_replica_id].reserve(req):
            self.queue.after(self.config.reserve_retry_s, lambda: self._reserve(req))
            return
        prefill = self.prefills[req.decision.prefill_replica_id]
        self.queue.after(self.config.hop_overhead_s, lambda: prefill.submit(req))

    def _prefilled(self, req: SimRequest) -> None:
        """P is done: push the blocks D lacks, then D commits (one hop back to the ingress)."""
        assert req.decision is not None
        block_size = self.config.replica.block_size
        num_blocks = -(-req.num_prompt_tokens // block_size)
        req.num_transferred_blocks = num_blocks - req.num_decode_cached_tokens // block_size
        num_missing = req.num_prompt_tokens - req.num_decode_cached_tokens
        transfer_s = num_missing * self.config.kv_bytes_per_token / self.config.bytes_per_s
        decode = self.decodes[req.decision.decode_replica_id]
        self.queue.after(transfer_s + self.config.hop_overhead_s, lambda: decode.commit(req))

    def _first_token(self, req: SimRequest) -> None:
        req.first_token_s = self.queue.now
        self.router.prefill_done(req.trace.request_id, req.num_cached_tokens)

    def _finished(self, req: SimRequest) -> None:
        req.finish_s = self.queue.now
        self.router.finish(req.trace.request_id)
        self.num_unfinished -= 1


def _record(req: SimRequest) -> RequestRecord:
    d = req.decision
    assert d is not None and req.first_token_s is not None and req.finish_s is not None
    return RequestRecord(
        req.trace.request_id, d.mode, d.prefill_replica_id, d.decode_replica_id, req.trace.arrival_s,
        req.first_token_s, req.finish_s, req.num_prompt_tokens, req.num_cached_tokens, req.num_computed_tokens,
        req.num_transferred_blocks, req.num_preemptions,
    )  # fmt: skip
