"""The replay simulator: request traces through the real `Router`, the engine's own `Scheduler`/`BlockManager`/
`BlockPool` on modeled replicas (only step time is modeled), and pools resized while it runs by the autoscaling
planner, fixed sizes, or Ray Serve's default policy. Pure Python, no Ray, no torch code of its own.

`trace.py` (traces, ideal hit rate) and `workloads.py` (time-varying load) make the input; `replay.simulate` runs it;
`results.py` says what came out (TTFT/TPOT per request, SLO attainment, goodput per replica-hour, a timeline).
"""

from pdserve.sim.replay import SIM_POLICIES, SimConfig, calibrated_cost, simulate
from pdserve.sim.replicas import GPU_REPLICA, ReplicaModel
from pdserve.sim.results import SLO, PoolCounts, ReplicaSpan, RequestRecord, SimResult, TimelinePoint
from pdserve.sim.scaling import (
    FixedPolicy,
    PlannerPolicy,
    PoolSnapshot,
    ReplicaSnapshot,
    ScalingPolicy,
    ServeAutoscalingConfig,
    ServeDefaultPolicy,
    serve_default_decision,
)
from pdserve.sim.trace import TraceRequest, ideal_hit_rate, load_trace, multiturn_trace, save_trace
from pdserve.sim.workloads import diurnal_trace, step_trace

__all__ = [
    "GPU_REPLICA",
    "SIM_POLICIES",
    "SLO",
    "FixedPolicy",
    "PlannerPolicy",
    "PoolCounts",
    "PoolSnapshot",
    "ReplicaModel",
    "ReplicaSnapshot",
    "ReplicaSpan",
    "RequestRecord",
    "ScalingPolicy",
    "ServeAutoscalingConfig",
    "ServeDefaultPolicy",
    "SimConfig",
    "SimResult",
    "TimelinePoint",
    "TraceRequest",
    "calibrated_cost",
    "diurnal_trace",
    "ideal_hit_rate",
    "load_trace",
    "multiturn_trace",
    "save_trace",
    "serve_default_decision",
    "simulate",
    "step_trace",
]
