"""What one simulated run gives back: every request's timeline, every replica's lifetime, the pools tick by tick,
and what they add up to (hit rate, SLO attainment, goodput per replica-hour)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pdserve.planner.signals import ReplicaSignals
from pdserve.router.cost import RouteMode


@dataclass(frozen=True)
class SLO:
    ttft_s: float  # time to first token, per request
    tpot_s: float  # mean time per output token after the first, per request


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
    num_output_tokens: int
    num_cached_tokens: int  # realized hit on the replica that computed the prompt
    num_computed_tokens: int  # prompt tokens that replica computed
    num_prefill_tokens: int  # prompt tokens computed for it, on any replica (again after a preemption)
    num_transferred_blocks: int  # blocks the decode replica lacked (0 when local)
    num_preemptions: int  # times a replica evicted it for room and recomputed it

    @property
    def ttft_s(self) -> float:
        return self.first_token_s - self.arrival_s

    @property
    def tpot_s(self) -> float:
        """Mean time per output token after the first (0 for a one-token output)."""
        return (self.finish_s - self.first_token_s) / max(self.num_output_tokens - 1, 1)

    @property
    def e2e_s(self) -> float:
        return self.finish_s - self.arrival_s

    def meets(self, slo: SLO) -> bool:
        return self.ttft_s <= slo.ttft_s and self.tpot_s <= slo.tpot_s


@dataclass
class ReplicaSpan:
    """A replica's life: held (paid for) from `requested_s` until `left_s` (None: to the end of the run)."""

    replica_id: str
    role: str
    requested_s: float
    available_s: float | None = None  # None: still starting (or cancelled before it started)
    drain_s: float | None = None  # the router stopped choosing it; it finishes its work, then leaves
    left_s: float | None = None

    def held_s(self, end_s: float) -> float:
        left_s = end_s if self.left_s is None else min(self.left_s, end_s)
        return max(left_s - self.requested_s, 0.0)

    def state_at(self, time_s: float) -> str:
        """One of starting, live, draining, or empty when not held at `time_s`."""
        if time_s < self.requested_s or (self.left_s is not None and time_s >= self.left_s):
            return ""
        if self.available_s is None or time_s < self.available_s:
            return "starting"
        return "live" if self.drain_s is None or time_s < self.drain_s else "draining"


@dataclass(frozen=True)
class PoolCounts:
    live: int
    starting: int
    draining: int

    @property
    def held(self) -> int:
        return self.live + self.starting + self.draining


@dataclass(frozen=True)
class PoolSample:
    """The pools at a scaling tick, and the arrivals since the previous one."""

    time_s: float
    num_arrivals: int
    prefill: PoolCounts
    decode: PoolCounts


@dataclass(frozen=True)
class TimelinePoint:
    time_s: float  # end of the window
    arrivals_per_s: float
    prefill: PoolCounts
    decode: PoolCounts
    ttft_p90_s: float | None  # of the requests finishing in the window; None when none did
    tpot_p90_s: float | None


@dataclass(frozen=True)
class SimResult:
    policy: str
    records: tuple[RequestRecord, ...]  # in arrival order
    expected_hit_rate: float  # what the router's decisions expected (a stale index overestimates)
    num_referenced_blocks_at_end: int  # over every pool; anything but 0 is a leak
    spans: tuple[ReplicaSpan, ...] = ()
    samples: tuple[PoolSample, ...] = ()
    final_signals: dict[str, ReplicaSignals] = field(default_factory=dict)  # every replica's, at the end

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

    @property
    def replica_hours(self) -> float:
        """Replicas held (prefill + decode, starting and draining ones too) integrated over the run, in hours."""
        return sum(s.held_s(self.makespan_s) for s in self.spans) / 3600

    def num_good(self, slo: SLO) -> int:
        """Goodput: requests meeting both the TTFT and the TPOT SLO."""
        return sum(r.meets(slo) for r in self.records)

    def attainment(self, slo: SLO) -> float:
        return self.num_good(slo) / max(len(self.records), 1)

    def goodput_per_replica_hour(self, slo: SLO) -> float:
        return self.num_good(slo) / self.replica_hours if self.replica_hours > 0 else 0.0

    def timeline(self) -> list[TimelinePoint]:
        """One point per scaling tick: arrival rate, pool sizes, and p90 TTFT/TPOT of the requests finishing in the
        window that ends there."""
        by_finish = sorted(self.records, key=lambda r: r.finish_s)
        finish_s = [r.finish_s for r in by_finish]
        points, start_s, lo = [], 0.0, 0
        for s in self.samples:
            hi = int(np.searchsorted(finish_s, s.time_s, side="right"))
            done = by_finish[lo:hi]
            ttft = float(np.percentile([r.ttft_s for r in done], 90)) if done else None
            tpot = float(np.percentile([r.tpot_s for r in done], 90)) if done else None
            rate = s.num_arrivals / (s.time_s - start_s) if s.time_s > start_s else 0.0
            points.append(TimelinePoint(s.time_s, rate, s.prefill, s.decode, ttft, tpot))
            start_s, lo = s.time_s, hi
        return points
