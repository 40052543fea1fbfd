"""Queueing models: how many replicas a pool needs for a demand and an SLO.

Prefill pool: prompts arrive at `demand_tokens_per_s` (tokens to compute) in requests of `mean_prompt_tokens`; a
replica computes `tokens_per_s` while busy. The pool is an M/M/n queue of prompts (Erlang C): a prompt waits for a
free replica, then takes on average S = `mean_prompt_tokens / tokens_per_s`; the TTFT target is S plus the p90 of
the wait, P(W > t) = C(n, a) exp(-(n - a) t / S). A backlog already queued must also drain within `recovery_s`,
which sets a floor on the pool's spare compute.

Decode pool: a decode step over a batch of b sequences takes t(b) = t0 + t1 b (fitted from the replicas' own steps,
`StepTimeFit`). Requests arrive at lam per second and each generates `mean_output_tokens`; by Little's law the
pool holds N = lam * O * TPOT sequences, so with n replicas TPOT = t0 / (1 - t1 lam O / n), and it needs
n >= t1 lam O / (1 - t0 / TPOT_slo). KV memory is the other bound: N sequences of `blocks_per_seq` blocks must fit
in n replicas' caches at `kv_target_usage`.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass


def erlang_c(n: int, offered: float) -> float:
    """Probability that an arrival waits in an M/M/n queue with `offered` = lam / mu erlangs (1.0 when n <= a)."""
    if n <= offered:
        return 1.0
    # The Erlang B recursion is stable for any n; C follows from B.
    b = 1.0
    for k in range(1, n + 1):
        b = offered * b / (k + offered * b)
    rho = offered / n
    return b / (1.0 - rho + rho * b)


@dataclass(frozen=True)
class PrefillDemand:
    tokens_per_s: float  # prompt tokens to compute per second (cache hits excluded)
    mean_prompt_tokens: float  # per request, computed part
    queued_tokens: float  # backlog now, across the pool
    # Nothing arrived in the newest interval and nothing waits: `tokens_per_s`, smoothed, only decays toward 0 and
    # would keep a pool with min_replicas 0 at one replica for over half an hour (found in review).
    is_idle: bool = False


def prefill_ttft_p90(n: int, demand: PrefillDemand, tokens_per_s: float, overhead_s: float = 0.0) -> float:
    """Predicted TTFT target on `n` prefill replicas: the mean prompt's compute plus the p90 of the queueing wait,
    P(W > t) = C(n, a) exp(-(n - a) t / S) (inf when they cannot keep up). The wait is what replicas change; the
    spread of prompt lengths is not (the exact M/M/n sojourn p90, which adds exponential service's spread, sized the
    pools worse in the simulator: 716 vs 1139 goodput per replica-hour on the same day)."""
    service_s = demand.mean_prompt_tokens / tokens_per_s
    if demand.tokens_per_s <= 0:
        return overhead_s + service_s
    offered = demand.tokens_per_s / tokens_per_s
    if n <= offered:
        return math.inf
    waits = erlang_c(n, offered)
    wait_p90 = service_s / (n - offered) * math.log(waits / 0.1) if waits > 0.1 else 0.0
    return overhead_s + service_s + wait_p90


def prefill_replicas_needed(
    demand: PrefillDemand,
    tokens_per_s: float,
    ttft_slo_s: float,
    max_utilization: float,
    recovery_s: float,
    overhead_s: float = 0.0,
    limit: int = 1024,
) -> tuple[int, str]:
    """The fewest replicas meeting the TTFT SLO at p90 with utilization <= `max_utilization` and the backlog drained
    within `recovery_s`; with the bound that decided it."""
    floor_util = math.ceil(demand.tokens_per_s / (tokens_per_s * max_utilization) - 1e-9)
    floor_backlog = math.ceil((demand.tokens_per_s + demand.queued_tokens / recovery_s) / tokens_per_s - 1e-9)
    n = max(1, floor_util, floor_backlog)
    why = "backlog" if floor_backlog >= max(floor_util, 1) and demand.queued_tokens > 0 else "utilization"
    if prefill_ttft_p90(limit, demand, tokens_per_s, overhead_s) > ttft_slo_s:
        return n, "prompt-bound"  # one prompt's own compute misses the SLO: more replicas cannot fix that
    start = n
    while n < limit and prefill_ttft_p90(n, demand, tokens_per_s, overhead_s) > ttft_slo_s:
        n += 1
    if n > start:
        why = "ttft"
    return n, why


@dataclass(frozen=True)
class DecodeDemand:
    requests_per_s: float  # sequences joining the decode pool per second
    mean_output_tokens: float
    blocks_per_seq: float  # mean KV blocks a running sequence holds
    num_running: float  # now, across the pool
    num_waiting: float  # now, across the pool (no room yet)
    kv_blocks_used: float = 0.0  # now, across the pool, reservations included
    kv_refused: bool = False  # reservations were refused for lack of room in the last interval
    observed_step_s: float | None = None  # the pool's mean step time now (local prefill chunks included)
    is_idle: bool = False  # nothing joined in the newest interval, nothing runs or waits (as PrefillDemand's)


class StepTimeFit:
    """t(b) = t0 + t1 b by least squares over recent (batch, step time) samples, with a prior until the batch sizes
    seen spread enough to fit both terms."""

    def __init__(self, prior_base_s: float, prior_per_seq_s: float, window: int = 256) -> None:
        self.prior = (prior_base_s, prior_per_seq_s)
        self.samples: deque[tuple[float, float]] = deque(maxlen=window)

    def add(self, batch: float, step_s: float) -> None:
        if batch > 0 and step_s > 0:
            self.samples.append((batch, step_s))

    def coefficients(self) -> tuple[float, float]:
        if not self.samples:
            return self.prior
        n = len(self.samples)
        mean_b = sum(b for b, _ in self.samples) / n
        mean_t = sum(t for _, t in self.samples) / n
        var_b = sum((b - mean_b) ** 2 for b, _ in self.samples) / n
        if var_b >= 1.0:
            cov = sum((b - mean_b) * (t - mean_t) for b, t in self.samples) / n
            t1 = cov / var_b
            t0 = mean_t - t1 * mean_b
            # A fit through the origin is round-off, not a base cost; a flat or falling one is noise (a step never
            # gets cheaper per sequence), and a slope of 0 would turn the TPOT and resident bounds off.
            if t0 >= 1e-4 and t1 > 0:
                return t0, t1
        # One batch size seen (or a fit with no intercept or no slope): keep the prior's slope, fit the base to the
        # data.
        t1 = self.prior[1]
        return max(mean_t - t1 * mean_b, 1e-4), t1


def decode_tpot(n: int, demand: DecodeDemand, t0: float, t1: float) -> float:
    """Predicted mean time per output token on `n` decode replicas (inf when they cannot keep up)."""
    load = t1 * demand.requests_per_s * demand.mean_output_tokens / n
    return t0 / (1.0 - load) if load < 1.0 else math.inf


def decode_step_base(demand: DecodeDemand, t0: float, t1: float, current: int) -> float:
    """The fit's base step, or more where the pool's observed steps run longer than the fit predicts for their
    batches (prefill chunks of local requests ride in them)."""
    if demand.observed_step_s is not None and current > 0 and demand.num_running > 0:
        return max(t0, demand.observed_step_s - t1 * demand.num_running / current)
    return t0


def decode_replicas_needed(
    demand: DecodeDemand,
    t0: float,
    t1: float,
    tpot_slo_s: float,
    blocks_per_replica: float,
    kv_target_usage: float,
    max_seqs_per_replica: float,
    current: int = 0,
    limit: int = 1024,
    base_s: float | None = None,
) -> tuple[int, str]:
    """The fewest replicas meeting the TPOT SLO whose caches hold the sequences it implies; with the bound that
    decided it ("tpot", "resident", "kv", "kv-refused", "seqs", or "minimum").

    `t0` is the step's base; where the pool's observed steps run longer than the fit predicts for their batches
    (prefill chunks of local requests ride in them), the observed excess is added to the base. Besides the
    arrival-rate bound (Little's law), the sequences resident now (running and waiting) are checked against the SLO:
    more than the pool serves in time adds one replica. `base_s`: the base as `decode_step_base` found it for another
    demand (a check at more load than observed keeps the observed base)."""
    best, why = 1, "minimum"
    base = decode_step_base(demand, t0, t1, current) if base_s is None else base_s
    resident_now = demand.num_running + demand.num_waiting
    # The share of a token's time the per-sequence work may take. A base step that alone misses the SLO cannot be
    # fixed by replicas: size for throughput then (per-sequence work at most 90% of a step).
    spare = 0.9 if base >= tpot_slo_s else max(1.0 - base / tpot_slo_s, 0.1)
    tpot_bound = math.ceil(t1 * demand.requests_per_s * demand.mean_output_tokens / spare - 1e-9)
    if tpot_bound > best:
        best, why = tpot_bound, "tpot"
    # Sequences resident now that the pool cannot serve within the SLO: one more replica at a time. (Not the whole
    # count they imply: under overload residents pile up because TPOT is slow, and sizing for them over-asks.)
    if current > 0 and math.ceil(t1 * resident_now / (spare * tpot_slo_s) - 1e-9) > current and current + 1 > best:
        best, why = current + 1, "resident"
    # Sequences resident at the SLO's TPOT (Little's law), or now if more are resident or waiting.
    load = t1 * demand.requests_per_s * demand.mean_output_tokens / best
    tpot = base / (1.0 - load) if load < 1.0 else math.inf
    resident = max(demand.requests_per_s * demand.mean_output_tokens * min(tpot_slo_s, tpot), resident_now)
    blocks = max(resident * demand.blocks_per_seq, demand.kv_blocks_used)
    kv_bound = math.ceil(blocks / (blocks_per_replica * kv_target_usage) - 1e-9)
    if kv_bound > best:
        best, why = kv_bound, "kv"
    if demand.kv_refused and current + 1 > best:
        best, why = current + 1, "kv-refused"
    seq_bound = math.ceil(resident / max_seqs_per_replica - 1e-9)
    if seq_bound > best:
        best, why = seq_bound, "seqs"
    return min(best, limit), why
