"""The replay simulator: a request trace through the real `Router` against modeled replicas, pools resized by a
scaling policy while it runs.

One discrete-event run, deterministic for a seed. The router sees what the real ingress sees: every live replica's
report and KV events once per `sync_period_s` (the "oracle" policy instead syncs right before each decision: the
same cost model with a perfect, instant index). A request's life, as in serve/handoff.py:

  disaggregated: route -> hop -> D reserves the prompt (reusing its cached blocks; waits in order for room)
                 -> hop -> P's scheduler -> P prefills the uncached tokens (chunked) -> D's missing blocks transfer
                 (P releases its blocks) -> hop -> D commits: first token, joins D's running batch
  local:         route -> hop -> D's scheduler prefills the missing tokens next to its decodes -> first token
then one token per decode step until `output_len`; blocks are freed at the end and stay cached until evicted.

Every `tick_s` the scaling policy sees the running replicas' signals and returns a target per pool: a new replica
is held (paid for) at once and serves after `startup_s`; on scale-down a starting replica is cancelled first, else
the running one with the least work drains (the router stops choosing it at once: `Router.retain`), finishes what
it has, and leaves.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from pdserve.kvcache import hash_block_chain
from pdserve.planner import POOLS
from pdserve.router.cost import CostConfig, RouteMode
from pdserve.router.index import SyncCursor
from pdserve.router.router import Router
from pdserve.sim.events import EventQueue
from pdserve.sim.replicas import DecodeReplica, PrefillReplica, ReplicaModel, SimRequest
from pdserve.sim.results import PoolCounts, PoolSample, ReplicaSpan, RequestRecord, SimResult
from pdserve.sim.scaling import PoolSnapshot, ReplicaSnapshot, ScalingPolicy
from pdserve.sim.trace import TraceRequest

SIM_POLICIES = ("cache_aware", "pow2", "oracle")

Replica = PrefillReplica | DecodeReplica


@dataclass(frozen=True)
class SimConfig:
    num_prefill: int = 2  # replicas at the start (and throughout without a scaling policy)
    num_decode: int = 2
    replica: ReplicaModel = field(default_factory=ReplicaModel)
    sync_period_s: float = 0.15  # the ingress polls every replica's report and KV events this often
    hop_overhead_s: float = 0.003  # one Ray call
    bytes_per_s: float = 5e9  # P -> D transfer bandwidth
    kv_bytes_per_token: int = 23040
    optimistic_ttl_s: float = 2.0
    policy: str = "cache_aware"  # routing
    cost: CostConfig = field(default_factory=CostConfig)  # the router's weights (see `calibrated_cost`)
    seed: int = 0
    tick_s: float = 5.0  # the scaling policy runs (and the timeline is sampled) this often
    startup_s: float = 60.0  # a requested replica serves this much later
    max_replicas: int | None = None  # prefill + decode held at once (targets beyond it are scaled down)

    def __post_init__(self) -> None:
        if self.policy not in SIM_POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; use one of {SIM_POLICIES}")
        if self.cost.block_size != self.replica.block_size:
            raise ValueError(f"cost.block_size {self.cost.block_size} != replica block_size {self.replica.block_size}")
        if self.num_decode < 1 or self.num_prefill < 1:
            raise ValueError("the simulator needs at least one prefill and one decode replica")
        if self.max_replicas is not None and self.max_replicas < max(2, self.num_prefill + self.num_decode):
            raise ValueError("max_replicas must hold the initial pools (and at least 2)")
        if self.tick_s <= 0 or self.startup_s < 0:
            raise ValueError("tick_s must be positive and startup_s not negative")


def calibrated_cost(config: SimConfig) -> CostConfig:
    """`config.cost` with its rate and size weights set to what the modeled replicas really cost; the policy knobs
    (local_prefill_max_tokens, local_prefill_queue_s, expected_output_tokens, disaggregation_overhead_s) are kept."""
    model = config.replica
    return dataclasses.replace(
        config.cost,
        prefill_tokens_per_s=model.prefill_tokens_per_s,
        local_prefill_tokens_per_s=model.prefill_tokens_per_s,
        decode_step_per_seq_s=model.per_decode_seq_s,
        kv_bytes_per_token=config.kv_bytes_per_token,
        same_node_bytes_per_s=config.bytes_per_s,
        block_size=model.block_size,
    )


def simulate(trace: Sequence[TraceRequest], config: SimConfig, scaling: ScalingPolicy | None = None) -> SimResult:
    """Replay `trace` (any order; arrivals are scheduled by time) under `config.policy`; pools stay at their initial
    sizes unless a `scaling` policy resizes them. Raises RuntimeError if requests stall for KV room."""
    return _Simulation(trace, config, scaling).run()


class _Simulation:
    def __init__(self, trace: Sequence[TraceRequest], config: SimConfig, scaling: ScalingPolicy | None) -> None:
        self.config = config
        self.scaling = scaling
        self.queue = EventQueue()
        policy = "cache_aware" if config.policy == "oracle" else config.policy
        self.router = Router(
            config.cost, policy, config.optimistic_ttl_s, rng=random.Random(config.seed), clock=self._now
        )
        model = config.replica
        for t in trace:
            if len(t.prompt_token_ids) + t.output_len > model.num_blocks * model.block_size:
                raise ValueError(f"request {t.request_id} does not fit one replica's KV pool; raise num_blocks")
            if not t.prompt_token_ids or t.output_len < 1:
                raise ValueError(f"request {t.request_id} needs a prompt token and an output token at least")
        self.requests = [SimRequest(t, hash_block_chain(t.prompt_token_ids, model.block_size)) for t in trace]
        self.num_unfinished = len(self.requests)
        self.replicas: dict[str, Replica] = {}  # every replica ever requested
        self.spans: dict[str, ReplicaSpan] = {}
        self.live: dict[str, dict[str, Replica]] = {pool: {} for pool in POOLS}  # serving, not draining
        self.starting: dict[str, list[ReplicaSpan]] = {pool: [] for pool in POOLS}  # oldest first
        self._ids = {pool: itertools.count() for pool in POOLS}
        for pool, n in (("prefill", config.num_prefill), ("decode", config.num_decode)):
            for _ in range(n):
                self._available(self._request_replica(pool))
        self.samples: list[PoolSample] = []
        self.num_arrivals = 0  # since the last sample

    def run(self) -> SimResult:
        self.queue.at(0.0, self._periodic_sync, daemon=True)  # first, so the router knows every replica
        self.queue.at(self.config.tick_s, self._tick, daemon=True)
        for req in self.requests:
            self.queue.at(req.trace.arrival_s, functools.partial(self._arrive, req))
        self.queue.run()
        if self.num_unfinished:
            raise RuntimeError(f"{self.num_unfinished} requests stalled for KV room; raise the replicas' num_blocks")
        assert self.router.num_in_flight == 0
        assert all(not r.seqs and r.num_ongoing == 0 for r in self.replicas.values())
        num_referenced = sum(r.pool.stats().num_used_blocks for r in self.replicas.values())
        assert num_referenced == 0, f"{num_referenced} KV blocks leaked"
        counters = self.router.counters
        ordered = sorted(self.requests, key=lambda r: r.trace.arrival_s)
        return SimResult(
            self.config.policy,
            tuple(_record(r) for r in ordered),
            counters.expected_hit_tokens / max(counters.num_prompt_tokens, 1),
            num_referenced,
            tuple(self.spans.values()),
            tuple(self.samples),
            {rid: r.signals(self.queue.now) for rid, r in self.replicas.items()},
        )

    def _now(self) -> float:
        return self.queue.now

    # ---- replicas coming and going -----------------------------------------------------------------------

    def _request_replica(self, pool: str) -> str:
        rid = f"{pool[0]}{next(self._ids[pool])}"
        model, queue = self.config.replica, self.queue
        replica: Replica
        if pool == "prefill":
            replica = PrefillReplica(rid, model, queue, self._prefilled)
        else:
            replica = DecodeReplica(rid, model, queue, self._reserved, self._first_token, self._finished)
        self.replicas[rid] = replica
        self.spans[rid] = span = ReplicaSpan(rid, pool, self.queue.now)
        self.starting[pool].append(span)
        return rid

    def _available(self, rid: str) -> None:
        span = self.spans[rid]
        if span.left_s is not None:  # cancelled while starting
            return
        span.available_s = self.queue.now
        self.starting[span.role].remove(span)
        self.live[span.role][rid] = replica = self.replicas[rid]
        self._sync(replica, self.router.cursors())

    def _resize(self, pool: str, target: int) -> None:
        starting, live = self.starting[pool], self.live[pool]
        for _ in range(target - len(live) - len(starting)):
            rid = self._request_replica(pool)
            self.queue.after(self.config.startup_s, functools.partial(self._available, rid), daemon=True)
        for _ in range(len(live) + len(starting) - target):
            if starting:
                starting.pop().left_s = self.queue.now  # the newest first
            elif len(live) > 1:
                self._drain(min(live.values(), key=_work))

    def _drain(self, replica: Replica) -> None:
        del self.live[replica.role][replica.replica_id]
        self.spans[replica.replica_id].drain_s = self.queue.now
        self.router.retain(replica.role, set(self.live[replica.role]))
        self._leave_if_drained(replica)

    def _leave_if_drained(self, replica: Replica) -> None:
        span = self.spans[replica.replica_id]
        if span.drain_s is not None and span.left_s is None and replica.is_idle:
            span.left_s = self.queue.now

    def _tick(self) -> None:
        if self.scaling is not None:
            snapshots = {pool: self._snapshot(pool) for pool in POOLS}
            self._scale(self.scaling.targets(self.queue.now, snapshots))
        self.samples.append(PoolSample(self.queue.now, self.num_arrivals, *(self._counts(p) for p in POOLS)))
        self.num_arrivals = 0
        self.queue.after(self.config.tick_s, self._tick, daemon=True)

    def _snapshot(self, pool: str) -> PoolSnapshot:
        now = self.queue.now
        running = {rid: ReplicaSnapshot(r.signals(now), r.num_ongoing) for rid, r in self.live[pool].items()}
        return PoolSnapshot(running, len(self.starting[pool]))

    def _scale(self, targets: dict[str, int]) -> None:
        """Resize each pool to its target (at least 1). With `max_replicas`, growth takes only free room (draining
        replicas hold theirs until they leave), one replica per pool in turn: a cluster places what fits and never
        evicts one pool for another."""
        wanted = {pool: max(targets[pool], 1) for pool in POOLS}
        for pool in POOLS:
            if wanted[pool] < self._num_asked(pool):
                self._resize(pool, wanted[pool])
        cap = self.config.max_replicas
        if cap is None:
            for pool in POOLS:
                self._resize(pool, max(wanted[pool], self._num_asked(pool)))
            return
        free = cap - sum(s.left_s is None for s in self.spans.values())
        while free > 0 and any(wanted[pool] > self._num_asked(pool) for pool in POOLS):
            for pool in POOLS:
                if free > 0 and wanted[pool] > self._num_asked(pool):
                    self._resize(pool, self._num_asked(pool) + 1)
                    free -= 1

    def _num_asked(self, pool: str) -> int:
        return len(self.live[pool]) + len(self.starting[pool])

    def _counts(self, pool: str) -> PoolCounts:
        states = [s.state_at(self.queue.now) for s in self.spans.values() if s.role == pool]
        return PoolCounts(states.count("live"), states.count("starting"), states.count("draining"))

    # ---- the router's view -------------------------------------------------------------------------------

    def _sync(self, replica: Replica, cursors: dict[str, SyncCursor]) -> None:
        cursor = cursors.get(replica.replica_id, SyncCursor(None, 0))
        self.router.apply_report(replica.report(), replica.pool.events_since(cursor.seq, cursor.incarnation))

    def _sync_all(self) -> None:
        cursors = self.router.cursors()
        for pool in POOLS:
            for replica in self.live[pool].values():
                self._sync(replica, cursors)

    def _periodic_sync(self) -> None:
        self._sync_all()
        self.queue.after(self.config.sync_period_s, self._periodic_sync, daemon=True)

    # ---- a request's life ----------------------------------------------------------------------------------

    def _arrive(self, req: SimRequest) -> None:
        self.num_arrivals += 1
        if self.config.policy == "oracle":
            self._sync_all()
        t = req.trace
        req.decision = d = self.router.route(t.request_id, req.block_hashes, len(t.prompt_token_ids), t.output_len)
        decode = self.replicas[d.decode_replica_id]
        decode.num_ongoing += 1
        if d.mode is RouteMode.LOCAL:
            assert isinstance(decode, DecodeReplica)
            self.queue.after(self.config.hop_overhead_s, lambda: decode.add_local(req))
        else:
            assert d.prefill_replica_id is not None
            self.replicas[d.prefill_replica_id].num_ongoing += 1
            assert isinstance(decode, DecodeReplica)
            self.queue.after(self.config.hop_overhead_s, lambda: decode.reserve(req))

    def _reserved(self, req: SimRequest) -> None:
        assert req.decision is not None and req.decision.prefill_replica_id is not None
        prefill = self.replicas[req.decision.prefill_replica_id]
        assert isinstance(prefill, PrefillReplica)
        self.queue.after(self.config.hop_overhead_s, lambda: prefill.submit(req))

    def _prefilled(self, req: SimRequest) -> None:
        """P is done: push the blocks D lacks (P holds its blocks meanwhile), then D commits (one hop back)."""
        block_size = self.config.replica.block_size
        num_blocks = -(-req.num_prompt_tokens // block_size)
        req.num_transferred_blocks = num_blocks - req.num_decode_cached_tokens // block_size
        num_missing = req.num_prompt_tokens - req.num_decode_cached_tokens
        transfer_s = num_missing * self.config.kv_bytes_per_token / self.config.bytes_per_s
        self.queue.after(transfer_s, lambda: self._transferred(req))

    def _transferred(self, req: SimRequest) -> None:
        assert req.decision is not None and req.decision.prefill_replica_id is not None
        prefill = self.replicas[req.decision.prefill_replica_id]
        assert isinstance(prefill, PrefillReplica)
        prefill.release(req)
        prefill.num_ongoing -= 1
        self._leave_if_drained(prefill)
        decode = self.replicas[req.decision.decode_replica_id]
        assert isinstance(decode, DecodeReplica)
        self.queue.after(self.config.hop_overhead_s, lambda: decode.commit(req))

    def _first_token(self, req: SimRequest) -> None:
        req.first_token_s = self.queue.now
        self.router.prefill_done(req.trace.request_id, req.num_cached_tokens)

    def _finished(self, req: SimRequest) -> None:
        assert req.decision is not None
        req.finish_s = self.queue.now
        self.router.finish(req.trace.request_id)
        decode = self.replicas[req.decision.decode_replica_id]
        decode.num_ongoing -= 1
        self._leave_if_drained(decode)
        self.num_unfinished -= 1


def _work(replica: Replica) -> tuple[int, int]:
    """What a replica still has to do, least first: its ongoing requests, then its sequences."""
    return replica.num_ongoing, len(replica.seqs)


def _record(req: SimRequest) -> RequestRecord:
    d = req.decision
    assert d is not None and req.first_token_s is not None and req.finish_s is not None
    return RequestRecord(
        req.trace.request_id, d.mode, d.prefill_replica_id, d.decode_replica_id, req.trace.arrival_s,
        req.first_token_s, req.finish_s, req.num_prompt_tokens, req.num_output_tokens, req.num_cached_tokens,
        req.num_computed_tokens, req.num_prefill_tokens, req.num_transferred_blocks, req.num_preemptions,
    )  # fmt: skip
