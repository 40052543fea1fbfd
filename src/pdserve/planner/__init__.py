"""The autoscaling planner: sizes the prefill and decode pools jointly from the replicas' signals and the SLOs.

Pure Python (no Ray, no clock): `serve/autoscaling.py` runs it as Serve's application-level autoscaling policy, and
the simulator (`pdserve.sim`) runs the same object against modeled replicas.
"""

from pdserve.planner.model import erlang_c
from pdserve.planner.planner import POOLS, Planner, PlannerConfig, PoolBounds, PoolDecision
from pdserve.planner.signals import ReplicaRates, ReplicaSignals, rates_between

__all__ = [
    "POOLS",
    "Planner",
    "PlannerConfig",
    "PoolBounds",
    "PoolDecision",
    "ReplicaRates",
    "ReplicaSignals",
    "erlang_c",
    "rates_between",
]
