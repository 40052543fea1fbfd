"""Time-varying load: a diurnal day and step changes, as traces of Poisson arrivals.

Requests come in classes (`RequestClass`): each has shared system prompts (so prefix caching matters), lognormal user
prompt and output lengths (at least one token each), and a share of the traffic that may peak at some hour. The
diurnal day's rate follows a cosine between a night trough and a mid-afternoon peak; its class mix moves with the
hours (summarization in working hours, long-output chat in the evening). `day_s` compresses a day.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from pdserve.sim.trace import TraceRequest

_MIN_TOKEN_ID = 100  # below this: ids a tokenizer reserves for special tokens
_LENGTH_SIGMA = 0.6  # lognormal shape of prompt and output lengths
_MAX_LENGTH_FACTOR = 6.0  # lengths are capped at this many times their mean


@dataclass(frozen=True)
class RequestClass:
    name: str
    system_tokens: int  # one of `num_system_prompts` shared prompts of this class (0: none)
    mean_user_tokens: float
    mean_output_tokens: float
    base_share: float = 1.0  # weight in the mix at any hour ...
    peak_share: float = 0.0  # ... plus this much at `peak_hour`, a Gaussian bump `width_h` wide
    peak_hour: float = 12.0
    width_h: float = 3.0

    def share(self, hour: float) -> float:
        distance = (hour - self.peak_hour + 12.0) % 24.0 - 12.0  # on the clock, -12..12 h
        return self.base_share + self.peak_share * math.exp(-0.5 * (distance / self.width_h) ** 2)


# Chat all day; summarization (long prompts, short answers) in working hours; long answers in the evening.
DAY_MIX = (
    RequestClass("chat", 256, 150.0, 150.0, 1.0),
    RequestClass("summarize", 128, 1500.0, 80.0, 0.15, 1.2, 13.0, 3.0),
    RequestClass("long_output", 256, 100.0, 500.0, 0.15, 0.8, 21.0, 2.0),
)


def day_rate(hour: float, trough_fraction: float = 0.15, peak_hour: float = 15.0) -> float:
    """The day's arrival rate as a fraction of its peak: 1 at `peak_hour`, `trough_fraction` 12 hours away."""
    return trough_fraction + (1.0 - trough_fraction) * 0.5 * (1.0 + math.cos(2 * math.pi * (hour - peak_hour) / 24))


def diurnal_trace(
    peak_rate_per_s: float,
    day_s: float = 86_400.0,
    mix: Sequence[RequestClass] = DAY_MIX,
    trough_fraction: float = 0.15,
    peak_hour: float = 15.0,
    num_system_prompts: int = 4,
    vocab_size: int = 49152,
    seed: int = 0,
) -> list[TraceRequest]:
    """One day from midnight, `day_s` long: Poisson arrivals at `peak_rate_per_s` x `day_rate(hour)`, each request
    of a class drawn from the mix at its hour. Sorted by arrival."""

    def hour_of(t: float) -> float:
        return 24.0 * t / day_s

    def rate(t: float) -> float:
        return peak_rate_per_s * day_rate(hour_of(t), trough_fraction, peak_hour)

    return _poisson_trace(rate, peak_rate_per_s, day_s, lambda t: _shares(mix, hour_of(t)), mix, num_system_prompts,
                          vocab_size, seed)  # fmt: skip


def step_trace(
    phases: Sequence[tuple[float, float]],
    request: RequestClass,
    num_system_prompts: int = 4,
    vocab_size: int = 49152,
    seed: int = 0,
) -> list[TraceRequest]:
    """Poisson arrivals at a piecewise-constant rate: `phases` of (duration_s, rate_per_s), one after the other,
    every request of class `request`. Sorted by arrival."""
    ends = np.cumsum([d for d, _ in phases])
    rates = [r for _, r in phases]

    def rate(t: float) -> float:
        return rates[min(int(np.searchsorted(ends, t, side="right")), len(rates) - 1)]

    return _poisson_trace(rate, max(rates), float(ends[-1]), lambda t: [1.0], [request], num_system_prompts,
                          vocab_size, seed)  # fmt: skip


def _shares(mix: Sequence[RequestClass], hour: float) -> list[float]:
    return [c.share(hour) for c in mix]


def _poisson_trace(
    rate: Callable[[float], float],
    max_rate: float,
    duration_s: float,
    shares: Callable[[float], list[float]],
    mix: Sequence[RequestClass],
    num_system_prompts: int,
    vocab_size: int,
    seed: int,
) -> list[TraceRequest]:
    """Arrivals by thinning a `max_rate` Poisson process (Lewis-Shedler), then each request's class and lengths."""
    rng = np.random.default_rng(seed)

    def tokens(n: int) -> tuple[int, ...]:
        return tuple(rng.integers(_MIN_TOKEN_ID, vocab_size, n).tolist())

    systems = [[tokens(c.system_tokens) for _ in range(num_system_prompts)] for c in mix]
    requests: list[TraceRequest] = []
    t = 0.0
    while max_rate > 0:
        t += float(rng.exponential(1.0 / max_rate))
        if t >= duration_s:
            break
        if rng.random() * max_rate >= rate(t):
            continue
        weights = np.asarray(shares(t))
        k = int(rng.choice(len(mix), p=weights / weights.sum()))
        c = mix[k]
        prompt = systems[k][int(rng.integers(num_system_prompts))] + tokens(_length(rng, c.mean_user_tokens))
        requests.append(TraceRequest(f"r{len(requests)}", t, prompt, _length(rng, c.mean_output_tokens), k))
    return requests


def _length(rng: np.random.Generator, mean: float) -> int:
    """Lognormal with this mean, at least 1, at most `_MAX_LENGTH_FACTOR` x the mean."""
    mu = math.log(mean) - _LENGTH_SIGMA**2 / 2
    return int(min(max(round(rng.lognormal(mu, _LENGTH_SIGMA)), 1), math.ceil(_MAX_LENGTH_FACTOR * mean)))
