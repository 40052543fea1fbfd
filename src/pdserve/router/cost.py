"""One cost, in estimated seconds, for each (prefill, decode) pair — and the `RouteDecision` that explains it.

For a decode candidate D (which caches `hit_D` of the prompt's tokens):
  load(D)      = expected_output_tokens x decode_step_per_seq_s x decodes running on D   (what D's batch adds)
  local(D)     = (prefill tokens queued on D + prompt - hit_D) / local_prefill_tokens_per_s
  pair(P, D)   = (prefill tokens queued on P + prompt - hit_P) / prefill_tokens_per_s
               + (prompt - hit_D) x kv_bytes_per_token / bandwidth(P's node, D's node) + disaggregation_overhead_s
  cost(D)      = load(D) + (local(D) if prompt - hit_D <= local_prefill_max_tokens else min over P of pair(P, D))
With `local_prefill_queue_s` (off by default) D also prefills a longer prompt itself when the best P's queue alone
would hold it that long and local(D) beats pair(P, D): under a prefill burst the decode replicas take a share of the
prompts, trading their streams' TPOT for TTFT and throughput (Dynamo's conditional disaggregation on queue depth).
The pair with the least cost wins; ties are broken at random. Affinity and load meet in the same units per
candidate, so a busy replica loses its cached prefix's advantage exactly when its queue costs more than the
recompute — there is no fleet-wide switch. A decode replica without room for the prompt is ranked last, never
dropped: the ranking is also the fallback order.
"""

from __future__ import annotations

import enum
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from pdserve.router.load import ReplicaLoad


class RouteMode(str, enum.Enum):
    DISAGGREGATED = "disaggregated"  # P prefills and pushes the blocks D lacks
    LOCAL = "local"  # D lacks few tokens: it prefills them itself (conditional disaggregation)


@dataclass(frozen=True)
class CostConfig:
    """Weights of the cost model. Defaults are measured on SmolLM2-135M bf16 on the 2-core dev CPU
    (docs/ROUTER.md says how; re-measure for other models and hardware)."""

    prefill_tokens_per_s: float = 2900.0  # 512-token prefill in 0.176 s (benchmarks/engine_throughput.py)
    local_prefill_tokens_per_s: float = 2900.0  # same engine on the decode replica
    decode_step_per_seq_s: float = 0.001  # decode step: 22 ms at batch 1, 38 ms at batch 16 -> ~1 ms per sequence
    expected_output_tokens: int = 128  # output tokens a request is assumed to decode (capped by its max_tokens)
    kv_bytes_per_token: int = 23040  # 2 (K, V) x 30 layers x 3 KV heads x 64 dims x 2 bytes
    same_node_bytes_per_s: float = 5e9  # shared-memory transport (benchmarks/kv_transfer.py)
    cross_node_bytes_per_s: float = 1e9  # TCP transport
    disaggregation_overhead_s: float = 0.01  # two extra Ray hops (reserve, prefill) vs a local prefill
    local_prefill_max_tokens: int = 256  # D lacking at most this many tokens prefills locally (router_compare.py)
    local_prefill_queue_s: float = math.inf  # P's queue wait beyond which D prefills itself when sooner (inf: never)
    block_size: int = 16


class CandidateCost(NamedTuple):
    """One candidate's cost terms, as the decision saw them (seconds unless named otherwise)."""

    replica_id: str
    role: str
    num_cached_tokens: int  # prompt tokens this replica caches (index view, incl. optimistic entries)
    num_queued_tokens: int  # prefill tokens already routed here and not done
    num_decodes: int
    num_free_blocks: int
    load_s: float  # decode load (decode candidates)
    prefill_s: float  # prefill compute incl. queue (on P, or on D when local)
    transfer_s: float  # moving the blocks D lacks (prefill candidates: to the chosen D)
    total_s: float
    has_room: bool


Terms = tuple[Any, ...]  # a candidate's terms, in CandidateCost's field order (cheaper to build than a NamedTuple)


@dataclass(frozen=True)
class RouteDecision:
    request_id: str
    mode: RouteMode
    decode_replica_id: str
    prefill_replica_id: str | None  # None when local
    num_prompt_tokens: int
    expected_cached_tokens: int  # on the replica that computes the prompt (P, or D when local)
    expected_transfer_tokens: int  # prompt tokens D lacks (0 when local)
    prompt_block_hashes: tuple[int, ...]
    decode_ranking: tuple[str, ...]  # best first; the fallback order
    # Every candidate's terms as plain tuples in CandidateCost's field order: built per replica per request, they
    # must be cheap; the properties below name them when someone looks (logs, spans).
    decode_terms: tuple[Terms, ...]
    prefill_terms: tuple[Terms, ...]  # costs towards the chosen D

    @property
    def decode_candidates(self) -> tuple[CandidateCost, ...]:
        return tuple(CandidateCost._make(t) for t in self.decode_terms)

    @property
    def prefill_candidates(self) -> tuple[CandidateCost, ...]:
        return tuple(CandidateCost._make(t) for t in self.prefill_terms)

    def summary(self) -> str:
        chosen = f"P={self.prefill_replica_id} D={self.decode_replica_id}"
        return (
            f"{self.request_id}: {self.mode.value} {chosen} prompt={self.num_prompt_tokens} "
            f"cached={self.expected_cached_tokens} transfer={self.expected_transfer_tokens} | "
            + " ".join(f"{c.role[0]}:{c.replica_id}={c.total_s:.4f}s(hit {c.num_cached_tokens})" for c in self._all())
        )

    def _all(self) -> tuple[CandidateCost, ...]:
        return self.decode_candidates + self.prefill_candidates


def choose(
    config: CostConfig,
    request_id: str,
    block_hashes: Sequence[int],
    num_prompt_tokens: int,
    max_new_tokens: int,
    matched_blocks: Mapping[str, int],
    decodes: Sequence[ReplicaLoad],
    prefills: Sequence[ReplicaLoad],
    rng: random.Random,
) -> RouteDecision:
    """Rank the decode replicas and pick the prefill replica for the best one. `matched_blocks` is the prefix
    index's answer for `block_hashes`. Raises ValueError when there is no decode replica.

    Written for speed (it runs once per request over every replica): plain tuples in the loops."""
    if not decodes:
        raise ValueError("no decode replica to route to")
    bs = config.block_size
    max_hit = max(num_prompt_tokens - 1, 0) // bs * bs  # the computing replica always recomputes the last token
    hits = {rid: min(n * bs, max_hit) for rid, n in matched_blocks.items()}
    load_per_decode_s = min(max_new_tokens, config.expected_output_tokens) * config.decode_step_per_seq_s
    best_per_node = _best_prefill_per_node(config, prefills, hits, num_prompt_tokens)
    decode_costs = [
        _decode_cost(config, d, hits.get(d.replica_id, 0), num_prompt_tokens, load_per_decode_s, best_per_node)
        for d in decodes
    ]
    ranked = sorted(decode_costs, key=_rank_key)
    best = _pick_tie(rng, ranked)
    chosen = decodes[decode_costs.index(best)]
    missing = num_prompt_tokens - best[_CACHED]
    is_local = best[_TRANSFER] == 0.0
    prefill_costs = [
        _prefill_cost(config, p, hits.get(p.replica_id, 0), num_prompt_tokens, chosen, missing) for p in prefills
    ]
    prefill = None if is_local else _pick_tie(rng, sorted(prefill_costs, key=_rank_key))
    return RouteDecision(
        request_id=request_id,
        mode=RouteMode.LOCAL if prefill is None else RouteMode.DISAGGREGATED,
        decode_replica_id=chosen.replica_id,
        prefill_replica_id=None if prefill is None else prefill[_ID],
        num_prompt_tokens=num_prompt_tokens,
        expected_cached_tokens=(prefill or best)[_CACHED],
        expected_transfer_tokens=0 if prefill is None else missing,
        prompt_block_hashes=tuple(block_hashes),
        decode_ranking=(best[_ID], *(c[_ID] for c in ranked if c is not best)),
        decode_terms=tuple(decode_costs),
        prefill_terms=tuple(prefill_costs),
    )


# positions in a candidate's terms (CandidateCost's field order)
_ID, _CACHED, _TRANSFER, _TOTAL, _HAS_ROOM = 0, 2, 8, 9, 10


def _rank_key(terms: Terms) -> tuple[bool, float]:
    return not terms[_HAS_ROOM], terms[_TOTAL]


def _best_prefill_per_node(
    config: CostConfig, prefills: Sequence[ReplicaLoad], hits: Mapping[str, int], num_prompt_tokens: int
) -> dict[str, tuple[float, float]]:
    """Least prefill compute (queue + uncached prompt) among the prefill replicas of each node, with its queue's
    share."""
    best: dict[str, tuple[float, float]] = {}
    rate = config.prefill_tokens_per_s
    for p in prefills:
        queue_s = p.queued_prefill_tokens / rate
        compute_s = queue_s + (num_prompt_tokens - hits.get(p.replica_id, 0)) / rate
        if compute_s < best.get(p.node_id, (math.inf, 0.0))[0]:
            best[p.node_id] = (compute_s, queue_s)
    return best


def _decode_cost(
    config: CostConfig,
    d: ReplicaLoad,
    hit: int,
    num_prompt_tokens: int,
    load_per_decode_s: float,
    best_prefill_per_node: Mapping[str, tuple[float, float]],
) -> Terms:
    """A decode candidate's terms; its transfer term is 0 exactly when it would prefill the prompt itself."""
    missing = num_prompt_tokens - hit
    load_s = load_per_decode_s * d.decodes
    transfer_s = 0.0
    local_s = (d.queued_prefill_tokens + missing) / config.local_prefill_tokens_per_s
    if missing <= config.local_prefill_max_tokens or not best_prefill_per_node:
        prefill_s = local_s
    else:
        num_bytes = missing * config.kv_bytes_per_token
        prefill_s = transfer_s = queue_s = math.inf
        for node, (compute_s, node_queue_s) in best_prefill_per_node.items():
            bandwidth = config.same_node_bytes_per_s if node == d.node_id else config.cross_node_bytes_per_s
            if compute_s + num_bytes / bandwidth < prefill_s + transfer_s:
                prefill_s, transfer_s, queue_s = compute_s, num_bytes / bandwidth, node_queue_s
        transfer_s += config.disaggregation_overhead_s
        if queue_s >= config.local_prefill_queue_s and local_s < prefill_s + transfer_s:
            prefill_s, transfer_s = local_s, 0.0  # P's queue is long: D computes it sooner itself
    num_needed = -(-(num_prompt_tokens + 1) // config.block_size) - hit // config.block_size
    return (
        d.replica_id, d.role, hit, d.queued_prefill_tokens, d.decodes, d.num_free_blocks,
        load_s, prefill_s, transfer_s, load_s + prefill_s + transfer_s, d.num_free_blocks >= num_needed,
    )  # fmt: skip


def _prefill_cost(
    config: CostConfig, p: ReplicaLoad, hit: int, num_prompt_tokens: int, decode: ReplicaLoad, num_missing: int
) -> Terms:
    compute_s = (p.queued_prefill_tokens + num_prompt_tokens - hit) / config.prefill_tokens_per_s
    bandwidth = config.same_node_bytes_per_s if p.node_id == decode.node_id else config.cross_node_bytes_per_s
    transfer_s = num_missing * config.kv_bytes_per_token / bandwidth
    return (
        p.replica_id, p.role, hit, p.queued_prefill_tokens, p.decodes, p.num_free_blocks,
        0.0, compute_s, transfer_s, compute_s + transfer_s, True,
    )  # fmt: skip


def _pick_tie(rng: random.Random, ranked: Sequence[Terms]) -> Terms:
    """The first candidate, or a random one among those tied with it (same room, cost within 1 ns)."""
    first = ranked[0]
    if len(ranked) == 1 or ranked[1][_HAS_ROOM] != first[_HAS_ROOM] or ranked[1][_TOTAL] - first[_TOTAL] > 1e-9:
        return first
    return rng.choice([c for c in ranked if c[_HAS_ROOM] == first[_HAS_ROOM] and c[_TOTAL] - first[_TOTAL] <= 1e-9])
