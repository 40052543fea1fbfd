"""The global router: prefix index fed by KV events, load view, one cost for the (prefill, decode) pair.

Pure Python, no Ray: `serve/` feeds it replica reports and asks it for a `RouteDecision` per request; the replay
simulator (`pdserve.sim`) drives the same `Router` against modeled replicas.
"""

from pdserve.router.cost import CandidateCost, CostConfig, RouteDecision, RouteMode, choose
from pdserve.router.index import PrefixIndex, SyncCursor
from pdserve.router.load import ReplicaLoad, ReplicaReport
from pdserve.router.router import POLICIES, Router, RouterCounters

__all__ = [
    "POLICIES",
    "CandidateCost",
    "CostConfig",
    "PrefixIndex",
    "ReplicaLoad",
    "ReplicaReport",
    "RouteDecision",
    "RouteMode",
    "Router",
    "RouterCounters",
    "SyncCursor",
    "choose",
]
