"""The planner as Ray Serve's application-level autoscaling policy: Serve scales the pools, the planner sizes them.

Serve calls `PoolPlanner` (an instance, built once with the app config's `policy_kwargs`) on its controller every
control-loop tick with one `AutoscalingContext` per autoscaled deployment of the app. Each engine replica reports its
`ReplicaSignals` through Serve's custom autoscaling metrics (`record_autoscaling_stats` in replicas.py); the policy
takes each replica's newest report, lets the planner (`pdserve.planner`) decide both pools together, and returns the
target of each. Serve applies it (its own bounds and delays set to let the planner's through), and on a Ray cluster
with an autoscaler the pools' pending replicas bring up nodes of their `ray up` node type.

Decisions are visible: a log line with the reason whenever a target changes (the Serve controller's log), and the
last decision of each pool in Ray's internal KV (`decision_key(app)`), which the ingress renders as
`pdserve_planner_target_replicas{pool}` and friends on `/metrics`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from typing import Any

from pdserve.planner import Planner, PlannerConfig, PoolBounds, PoolDecision, ReplicaSignals

logger = logging.getLogger("ray.serve")

POOL_OF_DEPLOYMENT = {"PrefillServer": "prefill", "DecodeServer": "decode"}
KV_NAMESPACE = "pdserve"


def decision_key(app_name: str) -> bytes:
    return f"planner/{app_name}".encode()


def planner_config(kwargs: dict[str, Any]) -> PlannerConfig:
    """`policy_kwargs` (JSON: `ServeConfig.autoscaling` plus each pool's bounds) -> the planner's config."""
    kwargs = dict(kwargs)
    for pool in ("prefill", "decode"):
        if isinstance(kwargs.get(pool), dict):
            kwargs[pool] = PoolBounds(**kwargs[pool])
    return PlannerConfig(**kwargs)


class PoolPlanner:
    """Serve's application-level policy: `(contexts) -> ({deployment_id: target}, policy_state)`."""

    def __init__(self, interval_s: float = 2.0, **kwargs: Any) -> None:
        self.planner = Planner(planner_config(kwargs))
        self.interval_s = interval_s  # the planner runs this often; between runs the last targets stand
        self._last_run = -float("inf")
        self._targets: dict[str, int] = {}
        self._logged: dict[str, tuple[int, int]] = {}  # per pool: (current, target) last logged

    def __call__(self, contexts: dict[Any, Any]) -> tuple[dict[Any, int], dict[Any, dict[str, Any]]]:
        pools = {POOL_OF_DEPLOYMENT[d.name]: (d, ctx) for d, ctx in contexts.items() if d.name in POOL_OF_DEPLOYMENT}
        now = time.monotonic()
        if now - self._last_run >= self.interval_s:
            self._last_run = now
            try:
                self._plan(now, pools, next(iter(contexts.values())).app_name if contexts else None)
            except Exception:  # Serve's control loop would stop at it on every tick: the last targets stand
                logger.exception("pdserve planner: planning failed; the pools keep their targets")
        out = {d: self._targets.get(pool, ctx.target_num_replicas) for pool, (d, ctx) in pools.items()}
        return out, {d: {} for d in contexts}

    def _plan(self, now: float, pools: dict[str, tuple[Any, Any]], app_name: str | None) -> None:
        self._follow_bounds({pool: ctx for pool, (_, ctx) in pools.items()})
        signals = {pool: latest_signals(ctx) for pool, (_, ctx) in pools.items()}
        current = {pool: ctx.current_num_replicas for pool, (_, ctx) in pools.items()}
        # What each pool is meant to have now: its num_replicas at the app's start (nothing runs yet), one from
        # Serve's cold start of a pool at zero — kept until the planner has measurements of its own.
        meant = {pool: ctx.target_num_replicas for pool, (_, ctx) in pools.items()}
        decisions = self.planner.plan(now, signals, current, meant)
        self._report(decisions, app_name)
        self._targets = {pool: d.target for pool, d in decisions.items()}

    def _follow_bounds(self, contexts: dict[str, Any]) -> None:
        """Each pool's bounds are its deployment's (`min_replicas`/`max_replicas`, which Serve also enforces, less
        where the cluster's capacity lowers them): the policy's kwargs need not repeat them."""
        config = self.planner.config
        bounds = {
            pool: PoolBounds(ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas)
            for pool, ctx in contexts.items()
            if hasattr(ctx, "capacity_adjusted_max_replicas")
        }
        updated = dataclasses.replace(
            config, prefill=bounds.get("prefill", config.prefill), decode=bounds.get("decode", config.decode)
        )
        if updated != config:
            self.planner.config = updated

    def _report(self, decisions: dict[str, PoolDecision], app_name: str | None) -> None:
        for pool, d in decisions.items():
            # once per change of size or target: a replica still starting kept current != target, a line per tick
            if self._logged.get(pool) != (d.current, d.target):
                logger.info("pdserve planner: %s pool %d -> %d (needs %d): %s", pool, d.current, d.target, d.needed,
                            d.reason)  # fmt: skip
                self._logged[pool] = (d.current, d.target)
        if app_name is None:
            return
        record = {
            "time": time.time(),
            "pools": {
                pool: {"current": d.current, "target": d.target, "needed": d.needed, "reason": d.reason}
                for pool, d in decisions.items()
            },
            "prediction": self.planner.prediction,
        }
        try:
            from ray.experimental import internal_kv

            if not internal_kv._internal_kv_initialized():  # not in a Ray worker (tests calling the policy)
                return
            internal_kv._internal_kv_put(decision_key(app_name), json.dumps(record), namespace=KV_NAMESPACE)
        except Exception:  # visibility only: a decision must not fail for it
            logger.warning("pdserve planner: could not publish its decision", exc_info=True)


def latest_signals(ctx: Any) -> dict[str, ReplicaSignals]:
    """Each running replica's newest `record_autoscaling_stats` report (Serve keeps a short time series per metric;
    all metrics of one report share its timestamp)."""
    raw = ctx.raw_metrics or {}
    by_replica: dict[Any, dict[str, float]] = {}
    for name, series_by_replica in raw.items():
        for replica_id, series in series_by_replica.items():
            if series:
                by_replica.setdefault(replica_id, {})[name] = float(series[-1].value)
    return {
        getattr(rid, "unique_id", str(rid)): ReplicaSignals.from_metrics(metrics)
        for rid, metrics in by_replica.items()
        if "time_s" in metrics
    }


def read_decision(app_name: str) -> dict[str, Any] | None:
    """The planner's last published decision for `app_name` (None before its first, or without one)."""
    from ray.experimental import internal_kv

    raw = internal_kv._internal_kv_get(decision_key(app_name), namespace=KV_NAMESPACE)
    return json.loads(raw) if raw else None
