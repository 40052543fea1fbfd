"""What each engine replica reports to the planner, and the rates the planner derives from two reports.

A replica reports monotonically growing counters and a few gauges (`ReplicaSignals`); the planner turns two
successive reports of the same replica into rates over the interval between them (`rates_between`). Counters, not
rates, go over the wire: a report that arrives late or twice still gives the right rate, and a replica that restarts
(counters back to zero) is seen as new instead of giving a negative rate.

The same dictionary is what a replica returns from Serve's `record_autoscaling_stats` (every value a float, as Serve
requires) and what the simulator's modeled replicas report: `ReplicaSignals.as_metrics` / `from_metrics`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol


class LoadCounters(Protocol):
    """The engine's counters since start (`pdserve.engine.request.LoadCounters`, which the simulator's modeled
    replicas count too); a protocol so that the planner imports no engine code."""

    requests: int
    prompt_tokens: int
    prefill_tokens: int
    generated_tokens: int
    finished: int
    steps: int
    step_s: float
    decode_steps: int
    decode_step_s: float
    decode_step_seqs: int
    reserves_refused: int


@dataclass(frozen=True)
class ReplicaSignals:
    """One engine replica's view of itself at `time_s` (its own clock; only differences of it are used)."""

    time_s: float
    # gauges
    queued_prefill_tokens: float = 0.0  # prompt tokens accepted but not yet computed (waiting and partly computed)
    num_running: float = 0.0  # sequences in the running batch
    num_waiting: float = 0.0  # sequences waiting for admission (committed reservations among them hold blocks)
    kv_blocks_total: float = 0.0
    kv_blocks_used: float = 0.0  # held by running sequences, prefill results and reservations
    kv_blocks_reserved: float = 0.0  # of those, held by open reservations (KV being written from outside)
    # counters since the replica started
    prompt_tokens_total: float = 0.0  # prompt tokens accepted (arrivals; cached ones included)
    requests_total: float = 0.0  # requests accepted (prefills on P, prefills and commits on D)
    prefill_tokens_total: float = 0.0  # prompt tokens computed (cache hits excluded)
    generated_tokens_total: float = 0.0  # tokens sampled by decode steps
    finished_total: float = 0.0  # requests that left the running batch (finished or aborted)
    steps_total: float = 0.0  # engine steps that ran the model
    step_s_total: float = 0.0  # seconds those steps took (the replica's busy time)
    decode_steps_total: float = 0.0  # steps without a prefill chunk (their time is the pure decode step time)
    decode_step_s_total: float = 0.0
    decode_step_seqs_total: float = 0.0  # sum over those steps of their batch sizes
    reserves_refused_total: float = 0.0  # KV reservations refused for lack of room (each retry counts)
    # gauge, last so that positions above stay put: of num_waiting, the committed reservations waiting for a seat in
    # the running batch; they hold their blocks like running sequences (the planner's blocks per sequence counts them)
    num_waiting_with_kv: float = 0.0

    @classmethod
    def from_counters(
        cls, time_s: float, load: LoadCounters, *, queued_prefill_tokens: float, num_running: float,
        num_waiting: float, kv_blocks_total: float, kv_blocks_used: float, kv_blocks_reserved: float,
        num_waiting_with_kv: float = 0.0,
    ) -> ReplicaSignals:  # fmt: skip
        """A replica's report: its gauges now and its engine's counters."""
        return cls(
            time_s, queued_prefill_tokens, num_running, num_waiting, kv_blocks_total, kv_blocks_used,
            kv_blocks_reserved, prompt_tokens_total=load.prompt_tokens, requests_total=load.requests,
            prefill_tokens_total=load.prefill_tokens, generated_tokens_total=load.generated_tokens,
            finished_total=load.finished, steps_total=load.steps, step_s_total=load.step_s,
            decode_steps_total=load.decode_steps, decode_step_s_total=load.decode_step_s,
            decode_step_seqs_total=load.decode_step_seqs, reserves_refused_total=load.reserves_refused,
            num_waiting_with_kv=num_waiting_with_kv,
        )  # fmt: skip

    def as_metrics(self) -> dict[str, float]:
        return {f.name: float(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, float]) -> ReplicaSignals:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: float(v) for k, v in metrics.items() if k in names})


@dataclass(frozen=True)
class ReplicaRates:
    """What a replica did between two of its reports (`seconds` apart)."""

    seconds: float
    prompt_tokens_per_s: float  # prompt tokens arriving
    requests_per_s: float
    prefill_tokens_per_s: float  # prompt tokens computed
    generated_tokens_per_s: float
    finished_per_s: float
    busy_fraction: float  # share of the interval spent in model steps
    prefill_tokens_per_busy_s: float | None  # compute throughput while busy (None: no prefill work in the interval)
    decode_step_s: float | None  # mean pure-decode step time (None: no pure decode step)
    decode_batch: float | None  # mean batch size of those steps
    step_s: float | None  # mean time of every step (local prefill chunks included): what a running stream waits
    reserves_refused_per_s: float = 0.0
    # how fast the prompt backlog (a gauge) grew over the interval: with the tokens computed, what arrived to compute
    queued_prefill_growth_per_s: float = 0.0


def rates_between(before: ReplicaSignals, after: ReplicaSignals) -> ReplicaRates | None:
    """Rates over the interval between two reports of one replica; None when the interval is empty or a counter went
    backwards (the replica restarted: its counters began again)."""
    dt = after.time_s - before.time_s
    if dt <= 0:
        return None
    deltas = {
        name: getattr(after, name) - getattr(before, name)
        for name in (
            "prompt_tokens_total", "requests_total", "prefill_tokens_total", "generated_tokens_total",
            "finished_total", "steps_total", "step_s_total", "decode_steps_total", "decode_step_s_total",
            "decode_step_seqs_total", "reserves_refused_total",
        )
    }  # fmt: skip
    if any(v < 0 for v in deltas.values()):
        return None
    busy = deltas["step_s_total"]
    decode_steps = deltas["decode_steps_total"]
    prefill_busy = busy - deltas["decode_step_s_total"]  # time of steps that carried a prefill chunk
    return ReplicaRates(
        seconds=dt,
        prompt_tokens_per_s=deltas["prompt_tokens_total"] / dt,
        requests_per_s=deltas["requests_total"] / dt,
        prefill_tokens_per_s=deltas["prefill_tokens_total"] / dt,
        generated_tokens_per_s=deltas["generated_tokens_total"] / dt,
        finished_per_s=deltas["finished_total"] / dt,
        busy_fraction=min(1.0, busy / dt),
        prefill_tokens_per_busy_s=(
            deltas["prefill_tokens_total"] / prefill_busy
            if deltas["prefill_tokens_total"] > 0 and prefill_busy > 0
            else None
        ),
        decode_step_s=deltas["decode_step_s_total"] / decode_steps if decode_steps > 0 else None,
        decode_batch=deltas["decode_step_seqs_total"] / decode_steps if decode_steps > 0 else None,
        step_s=busy / deltas["steps_total"] if deltas["steps_total"] > 0 else None,
        reserves_refused_per_s=deltas["reserves_refused_total"] / dt,
        queued_prefill_growth_per_s=(after.queued_prefill_tokens - before.queued_prefill_tokens) / dt,
    )
