"""Scaling policies the simulator calls every `tick_s`: the planner, fixed sizes, and Ray Serve's default.

A policy sees each pool's running replicas (started, not draining) with their latest `ReplicaSignals` and their
ongoing requests, and returns a target size per pool; the simulation starts or drains replicas to reach it.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from pdserve.planner import POOLS, Planner, PlannerConfig, PoolDecision
from pdserve.planner.signals import ReplicaSignals


@dataclass(frozen=True)
class ReplicaSnapshot:
    signals: ReplicaSignals
    num_ongoing: int  # requests routed to it and not done there: Serve's "ongoing requests"


@dataclass(frozen=True)
class PoolSnapshot:
    replicas: Mapping[str, ReplicaSnapshot]  # running: started and not draining
    num_starting: int

    @property
    def target(self) -> int:
        """What the pool was last asked to hold."""
        return len(self.replicas) + self.num_starting


class ScalingPolicy(Protocol):
    name: str

    def targets(self, now_s: float, pools: Mapping[str, PoolSnapshot]) -> dict[str, int]:
        """Target replicas per pool ("prefill", "decode"), starting ones included."""


@dataclass
class FixedPolicy:
    prefill: int
    decode: int
    name: str = "fixed"

    def targets(self, now_s: float, pools: Mapping[str, PoolSnapshot]) -> dict[str, int]:
        return {"prefill": self.prefill, "decode": self.decode}


class PlannerPolicy:
    """`pdserve.planner.Planner`, fed what Serve would feed it: the running replicas' signals and their count."""

    name = "planner"

    def __init__(self, config: PlannerConfig) -> None:
        self.planner = Planner(config)
        self.decisions: list[tuple[float, dict[str, PoolDecision]]] = []  # every tick's, for logs and tests

    def targets(self, now_s: float, pools: Mapping[str, PoolSnapshot]) -> dict[str, int]:
        signals = {pool: {rid: r.signals for rid, r in pools[pool].replicas.items()} for pool in POOLS}
        decisions = self.planner.plan(now_s, signals, {pool: len(pools[pool].replicas) for pool in POOLS})
        self.decisions.append((now_s, decisions))
        return {pool: d.target for pool, d in decisions.items()}


# ---- Ray Serve's default autoscaling, one deployment per pool --------------------------------------------------
# Reproduced from ray/serve/autoscaling_policy.py (Ray 2.60): `_core_replica_queue_length_policy` (desired =
# running x total ongoing / (target_ongoing_requests x running)), `_apply_scaling_factors`, `_apply_default_params`
# (no delay when nothing runs) and `_apply_delay_logic` (a direction held for upscale_delay_s / downscale_delay_s);
# the cold-start path of `_get_cold_start_scale_up_replicas`; then `AutoscalingState.apply_bounds`. Ongoing requests
# are averaged over `look_back_period_s` (Serve's default aggregation, MEAN), from samples taken at each tick.


@dataclass(frozen=True)
class ServeAutoscalingConfig:
    """Serve's `AutoscalingConfig` fields the default policy reads, with Serve's defaults."""

    min_replicas: int = 1
    max_replicas: int = 8
    target_ongoing_requests: float = 2.0
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0
    downscale_to_zero_delay_s: float | None = None
    look_back_period_s: float = 30.0
    upscaling_factor: float = 1.0  # smoothing_factor when unset
    downscaling_factor: float = 1.0

    def clamp(self, n: int) -> int:
        return max(self.min_replicas, min(self.max_replicas, n))


@dataclass(frozen=True)
class DelayState:
    """Serve's policy state: the sign of `counter` is the direction wanted since `since_s`."""

    counter: int = 0
    since_s: float | None = None


_DELAY_ELAPSED_EPS_S = 1e-6  # Serve's tolerance on elapsed-time comparisons


def serve_default_decision(
    total_ongoing: float,
    num_running: int,
    target: int,
    config: ServeAutoscalingConfig,
    state: DelayState,
    now_s: float,
) -> tuple[int, DelayState]:
    """One decision of Serve's controller for a deployment: `total_ongoing` requests over its `num_running` running
    replicas (averaged over the look-back window), `target` its current target. Returns the new target (bounded)."""
    if num_running == 0 and total_ongoing > 0:  # cold start: no delay
        return config.clamp(max(math.ceil(1 * config.upscaling_factor), target)), state
    if num_running == 0:
        desired: float = target
    else:
        desired = num_running * (total_ongoing / (config.target_ongoing_requests * num_running))
    scaled = _apply_scaling_factors(desired, num_running, config)
    if num_running == 0 and scaled > 0:
        return config.clamp(scaled), state
    decision, state = _apply_delay_logic(max(0, scaled), target, config, state, now_s)
    return config.clamp(decision), state


def _apply_scaling_factors(desired: float, current: int, config: ServeAutoscalingConfig) -> int:
    if current == 0:
        return math.ceil(desired)
    delta = desired - current
    factor = config.upscaling_factor if delta > 0 else config.downscaling_factor
    scaled = math.ceil(current + factor * delta)
    if math.ceil(desired) < current and scaled == current:  # stuck by the factor while scaling down
        scaled -= 1
    return scaled


def _apply_delay_logic(
    desired: int, target: int, config: ServeAutoscalingConfig, state: DelayState, now_s: float
) -> tuple[int, DelayState]:
    counter, since_s = state.counter, state.since_s
    decision = target
    if desired > target:
        if counter < 0:
            counter, since_s = 0, None
        counter += 1
        since_s = now_s if since_s is None else since_s
        if now_s - since_s + _DELAY_ELAPSED_EPS_S >= config.upscale_delay_s:
            counter, since_s, decision = 0, None, desired
    elif desired < target:
        if counter > 0:
            counter, since_s = 0, None
        counter -= 1
        if target == 1:
            delay_s = config.downscale_delay_s
            if config.downscale_to_zero_delay_s is not None:
                delay_s = config.downscale_to_zero_delay_s
        else:
            delay_s = config.downscale_delay_s
            desired = max(1, desired)
        since_s = now_s if since_s is None else since_s
        if now_s - since_s + _DELAY_ELAPSED_EPS_S >= delay_s:
            counter, since_s, decision = 0, None, desired
    else:
        counter, since_s = 0, None
    return decision, DelayState(counter, since_s)


@dataclass
class _ServePool:
    config: ServeAutoscalingConfig
    state: DelayState = field(default_factory=DelayState)
    window: deque[tuple[float, float]] = field(default_factory=deque)  # (time, total ongoing) samples


class ServeDefaultPolicy:
    """Serve's default policy run independently on each pool, as two deployments with default autoscaling."""

    name = "serve_default"

    def __init__(self, prefill: ServeAutoscalingConfig, decode: ServeAutoscalingConfig) -> None:
        self.pools = {"prefill": _ServePool(prefill), "decode": _ServePool(decode)}

    def targets(self, now_s: float, pools: Mapping[str, PoolSnapshot]) -> dict[str, int]:
        out = {}
        for name, pool in self.pools.items():
            snapshot = pools[name]
            pool.window.append((now_s, float(sum(r.num_ongoing for r in snapshot.replicas.values()))))
            while pool.window[0][0] < now_s - pool.config.look_back_period_s:
                pool.window.popleft()
            total = sum(v for _, v in pool.window) / len(pool.window)
            out[name], pool.state = serve_default_decision(
                total, len(snapshot.replicas), snapshot.target, pool.config, pool.state, now_s
            )
        return out
