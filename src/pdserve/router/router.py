"""`Router`: one ingress's global router — the prefix index, the load view, and the cost model, kept together.

Pure Python (no Ray): the Serve glue feeds it replica reports and calls `route` / `prefill_done` / `finish`; the
replay simulator drives the very same object against modeled replicas.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pdserve.kvcache import KVEventBatch
from pdserve.router.cost import CostConfig, RouteDecision, RouteMode, choose
from pdserve.router.index import PrefixIndex, SyncCursor
from pdserve.router.load import ReplicaLoad, ReplicaReport

logger = logging.getLogger(__name__)

POLICIES = ("cache_aware", "pow2")


@dataclass
class RouterCounters:
    decisions: dict[str, int] = field(default_factory=lambda: {m.value: 0 for m in RouteMode})
    num_prompt_tokens: int = 0
    expected_hit_tokens: int = 0  # what decisions expected the computing replica to hold
    realized_hit_tokens: int = 0  # what the computing replicas reported
    expected_transfer_tokens: int = 0


@dataclass
class _InFlight:
    decision: RouteDecision
    computing_replica_id: str  # where the prompt's prefill tokens are counted
    decode_replica_id: str  # where it is counted as a decode: the decision's, until `move` says otherwise
    num_prefill_tokens: int
    is_prefilled: bool = False


class Router:
    def __init__(
        self,
        config: CostConfig,
        policy: str = "cache_aware",
        optimistic_ttl_s: float = 2.0,
        replica_timeout_s: float = 10.0,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown routing policy {policy!r}; use one of {POLICIES}")
        self.config = config
        self.policy = policy
        self.replica_timeout_s = replica_timeout_s
        self.rng = rng or random.Random()
        self.clock = clock
        self.index = PrefixIndex(optimistic_ttl_s, clock)
        self.loads: dict[str, ReplicaLoad] = {}
        self.counters = RouterCounters()
        self._in_flight: dict[str, _InFlight] = {}

    # ---- replica state -----------------------------------------------------------------------------------

    def cursors(self) -> dict[str, SyncCursor]:
        """What to ask each known replica for (unknown replicas send a snapshot on first contact)."""
        return {rid: self.index.cursor(rid) for rid in self.loads}

    def apply_report(self, report: ReplicaReport, events: KVEventBatch) -> None:
        """Update a replica's stats and apply its KV events (a replica seen for the first time joins)."""
        load = self.loads.get(report.replica_id)
        if load is None:
            load = self.loads[report.replica_id] = ReplicaLoad(
                report.replica_id, report.role, report.node_id, report.num_blocks, report.num_free_blocks
            )
            self._recount(load)
        load.num_blocks = report.num_blocks
        load.num_free_blocks = report.num_free_blocks
        load.num_reported_running, load.num_reported_waiting = report.num_running, report.num_waiting
        # Beyond this router's own counts: other ingress replicas' work. The report is a period old and this
        # router's counts run ahead of it (a request counts from its routing, before it reaches the replica), so
        # the difference errs low, never counting this router's own requests twice.
        load.num_others_prefill_tokens = max(0, report.queued_prefill_tokens - load.num_prefill_tokens)
        if load.role == "decode":
            load.num_others_decodes = max(0, report.num_running + report.num_waiting - load.num_decodes)
        load.reported_at = self.clock()
        self.index.apply(report.replica_id, events)

    def drop_silent_replicas(self) -> list[str]:
        """Forget replicas that have not reported for `replica_timeout_s` (they left or hang); returns their ids."""
        deadline = self.clock() - self.replica_timeout_s
        return self._remove([rid for rid, load in self.loads.items() if load.reported_at < deadline])

    def retain(self, role: str, replica_ids: set[str]) -> list[str]:
        """Forget the replicas of `role` not in `replica_ids`, the pool's whole live set (Serve stopped sending to
        the others: removed, draining); returns their ids. New work never goes to them from now on."""
        return self._remove([rid for rid, load in self.loads.items() if load.role == role and rid not in replica_ids])

    def _recount(self, load: ReplicaLoad) -> None:
        """A replica (re)joining: count the requests in flight there, as `finish` will take them off. One that was
        dropped while silent (its pool's sync timed out) may still run requests routed to it before."""
        for flight in self._in_flight.values():
            if flight.computing_replica_id == load.replica_id and not flight.is_prefilled:
                load.num_prefill_tokens += flight.num_prefill_tokens
            if flight.decode_replica_id == load.replica_id:
                load.num_decodes += 1

    def _remove(self, replica_ids: list[str]) -> list[str]:
        for rid in replica_ids:
            del self.loads[rid]
            self.index.remove_replica(rid)
        return replica_ids

    # ---- requests ----------------------------------------------------------------------------------------

    def route(
        self, request_id: str, block_hashes: Sequence[int], num_prompt_tokens: int, max_new_tokens: int
    ) -> RouteDecision:
        """Choose the (prefill, decode) pair and count the request as in flight there until `finish`.
        Raises ValueError when no decode replica is known."""
        decodes = [load for load in self.loads.values() if load.role == "decode"]
        prefills = [load for load in self.loads.values() if load.role == "prefill"]
        matched = self.index.match(block_hashes)
        if self.policy == "pow2":
            decision = self._pow2(request_id, block_hashes, num_prompt_tokens, matched, decodes, prefills)
        else:
            decision = choose(
                self.config, request_id, block_hashes, num_prompt_tokens, max_new_tokens, matched, decodes, prefills,
                self.rng,
            )  # fmt: skip
        self._start(decision, matched)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("route %s", decision.summary())
        return decision

    def prefill_done(self, request_id: str, num_cached_tokens: int) -> None:
        """The prompt is computed (first token out); `num_cached_tokens` is the computing replica's real hit."""
        flight = self._in_flight.get(request_id)
        if flight is None or flight.is_prefilled:
            return
        flight.is_prefilled = True
        self.counters.realized_hit_tokens += num_cached_tokens
        self._count_prefill(flight.computing_replica_id, -flight.num_prefill_tokens)
        if flight.decode_replica_id != flight.computing_replica_id:  # its KV is on its way there, or arrived
            hashes = flight.decision.prompt_block_hashes
            self._record_optimistic(flight.decode_replica_id, hashes, self.index.match(hashes))

    def _record_optimistic(self, replica_id: str, block_hashes: Sequence[int], matched: dict[str, int]) -> None:
        self.index.record_optimistic(replica_id, block_hashes[matched.get(replica_id, 0) :])

    def finish(self, request_id: str) -> None:
        """The request ended (any way); idempotent."""
        flight = self._in_flight.pop(request_id, None)
        if flight is None:
            return
        if not flight.is_prefilled:
            self._count_prefill(flight.computing_replica_id, -flight.num_prefill_tokens)
        decode = self.loads.get(flight.decode_replica_id)
        if decode is not None:
            decode.num_decodes -= 1

    def move(
        self, request_id: str, *, decode_replica_id: str | None = None, computing_replica_id: str | None = None
    ) -> None:
        """The request's work went elsewhere than routed: its reservation landed on another decode replica (the
        runner-up, Serve's pick, a migrated stream's), or another replica computes its prompt (a prefill retried on
        the runner-up; the decode replica, once every prefill attempt failed). Its counts follow it, as `finish`
        will take them off there; a replica the router does not know counts it when it joins (`_recount`). An
        unknown or ended request: nothing."""
        flight = self._in_flight.get(request_id)
        if flight is None:
            return
        if computing_replica_id is not None and computing_replica_id != flight.computing_replica_id:
            if not flight.is_prefilled:
                self._count_prefill(flight.computing_replica_id, -flight.num_prefill_tokens)
                self._count_prefill(computing_replica_id, flight.num_prefill_tokens)
            flight.computing_replica_id = computing_replica_id
        if decode_replica_id is not None and decode_replica_id != flight.decode_replica_id:
            if (old := self.loads.get(flight.decode_replica_id)) is not None:
                old.num_decodes -= 1
            if (new := self.loads.get(decode_replica_id)) is not None:
                new.num_decodes += 1
            flight.decode_replica_id = decode_replica_id

    def _count_prefill(self, replica_id: str, num_tokens: int) -> None:
        if (load := self.loads.get(replica_id)) is not None:
            load.num_prefill_tokens += num_tokens

    @property
    def num_in_flight(self) -> int:
        return len(self._in_flight)

    def _start(self, decision: RouteDecision, matched: dict[str, int]) -> None:
        computing_id = decision.prefill_replica_id or decision.decode_replica_id
        num_compute = decision.num_prompt_tokens - decision.expected_cached_tokens
        decode_id = decision.decode_replica_id
        self._in_flight[decision.request_id] = _InFlight(decision, computing_id, decode_id, num_compute)
        self.loads[computing_id].num_prefill_tokens += num_compute
        decode = self.loads[decode_id]
        decode.num_decodes += 1
        num_new_blocks = -(-decision.num_prompt_tokens // self.config.block_size) - (
            (decision.num_prompt_tokens - decision.expected_transfer_tokens) // self.config.block_size
            if decision.mode is RouteMode.DISAGGREGATED
            else decision.expected_cached_tokens // self.config.block_size
        )
        decode.num_free_blocks -= max(num_new_blocks, 0)
        # The replica computing the prompt holds its blocks from now on, for the next equal prompts (the tail past
        # what it holds: the rest is known already). A disaggregated route's decode replica holds them only once
        # the transfer is committed there: recorded at `prefill_done` — recorded now, a burst of equal prompts went
        # LOCAL on it and each computed the whole prompt there (blocks still in flight are not shared).
        self._record_optimistic(computing_id, decision.prompt_block_hashes, matched)
        c = self.counters
        c.decisions[decision.mode.value] += 1
        c.num_prompt_tokens += decision.num_prompt_tokens
        c.expected_hit_tokens += decision.expected_cached_tokens
        c.expected_transfer_tokens += decision.expected_transfer_tokens

    def _pow2(
        self,
        request_id: str,
        block_hashes: Sequence[int],
        num_prompt_tokens: int,
        matched: dict[str, int],
        decodes: list[ReplicaLoad],
        prefills: list[ReplicaLoad],
    ) -> RouteDecision:
        """The baseline (Serve's default): two random candidates per pool, the less loaded one wins; no affinity."""
        if not decodes or not prefills:
            raise ValueError("pow2 routing needs a decode and a prefill replica")
        decode = min(self.rng.sample(decodes, min(2, len(decodes))), key=lambda d: d.decodes)
        prefill = min(self.rng.sample(prefills, min(2, len(prefills))), key=lambda p: p.queued_prefill_tokens)
        bs = self.config.block_size
        max_hit = max(num_prompt_tokens - 1, 0) // bs * bs
        hit_p = min(matched.get(prefill.replica_id, 0) * bs, max_hit)
        hit_d = min(matched.get(decode.replica_id, 0) * bs, max_hit)
        return RouteDecision(
            request_id, RouteMode.DISAGGREGATED, decode.replica_id, prefill.replica_id, num_prompt_tokens, hit_p,
            num_prompt_tokens - hit_d, tuple(block_hashes), (decode.replica_id,), (), (),
        )  # fmt: skip
