"""The planner: from every replica's signals and the SLOs, a target size for the prefill and the decode pool.

Each `plan` call (one autoscaling tick) turns the replicas' counters into rates since the previous tick, updates
the pool estimates (per-replica prefill throughput, the decode step-time fit, mean output length and KV blocks per
sequence: exponentially weighted, so one noisy interval cannot swing them), asks the queueing models how many
replicas each pool needs (`model.py`), and applies the policy around them:

- bounds: `[min_replicas, max_replicas]` per pool;
- scale up at once when a pool needs more, at most every `upscale_cooldown_s`;
- scale down only when the pool would still meet its SLOs with `downscale_headroom` more load, continuously for
  `downscale_stable_s`, one replica at a time, at most every `downscale_cooldown_s` (a replica drains before it
  leaves; removing several at once would also throw away their prefix caches at once);
- no measurements yet (a replica's first report gives no rate): keep the size the pool is meant to have now —
  Serve's target (its `num_replicas` at the app's start, one replica from Serve's cold start of a pool at zero), not
  the replicas already running; a pool with no work at all needs 0 and shrinks to `min_replicas` by the scale-down
  rule;
- a replica whose newest report is the one seen last tick (report and planner periods drift against each other)
  counts with its last rates: a pool's demand never drops for a report that has not arrived yet.

The planner is pure: no Ray, no clock of its own. Serve calls it through `serve/autoscaling.py`; the simulator calls
it directly (`pdserve.sim`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from pdserve.planner.model import (
    DecodeDemand,
    PrefillDemand,
    StepTimeFit,
    decode_replicas_needed,
    decode_step_base,
    decode_tpot,
    prefill_replicas_needed,
    prefill_ttft_p90,
)
from pdserve.planner.signals import ReplicaRates, ReplicaSignals, rates_between

logger = logging.getLogger(__name__)

POOLS = ("prefill", "decode")


@dataclass(frozen=True)
class PoolBounds:
    min_replicas: int = 1
    max_replicas: int = 8

    def clamp(self, n: int) -> int:
        return max(self.min_replicas, min(self.max_replicas, n))


@dataclass(frozen=True)
class PlannerConfig:
    ttft_slo_s: float = 2.0  # p90 time to first token
    tpot_slo_s: float = 0.1  # mean time per output token of a stream
    prefill: PoolBounds = field(default_factory=PoolBounds)
    decode: PoolBounds = field(default_factory=PoolBounds)
    max_utilization: float = 0.8  # prefill compute planned busy at most this share of the time
    recovery_s: float = 10.0  # a queued prefill backlog must drain within this
    kv_target_usage: float = 0.8  # decode KV planned full at most to this share
    tpot_target: float = 0.7  # decode planned for a mean TPOT of at most this share of the SLO (streams vary)
    max_seqs_per_replica: int = 64  # the engine's max_num_seqs
    ttft_overhead_s: float = 0.05  # routing, reservation, transfer and hops on top of the prompt's compute
    upscale_cooldown_s: float = 10.0
    downscale_cooldown_s: float = 60.0
    downscale_stable_s: float = 60.0
    downscale_headroom: float = 0.3  # scale down only if the smaller pool still meets the SLOs at 1.3x the load
    smoothing: float = 0.3  # weight of the newest interval in the running estimates
    demand_smoothing: float = 0.5  # weight of the newest interval in the demand (arrivals are noisy over seconds)
    max_total_replicas: int | None = None  # prefill + decode, where both pools share one set of devices
    # Priors until the replicas' own measurements arrive (SmolLM2-135M bf16 on a 2-core CPU).
    prior_prefill_tokens_per_s: float = 2900.0
    prior_decode_step_base_s: float = 0.021
    prior_decode_step_per_seq_s: float = 0.001
    prior_output_tokens: float = 128.0
    prior_blocks_per_seq: float = 16.0
    prior_prompt_tokens: float = 512.0  # computed tokens per prompt

    def bounds(self, pool: str) -> PoolBounds:
        return self.prefill if pool == "prefill" else self.decode

    def __post_init__(self) -> None:
        for pool in POOLS:
            b = self.bounds(pool)
            if not 0 <= b.min_replicas <= b.max_replicas:
                raise ValueError(f"{pool}: need 0 <= min_replicas <= max_replicas, got {b}")
        if self.ttft_slo_s <= 0 or self.tpot_slo_s <= 0:
            raise ValueError("SLOs must be positive")
        if not 0 < self.max_utilization < 1 or not 0 < self.kv_target_usage <= 1 or not 0 < self.tpot_target <= 1:
            raise ValueError("max_utilization must be in (0, 1), kv_target_usage and tpot_target in (0, 1]")
        if not 0 < self.smoothing <= 1 or not 0 < self.demand_smoothing <= 1:
            raise ValueError("smoothing and demand_smoothing must be in (0, 1]")
        # each divides in the models: a 0 raised ZeroDivisionError at every tick and froze the targets
        positive = (
            "recovery_s", "max_seqs_per_replica", "prior_prefill_tokens_per_s", "prior_decode_step_base_s",
            "prior_decode_step_per_seq_s", "prior_output_tokens", "prior_blocks_per_seq", "prior_prompt_tokens",
        )  # fmt: skip
        if bad := [name for name in positive if not getattr(self, name) > 0]:
            raise ValueError(f"must be positive: {', '.join(bad)}")
        floors = sum(self.bounds(pool).min_replicas for pool in POOLS)
        cap = self.max_total_replicas
        if cap is not None and cap < max(floors, 1):
            raise ValueError(f"max_total_replicas {cap} is below the pools' min_replicas together ({floors})")


@dataclass(frozen=True)
class PoolDecision:
    pool: str
    current: int  # replicas running now
    target: int  # what the pool should have (what Serve is told)
    needed: int  # what the model says the demand needs, before bounds, cooldowns and hysteresis
    reason: str  # one line: the bound that decided `needed` and what the policy did with it

    @property
    def changed(self) -> bool:
        return self.target != self.current


@dataclass
class _PoolState:
    target: int | None = None
    last_up_s: float = -math.inf
    last_down_s: float = -math.inf
    below_since_s: float | None = None


@dataclass
class _Estimates:
    prefill_tokens_per_s: float
    prompt_tokens: float
    output_tokens: float
    blocks_per_seq: float
    step_fit: StepTimeFit

    def blend(self, name: str, value: float | None, weight: float) -> None:
        if value is not None and value > 0 and math.isfinite(value):
            setattr(self, name, (1 - weight) * getattr(self, name) + weight * value)


class Planner:
    def __init__(self, config: PlannerConfig) -> None:
        self.config = config
        self.estimates = _Estimates(
            config.prior_prefill_tokens_per_s,
            config.prior_prompt_tokens,
            config.prior_output_tokens,
            config.prior_blocks_per_seq,
            StepTimeFit(config.prior_decode_step_base_s, config.prior_decode_step_per_seq_s),
        )
        self._last: dict[str, ReplicaSignals] = {}  # each replica's previous report
        self._last_rates: dict[str, ReplicaRates] = {}  # each replica's rates from its last two distinct reports
        self._pools = {pool: _PoolState() for pool in POOLS}
        self._demand: dict[str, float] = {}  # smoothed: prefill prompt tokens/s, decode requests/s
        self._current: dict[str, int] = {}
        self.prediction: dict[str, float] = {}  # the models' view at the current size, for metrics and logs

    def plan(
        self,
        now_s: float,
        signals: Mapping[str, Mapping[str, ReplicaSignals]],
        current: Mapping[str, int],
        targets: Mapping[str, int] | None = None,
    ) -> dict[str, PoolDecision]:
        """`signals[pool][replica_id]`: the latest report of each running replica; `current[pool]`: replicas the
        pool has now (some may not have reported yet); `targets[pool]`: what the pool is meant to have now (Serve's
        target: its `num_replicas` at the start, a cold start's one; None: the planner's own last target, else
        `current`). Returns a decision per pool."""
        live = {rid for pool in signals.values() for rid in pool}
        self._current = dict(current)
        fresh: dict[str, dict[str, ReplicaRates]] = {}
        rates: dict[str, dict[str, ReplicaRates]] = {}
        for pool in POOLS:
            fresh[pool], rates[pool] = self._rates(signals.get(pool, {}))
        self._update_estimates(fresh, signals)
        demands = {
            "prefill": self._prefill_demand(rates["prefill"], signals.get("prefill", {})),
            "decode": self._decode_demand(rates["decode"], signals.get("decode", {}), rates["prefill"]),
        }
        for pool in POOLS:  # the previous reports are kept only after every rate of this tick used them
            for rid, report in signals.get(pool, {}).items():
                before = self._last.get(rid)
                if before is None or report.time_s > before.time_s:
                    self._last[rid] = report
        for rid in set(self._last) - live:  # replicas that left; their ids never come back
            del self._last[rid]
            self._last_rates.pop(rid, None)
        blocks = max((s.kv_blocks_total for s in signals.get("decode", {}).values()), default=0.0)
        decisions = {}
        for pool in POOLS:
            demand = demands[pool]
            need = None if demand is None else self._needed(pool, demand, 1.0, blocks)
            if demand is not None:
                self._predict(pool, demand, max(current.get(pool, 1), 1))
            meant = targets.get(pool) if targets is not None else None
            decisions[pool] = self._decide(pool, now_s, current.get(pool, 0), meant, need, demand, blocks)
        return self._cap(decisions, now_s)

    def _cap(self, decisions: dict[str, PoolDecision], now_s: float) -> dict[str, PoolDecision]:
        """With `max_total_replicas`, targets beyond it are split in proportion to what each pool needs (each at
        least its minimum): a replica moves from the pool with room to spare to the one short of it at once — unless
        that pool itself grew within `downscale_cooldown_s`, which keeps it as it would from its own scale-down. A
        cut counts as a scale-down (cool-downs start). Without both, pools whose needs alternated moved a replica
        back and forth every tick or two (each move a drain and a cold start; found in review)."""
        cap, cool_s = self.config.max_total_replicas, self.config.downscale_cooldown_s
        if cap is None or sum(d.target for d in decisions.values()) <= cap:
            return decisions
        floors = {pool: self.config.bounds(pool).min_replicas for pool in POOLS}
        # what each pool can use: a need past its max_replicas would take a share that pool never fills
        wants = {pool: self.config.bounds(pool).clamp(max(decisions[pool].needed, 1)) for pool in POOLS}
        room = max(cap - sum(floors.values()), 0)
        extra = {pool: wants[pool] - floors[pool] for pool in POOLS}
        total_extra = sum(extra.values()) or 1
        shares = {pool: room * extra[pool] / total_extra for pool in POOLS}
        given = {pool: floors[pool] + int(shares[pool]) for pool in POOLS}
        for pool in sorted(POOLS, key=lambda p: shares[p] - int(shares[p]), reverse=True):
            if sum(given.values()) < cap and given[pool] < wants[pool]:
                given[pool] += 1
        # A pool that grew within downscale_cooldown_s keeps what it got (as it would keep it from its own
        # scale-down): the other pool waits for room instead of taking it back at once.
        kept = [
            pool for pool in POOLS
            if decisions[pool].target > given[pool] and 0 < now_s - self._pools[pool].last_up_s < cool_s
        ]  # fmt: skip
        for pool in kept:
            others = [p for p in POOLS if p != pool]
            room_left = cap - decisions[pool].target - sum(given[p] for p in others)
            if room_left >= 0 or all(given[p] + room_left >= floors[p] for p in others):  # two pools: one other
                given[pool] = decisions[pool].target
                for other in others:
                    given[other] = min(given[other], max(floors[other], cap - decisions[pool].target))
        out = {}
        for pool, d in decisions.items():
            target = min(d.target, given[pool]) if d.target > given[pool] else d.target
            if target != d.target:
                state = self._pools[pool]
                state.target, state.last_down_s, state.below_since_s = target, now_s, None
                d = PoolDecision(pool, d.current, target, d.needed, f"{d.reason}; capped at {target} of {cap} in all")
            out[pool] = d
        return out

    # ---- measurements ------------------------------------------------------------------------------------

    def _rates(self, replicas: Mapping[str, ReplicaSignals]) -> tuple[dict[str, ReplicaRates], dict[str, ReplicaRates]]:
        """The rates of the replicas that reported anew since the last tick (they update the estimates), and those
        plus the last rates of replicas whose newest report is the one seen last tick (the pool's demand)."""
        fresh, out = {}, {}
        for rid, now in replicas.items():
            before = self._last.get(rid)
            rates = rates_between(before, now) if before is not None else None
            if rates is not None:
                fresh[rid] = out[rid] = self._last_rates[rid] = rates
            elif before is not None and now.time_s == before.time_s and rid in self._last_rates:
                out[rid] = self._last_rates[rid]  # not reported again yet: its last interval stands for it
        return fresh, out

    def _update_estimates(
        self, rates: dict[str, dict[str, ReplicaRates]], signals: Mapping[str, Mapping[str, ReplicaSignals]]
    ) -> None:
        w = self.config.smoothing
        est = self.estimates
        for r in rates["prefill"].values():
            if r.busy_fraction >= 0.05:  # a replica idle nearly all the interval says little about its throughput
                est.blend("prefill_tokens_per_s", r.prefill_tokens_per_busy_s, w)
        finished = sum(r.finished_per_s for r in rates["decode"].values())
        generated = sum(r.generated_tokens_per_s for r in rates["decode"].values())
        if finished > 0:
            est.blend("output_tokens", generated / finished, w)
        for r in rates["decode"].values():
            if r.decode_batch is not None and r.decode_step_s is not None:
                est.step_fit.add(r.decode_batch, r.decode_step_s)
        decodes = list(signals.get("decode", {}).values())
        holding = sum(s.num_running + s.num_waiting_with_kv for s in decodes)  # commits waiting for a seat hold KV
        if holding > 0:
            used = sum(s.kv_blocks_used - s.kv_blocks_reserved for s in decodes)
            est.blend("blocks_per_seq", used / holding, w)

    def _prefill_demand(
        self, rates: dict[str, ReplicaRates], replicas: Mapping[str, ReplicaSignals]
    ) -> PrefillDemand | None:
        if not rates:
            return None
        computed = sum(r.prefill_tokens_per_s for r in rates.values())
        requests = sum(r.requests_per_s for r in rates.values())
        queued = sum(s.queued_prefill_tokens for s in replicas.values())
        # demand = what was computed + what the backlog grew by, both over each replica's last interval (a replica
        # not reported again yet stands for both with its last one, so a late report does not drop the demand)
        growth = sum(r.queued_prefill_growth_per_s for r in rates.values())
        tokens = max(computed + growth, 0.0)
        # What each prompt needs computed: what was computed plus what the backlog grew by is what arrived less its
        # cache hits (a prompt queues whole and drops its hit when admitted), so a backlog's growth is not a longer
        # prompt and a long cached prefix not a slower one.
        if requests > 0 and tokens > 0:
            self.estimates.blend("prompt_tokens", tokens / requests, self.config.smoothing)
        is_idle = tokens <= 0 and queued <= 0
        return PrefillDemand(self._smoothed("prefill", tokens), self.estimates.prompt_tokens, queued, is_idle)

    def _smoothed(self, name: str, value: float) -> float:
        w = self.config.demand_smoothing
        before = self._demand.get(name)
        self._demand[name] = value if before is None else (1 - w) * before + w * value
        return self._demand[name]

    def _decode_demand(
        self,
        rates: dict[str, ReplicaRates],
        replicas: Mapping[str, ReplicaSignals],
        prefill_rates: dict[str, ReplicaRates],
    ) -> DecodeDemand | None:
        """Requests reach the decode pool at the larger of its own arrivals and the prefill pool's: every prompt
        prefilled there streams from here, and while reservations are refused the decode pool counts only those it
        took (the pools are sized together from one view)."""
        if not rates:
            return None
        own = sum(r.requests_per_s for r in rates.values())
        prefilled = sum(r.requests_per_s for r in prefill_rates.values())
        requests = self._smoothed("decode", max(own, prefilled))
        running = sum(s.num_running for s in replicas.values())
        waiting = sum(s.num_waiting for s in replicas.values())
        is_idle = max(own, prefilled) <= 0 and running <= 0 and waiting <= 0
        steps = [(r.step_s, r.busy_fraction) for r in rates.values() if r.step_s is not None]
        observed = (
            sum(t * b for t, b in steps) / sum(b for _, b in steps) if steps and any(b for _, b in steps) else None
        )
        est = self.estimates
        return DecodeDemand(
            requests, est.output_tokens, est.blocks_per_seq, running, waiting,
            kv_blocks_used=sum(s.kv_blocks_used for s in replicas.values()),
            kv_refused=any(r.reserves_refused_per_s > 0 for r in rates.values()),
            observed_step_s=observed, is_idle=is_idle,
        )  # fmt: skip

    # ---- the models ----------------------------------------------------------------------------------------

    def _needed(self, pool: str, demand: PrefillDemand | DecodeDemand, scale: float, blocks: float) -> tuple[int, str]:
        """Replicas the pool needs for `scale` times the demand, and why (one line)."""
        cfg = self.config
        if isinstance(demand, PrefillDemand):
            if demand.is_idle or (demand.tokens_per_s <= 0 and demand.queued_tokens <= 0):
                return 0, "idle"
            scaled = PrefillDemand(demand.tokens_per_s * scale, demand.mean_prompt_tokens, demand.queued_tokens)
            mu = self.estimates.prefill_tokens_per_s
            n, bound = prefill_replicas_needed(
                scaled, mu, cfg.ttft_slo_s, cfg.max_utilization, cfg.recovery_s, cfg.ttft_overhead_s
            )
            return n, (
                f"{bound}: {demand.tokens_per_s:.0f} prompt tok/s, {demand.queued_tokens:.0f} queued, "
                f"{mu:.0f} tok/s per replica"
            )
        if demand.is_idle or (demand.requests_per_s <= 0 and demand.num_running <= 0 and demand.num_waiting <= 0):
            return 0, "idle"
        scaled_d = dataclasses.replace(
            demand,
            requests_per_s=demand.requests_per_s * scale,
            num_running=demand.num_running * scale,
            kv_blocks_used=demand.kv_blocks_used * scale,
        )
        t0, t1 = self.estimates.step_fit.coefficients()
        current = self._current.get("decode", 0)
        n, bound = decode_replicas_needed(
            scaled_d, t0, t1, cfg.tpot_slo_s * cfg.tpot_target, blocks or math.inf, cfg.kv_target_usage,
            cfg.max_seqs_per_replica, current=current,
            base_s=decode_step_base(demand, t0, t1, current),  # the step's base as observed: load scales, it does not
        )  # fmt: skip
        return n, (
            f"{bound}: {demand.requests_per_s:.2f} req/s x {demand.mean_output_tokens:.0f} tokens, step "
            f"{t0 * 1e3:.1f} + {t1 * 1e3:.2f}/seq ms, {demand.num_running:.0f} running, "
            f"{demand.num_waiting:.0f} waiting"
        )

    def _predict(self, pool: str, demand: PrefillDemand | DecodeDemand, n: int) -> None:
        if isinstance(demand, PrefillDemand):
            self.prediction["prefill_demand_tokens_per_s"] = demand.tokens_per_s
            self.prediction["prefill_ttft_p90_s"] = prefill_ttft_p90(
                n, demand, self.estimates.prefill_tokens_per_s, self.config.ttft_overhead_s
            )
        else:
            t0, t1 = self.estimates.step_fit.coefficients()
            self.prediction["decode_requests_per_s"] = demand.requests_per_s
            self.prediction["decode_tpot_s"] = decode_tpot(n, demand, t0, t1)

    # ---- policy --------------------------------------------------------------------------------------------

    def _decide(
        self,
        pool: str,
        now_s: float,
        current: int,
        meant: int | None,
        need: tuple[int, str] | None,
        demand: PrefillDemand | DecodeDemand | None,
        blocks: float,
    ) -> PoolDecision:
        cfg = self.config
        bounds = cfg.bounds(pool)
        state = self._pools[pool]
        if need is None or demand is None:  # the size the pool is meant to have: not the replicas up so far
            kept = meant if meant is not None else state.target if state.target is not None else current
            state.target = target = bounds.clamp(kept)
            return PoolDecision(pool, current, target, target, "no measurements yet: keep the size")
        target = bounds.clamp(state.target if state.target is not None else meant if meant is not None else current)
        state.target = target
        needed, why = need
        wanted = bounds.clamp(needed)
        since_change = now_s - max(state.last_up_s, state.last_down_s)
        if wanted > target:
            state.below_since_s = None
            if since_change < cfg.upscale_cooldown_s:
                return PoolDecision(pool, current, target, needed, f"{why}; {wanted} after the cool-down")
            state.target, state.last_up_s = wanted, now_s
            return PoolDecision(pool, current, wanted, needed, f"scale up {target} -> {wanted}: {why}")
        smaller = target - 1
        if wanted < target and self._needed(pool, demand, 1.0 + cfg.downscale_headroom, blocks)[0] <= smaller:
            if state.below_since_s is None:
                state.below_since_s = now_s
            stable = now_s - state.below_since_s
            if stable >= cfg.downscale_stable_s and since_change >= cfg.downscale_cooldown_s:
                state.target, state.last_down_s, state.below_since_s = smaller, now_s, None
                return PoolDecision(pool, current, smaller, needed, f"scale down {target} -> {smaller}: {why}")
            return PoolDecision(pool, current, target, needed, f"{why}; {smaller} would do for {stable:.0f} s")
        state.below_since_s = None
        return PoolDecision(pool, current, target, needed, why)
