"""A load harness against any OpenAI-compatible endpoint (pdserve, vLLM, ...): workloads, open-loop Poisson arrivals,
rate sweeps, and goodput as DistServe defines it — the highest request rate at which at least 90% of requests meet
both the TTFT and the TPOT SLO — found by a bounded search.

Workloads (token-id prompts, so every server sees the same tokens; seeded):
  chat        ShareGPT-like lengths: log-normal prompts (median 180 tokens) and outputs (median 120)
  summarize   long prompts, 2k-8k tokens (capped by --max-prompt), outputs up to 128
  multiturn   conversations sharing a system prompt; each turn carries the whole history (prefix-cache friendly)
  mixed       chat, with a burst of summarize requests every --burst-every-s (what disaggregation is for)
  trace       replay --trace FILE.jsonl: {"t": s, "prompt_len": n, "output_len": m} (or "prompt": [ids]) per line

Per request: TTFT, TPOT, ITL (per token: the server reports usage in every chunk via `continuous_usage_stats`,
else chunks are assumed to carry one token), end-to-end latency. Output: JSON (every request), a Markdown summary,
and PNG plots when matplotlib is installed (latency CDFs, goodput vs rate, TPOT over time).

    python load_tests/harness.py --url http://127.0.0.1:8000/v1 --model m --workload chat --rate 2 --duration-s 60
    python load_tests/harness.py --url ... --workload mixed --sweep 0.5,1,2,4 --out results/mixed
    python load_tests/harness.py --url ... --goodput 0.25,8 --ttft-slo-s 2 --tpot-slo-s 0.25
    python load_tests/harness.py --serve colocated --tiny --rate 4 --duration-s 3    # starts pdserve itself
    python load_tests/harness.py --replot colocated=results/co 1p1d=results/pd --out results/compare  # plots only
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the test harness's cluster helpers

ATTAINMENT = 0.9  # DistServe's goodput: the share of requests that must meet both SLOs
LAG_WARN_S = 0.1  # a p99 client lag past this is reported: the run's arrivals were not the ones scheduled


@dataclass(frozen=True)
class Spec:
    at_s: float  # arrival, seconds after the run's start
    prompt: list[int]
    max_tokens: int
    kind: str = "chat"


@dataclass
class Record:
    kind: str
    sent_at_s: float
    prompt_tokens: int
    status: int = 0  # HTTP status (0: no answer)
    ttft_s: float | None = None
    e2e_s: float | None = None
    output_tokens: int = 0
    itl_s: list[float] = field(default_factory=list)  # per token after the first
    token_times_s: list[float] = field(default_factory=list)  # when each chunk's tokens arrived (run clock)
    # How many output tokens had arrived by each of token_times_s (from usage: a chunk may carry several tokens)
    token_counts: list[int] = field(default_factory=list)
    # Why a request answered 200 did not complete: an error event or a cut stream, no [DONE], fewer tokens than
    # asked for (every request sets ignore_eos), an unreadable chunk. Such a request misses the SLOs.
    error: str | None = None
    lag_s: float = 0.0  # how late the client sent it against its scheduled arrival (`sent_at_s`): its own delay

    @property
    def tpot_s(self) -> float | None:
        if self.ttft_s is None or self.e2e_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    def meets(self, ttft_slo_s: float, tpot_slo_s: float) -> bool:
        tpot = self.tpot_s
        return (
            self.status == 200
            and self.error is None
            and self.ttft_s is not None
            and self.ttft_s <= ttft_slo_s
            and (tpot is None or tpot <= tpot_slo_s)
        )


# ---- workloads --------------------------------------------------------------------------------------------------


def _tokens(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(100, vocab) for _ in range(n)]


def _lognormal(rng: random.Random, median: float, sigma: float, lo: int, hi: int) -> int:
    return max(lo, min(hi, round(median * math.exp(rng.gauss(0, sigma)))))


def workload(args: argparse.Namespace, rate: float, seed: int = 0) -> list[Spec]:
    """The requests of one run at `rate` requests/s: Poisson arrivals over `args.duration_s` (trace: its own).
    Seeded by the seed and the rate: two rates drawing as many arrivals would otherwise send the same prompts (a
    goodput search's neighbouring steps, on one server: a warm prefix cache), and every rate the same arrival draws
    scaled, so one unlucky draw would bias the whole sweep."""
    rng = random.Random(f"{seed}/{rate!r}")
    if args.workload == "trace":
        return _trace(Path(args.trace), args.vocab, rng)
    share = args.long_share if args.workload == "mixed" and args.long_share is not None else 0.0
    arrivals = _poisson(rng, rate * (1 - share), args.duration_s)
    specs: list[Spec] = []
    system = _tokens(rng, args.system_prompt, args.vocab)
    histories: list[list[int]] = [list(system) for _ in range(args.conversations)]
    for at in arrivals:
        if args.workload == "chat" or args.workload == "mixed":
            specs.append(_chat(rng, at, args))
        elif args.workload == "summarize":
            specs.append(_summarize(rng, at, args))
        elif args.workload == "multiturn":
            history = histories[rng.randrange(len(histories))]
            turn = _tokens(rng, _lognormal(rng, 60, 0.6, 4, 400), args.vocab)
            out = _lognormal(rng, 80, 0.6, 4, args.max_output)
            if len(history) + len(turn) + out > args.max_prompt:  # the context is full: a new conversation
                history[:] = system
            history += turn
            specs.append(Spec(at, list(history), out, "multiturn"))
            history += _tokens(rng, out, args.vocab)  # the reply joins the history (as the model's would)
    if args.workload == "mixed":  # bursts of long prompts on top of the chat stream
        if share:  # a fixed share of the rate: bursts at Poisson times, so the mix is the same at every rate
            bursts = _poisson(rng, rate * share / args.burst_size, args.duration_s)
        else:  # every --burst-every-s, whatever the rate
            bursts, at = [], args.burst_every_s / 2
            while at < args.duration_s:
                bursts.append(at)
                at += args.burst_every_s
        for burst_at in bursts:
            specs += [_summarize(rng, burst_at + 0.01 * i, args) for i in range(args.burst_size)]
    if not specs:  # an empty run would read as 0% within the SLOs
        raise SystemExit(f"no request arrives at {rate} req/s in {args.duration_s} s: raise --duration-s or the rate")
    return sorted(specs, key=lambda s: s.at_s)


def _poisson(rng: random.Random, rate: float, duration_s: float) -> list[float]:
    arrivals: list[float] = []
    t = rng.expovariate(rate) if rate > 0 else math.inf
    while t < duration_s:
        arrivals.append(t)
        t += rng.expovariate(rate)
    return arrivals


def _chat(rng: random.Random, at: float, args: argparse.Namespace) -> Spec:
    prompt = _tokens(rng, _lognormal(rng, 180, 0.9, 4, args.max_prompt), args.vocab)
    return Spec(at, prompt, _lognormal(rng, 120, 0.8, 4, args.max_output), "chat")


def _summarize(rng: random.Random, at: float, args: argparse.Namespace) -> Spec:
    output = rng.randint(16, min(128, args.max_output))
    # prompt + output within --max-prompt, the context: past it the server must refuse (1.5% of them were, a 400
    # counted as an SLO miss at any rate; found in review)
    top = max(1, min(8192, args.max_prompt) - output)
    n = rng.randint(min(2048, top), top)
    return Spec(at, _tokens(rng, n, args.vocab), output, "summarize")


def _trace(path: Path, vocab: int, rng: random.Random) -> list[Spec]:
    specs = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        prompt = row.get("prompt") or _tokens(rng, int(row["prompt_len"]), vocab)
        specs.append(Spec(float(row["t"]), prompt, int(row["output_len"]), row.get("kind", "trace")))
    return sorted(specs, key=lambda s: s.at_s)


# ---- one run ----------------------------------------------------------------------------------------------------


async def send(client: httpx.AsyncClient, url: str, model: str, spec: Spec, start: float, record: Record) -> None:
    body = {
        "model": model, "prompt": spec.prompt, "max_tokens": spec.max_tokens, "temperature": 0, "stream": True,
        "ignore_eos": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }  # fmt: skip
    sent = time.perf_counter()
    last_at, last_count, done = 0.0, 0, False
    try:
        async with client.stream("POST", f"{url}/completions", json=body) as response:
            record.status = response.status_code
            if response.status_code != 200:
                await response.aread()
                return
            async for line in response.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                if not line.startswith("data: ") or done:
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:  # the server failed the request after its 200 (pdserve, vLLM: an error event)
                    record.error = f"error event: {str(chunk['error'])[:200]}"
                    break
                usage = chunk.get("usage")
                has_text = any(c.get("text") for c in chunk.get("choices") or [])
                count = usage["completion_tokens"] if usage else last_count + int(has_text)
                if count > last_count and has_text:
                    now = time.perf_counter()
                    if record.ttft_s is None:
                        record.ttft_s = now - sent
                    else:  # a chunk of k tokens: k gaps of (now - last) / k
                        k = count - last_count
                        record.itl_s += [(now - last_at) / k] * k
                    record.token_times_s.append(now - start)
                    record.token_counts.append(count)
                    last_at, last_count = now, count
                if usage and not chunk.get("choices"):
                    last_count = usage["completion_tokens"]
            record.output_tokens = last_count
            record.e2e_s = time.perf_counter() - sent
            if record.error is None and not done:
                record.error = "the stream ended without [DONE]"
            elif record.error is None and last_count != spec.max_tokens:
                record.error = f"{last_count} of {spec.max_tokens} tokens (ignore_eos)"
    except Exception as e:  # a cut or timed-out stream, an unreadable chunk: this request failed, the run goes on
        record.output_tokens = last_count
        if record.status == 200:
            record.error = f"{type(e).__name__}: {str(e)[:200]}"


async def run(url: str, model: str, specs: list[Spec], progress: bool = True) -> tuple[list[Record], float]:
    """Send every spec at its arrival time (open loop: nothing waits for earlier answers)."""
    limits = httpx.Limits(max_connections=4096, max_keepalive_connections=256)
    records = [Record(s.kind, s.at_s, len(s.prompt)) for s in specs]
    bar = _progress(len(specs), progress)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0, connect=30.0), limits=limits) as client:
        start = time.perf_counter()

        async def one(spec: Spec, record: Record) -> None:
            await asyncio.sleep(max(0.0, spec.at_s - (time.perf_counter() - start)))
            record.lag_s = max(0.0, time.perf_counter() - start - spec.at_s)
            await send(client, url, model, spec, start, record)
            bar.update(1)

        await asyncio.gather(*(one(s, r) for s, r in zip(specs, records, strict=True)))
        wall = time.perf_counter() - start
    bar.close()
    return records, wall


async def warm_up(client: httpx.AsyncClient, url: str, model: str, n: int, vocab: int) -> None:
    """`n` short requests at once, before anything is measured (a first request pays for lazy allocations and
    compilations; a goodput search's first rate, or a sweep's, would carry them). Their prompts come from their own
    seed: no measured prompt shares a prefix with them. SystemExit if one fails."""
    rng = random.Random("warm-up")
    specs = [Spec(0.0, _tokens(rng, 32, vocab), 8, "warm-up") for _ in range(n)]
    records = [Record(s.kind, 0.0, len(s.prompt)) for s in specs]
    start = time.perf_counter()
    await asyncio.gather(*(send(client, url, model, s, start, r) for s, r in zip(specs, records, strict=True)))
    for r in records:
        if r.status != 200 or r.error is not None:
            raise SystemExit(f"the warm-up request failed (HTTP {r.status}{': ' + r.error if r.error else ''})")


def _progress(total: int, enabled: bool) -> Any:
    try:
        from tqdm import tqdm

        return tqdm(total=total, unit="req", disable=not enabled, leave=False)
    except ImportError:  # tqdm is optional

        class _Bar:
            def update(self, _n: int) -> None: ...
            def close(self) -> None: ...

        return _Bar()


# ---- summaries --------------------------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float | None:
    """The q-th percentile by nearest rank (a value that occurred: p99 of fewer than 100 values is their maximum)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def chunk_counts(r: Record) -> list[int]:
    """Output tokens arrived by each of the record's chunk times (a run saved before the counts were kept: one per
    chunk)."""
    return r.token_counts if len(r.token_counts) == len(r.token_times_s) else list(range(1, len(r.token_times_s) + 1))


def burst_split(records: list[Record]) -> dict[str, float | None]:
    """Chat streams during long-prompt prefills vs outside them (the mixed workload's question): TPOT p99 of chat
    requests whose decode overlaps a burst's prefill (from a summarize request's send to its first token) and of the
    others, and ITL p99 of token gaps inside and outside those windows."""
    # (a request's TTFT counts from its send: its scheduled arrival plus the client's lag)
    windows = [
        (r.sent_at_s + r.lag_s, r.sent_at_s + r.lag_s + r.ttft_s)
        for r in records
        if r.kind != "chat" and r.ttft_s is not None
    ]
    tpot: dict[bool, list[float]] = {True: [], False: []}
    itl: dict[bool, list[float]] = {True: [], False: []}

    def overlaps(a: float, b: float) -> bool:
        return any(start < b and a < end for start, end in windows)

    for r in records:
        times, counts = r.token_times_s, chunk_counts(r)
        if r.kind != "chat" or r.status != 200 or r.error is not None or len(times) < 2 or r.tpot_s is None:
            continue
        # The table's TPOT (`Record.tpot_s`, vLLM's: after the first token, over output tokens - 1), grouped by
        # whether the stream's decode overlapped a prefill burst; ITL by tokens, not chunks: a chunk of k tokens
        # (stream_interval, or a server merging steps under load) is k gaps of a k-th of its wait each
        tpot[overlaps(times[0], times[-1])].append(r.tpot_s)
        for (a, b), (m, n) in zip(itertools.pairwise(times), itertools.pairwise(counts), strict=True):
            itl[overlaps(a, b)] += [(b - a) / (n - m)] * (n - m)
    return {
        "burst_tpot_s_p99": pct(tpot[True], 99), "idle_tpot_s_p99": pct(tpot[False], 99),
        "burst_itl_s_p99": pct(itl[True], 99), "idle_itl_s_p99": pct(itl[False], 99),
    }  # fmt: skip


def summary(rate: float, records: list[Record], wall_s: float, args: argparse.Namespace) -> dict[str, Any]:
    ok = [r for r in records if r.status == 200 and r.error is None]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    tpot = [t for r in ok if (t := r.tpot_s) is not None]
    itl = [g for r in ok for g in r.itl_s]
    e2e = [r.e2e_s for r in ok if r.e2e_s is not None]
    met = sum(r.meets(args.ttft_slo_s, args.tpot_slo_s) for r in records)
    statuses: dict[str, int] = {}
    for r in records:  # "200 failed": answered 200, then failed (Record.error)
        status = str(r.status) if r.error is None else f"{r.status} failed"
        statuses[status] = statuses.get(status, 0) + 1
    return {
        "rate": rate, "requests": len(records), "statuses": statuses, "wall_s": wall_s,
        # the rate the run really offered (Poisson draws over a finite run stray from the nominal one)
        "sent_rate": len(records) / duration if (duration := getattr(args, "duration_s", None)) and
        getattr(args, "workload", None) != "trace" else None,
        "output_tokens_per_s": sum(r.output_tokens for r in ok) / wall_s if wall_s else 0.0,
        "slo_attainment": met / len(records) if records else 0.0,
        **{f"{name}_p{q}": pct(values, q) for name, values in
           (("ttft_s", ttft), ("tpot_s", tpot), ("itl_s", itl), ("e2e_s", e2e)) for q in (50, 90, 99)},
        "client_lag_s_p99": pct([r.lag_s for r in records], 99),
        **burst_split(records),
    }  # fmt: skip


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace, goodput: str | None) -> str:
    """The runs' table (and `goodput`, the search's line, after it)."""

    def f(v: float | None, scale: float = 1.0) -> str:
        return "—" if v is None else f"{v * scale:.2f}"

    lines = [
        f"workload {args.workload} (seed {getattr(args, 'seed', None)}); SLOs: TTFT ≤ {args.ttft_slo_s} s, TPOT ≤ "
        f"{1000 * args.tpot_slo_s:.0f} ms; latencies over the requests that completed (the others count as misses)",
        "",
        "| rate req/s | sent req/s | requests | statuses | out tok/s | TTFT p50/p90/p99 s | TPOT p50/p90/p99 ms | "
        "ITL p99 ms | e2e p90 s | within both SLOs |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['rate']:.2f} | {f(r.get('sent_rate'))} | {r['requests']} | {r['statuses']} | "
            f"{r['output_tokens_per_s']:.1f} | "
            f"{f(r['ttft_s_p50'])} / {f(r['ttft_s_p90'])} / {f(r['ttft_s_p99'])} | "
            f"{f(r['tpot_s_p50'], 1e3)} / {f(r['tpot_s_p90'], 1e3)} / {f(r['tpot_s_p99'], 1e3)} | "
            f"{f(r['itl_s_p99'], 1e3)} | {f(r['e2e_s_p90'])} | {100 * r['slo_attainment']:.0f}% |"
        )
    if any(r.get("burst_tpot_s_p99") is not None for r in rows):
        lines += [
            "", "Chat streams during long-prompt prefills (bursts) vs outside them:", "",
            "| rate req/s | chat TPOT p99 ms: burst / idle | ratio | ITL p99 ms: in bursts / outside |",
            "|---|---|---|---|",
        ]  # fmt: skip
        for r in rows:
            burst, idle = r.get("burst_tpot_s_p99"), r.get("idle_tpot_s_p99")
            ratio = f"{burst / idle:.2f}" if burst is not None and idle else "—"
            lines.append(
                f"| {r['rate']:.2f} | {f(burst, 1e3)} / {f(idle, 1e3)} | {ratio} | "
                f"{f(r.get('burst_itl_s_p99'), 1e3)} / {f(r.get('idle_itl_s_p99'), 1e3)} |"
            )
    for r in rows:  # .get: results saved before the lag was recorded have none
        if (lag := r.get("client_lag_s_p99")) is not None and lag > LAG_WARN_S:
            lines += [
                "", f"At {r['rate']:.2f} req/s the client sent 1% of its requests {lag:.2f} s or more after their "
                "scheduled arrival (p99 lag): the server saw fewer arrivals than scheduled. Give the client a core of "
                "its own, or lower the rate."
            ]  # fmt: skip
    if goodput is not None:
        lines += ["", goodput]
    return "\n".join(lines)


def cdf_points(values: list[float], num_sent: int) -> tuple[list[float], list[float]]:
    """A latency CDF over all requests sent: the refused and failed ones (no value) never reach the top, so a mode
    refusing more does not look better."""
    ordered = sorted(values)
    return ordered, [(i + 1) / num_sent for i in range(len(ordered))]


def plots(out: Path, runs: list[tuple[dict[str, Any], list[Record]]], args: argparse.Namespace) -> list[Path]:
    """Latency CDFs per rate, SLO attainment vs rate, and TPOT over time (the last run). Needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib is not installed: no plots; pip install matplotlib)")
        return []
    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for row, records in runs:
        for ax, values in zip(axes, ([r.ttft_s for r in records if r.ttft_s is not None],
                                     [t for r in records if (t := r.tpot_s) is not None]), strict=True):  # fmt: skip
            ax.plot(*cdf_points(values, len(records)), label=f"{row['rate']:.2f} req/s")
    for ax, name, slo in zip(axes, ("TTFT s", "TPOT s"), (args.ttft_slo_s, args.tpot_slo_s), strict=True):
        ax.axvline(slo, color="gray", linestyle="--")
        ax.set_xlabel(name)
        ax.set_ylabel("share of requests")
        ax.legend()
    paths.append(_save(fig, out / "latency_cdf.png"))
    fig, ax = plt.subplots(figsize=(6, 4))
    rows = sorted((row for row, _ in runs), key=lambda r: r["rate"])
    ax.plot([r["rate"] for r in rows], [r["slo_attainment"] for r in rows], marker="o")
    ax.axhline(ATTAINMENT, color="gray", linestyle="--")
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("share within both SLOs")
    paths.append(_save(fig, out / "goodput_vs_rate.png"))
    fig, ax = plt.subplots(figsize=(8, 4))
    _, records = runs[-1]
    points = sorted((r.token_times_s[-1], r.tpot_s) for r in records if r.token_times_s and r.tpot_s is not None)
    ax.scatter([p[0] for p in points], [p[1] for p in points], s=6, label="TPOT (at the request's end)")
    for r in records:
        if r.kind == "summarize":
            ax.axvline(r.sent_at_s, color="red", alpha=0.1)  # long-prompt arrivals
    ax.set_xlabel("time s")
    ax.set_ylabel("TPOT s")
    ax.legend()
    paths.append(_save(fig, out / "tpot_over_time.png"))
    return paths


def load(directory: Path) -> tuple[dict[str, Any], list[tuple[dict[str, Any], list[Record]]]]:
    """A run's saved results (`results.json`, or the `.json.gz` committed under results/): the JSON and its runs."""
    path = directory / "results.json"
    if not path.exists():
        import gzip

        data = json.loads(gzip.decompress((directory / "results.json.gz").read_bytes()))
    else:
        data = json.loads(path.read_text())
    runs = [(row, [Record(**r) for r in records]) for row, records in zip(data["runs"], data["requests"], strict=True)]
    return data, runs


def compare_plots(out: Path, modes: dict[str, list[tuple[dict[str, Any], list[Record]]]], args: argparse.Namespace
                  ) -> list[Path]:  # fmt: skip
    """Several saved runs side by side (e.g. colocated vs 1P1D): SLO attainment vs rate, latency CDFs at the highest
    rate every mode ran, and each chat stream's ITL over time at that rate with the long-prompt prefills shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, runs in modes.items():
        rows = sorted((row for row, _ in runs), key=lambda r: r["rate"])
        ax.plot([r["rate"] for r in rows], [r["slo_attainment"] for r in rows], marker="o", label=name)
    ax.axhline(ATTAINMENT, color="gray", linestyle="--")
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("share within both SLOs")
    ax.legend()
    paths.append(_save(fig, out / "goodput_vs_rate.png"))
    common = set.intersection(*({row["rate"] for row, _ in runs} for runs in modes.values()))
    if not common:
        return paths
    rate = max(common)
    at_rate = {name: next(records for row, records in runs if row["rate"] == rate) for name, runs in modes.items()}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, records in at_rate.items():
        for ax, values in zip(axes, ([r.ttft_s for r in records if r.ttft_s is not None],
                                     [t for r in records if (t := r.tpot_s) is not None]), strict=True):  # fmt: skip
            ax.plot(*cdf_points(values, len(records)), label=name)
    for ax, label, slo in zip(axes, ("TTFT s", "TPOT s"), (args.ttft_slo_s, args.tpot_slo_s), strict=True):
        ax.axvline(slo, color="gray", linestyle="--")
        ax.set_xlabel(f"{label} at {rate:.2f} req/s")
        ax.set_ylabel("share of requests")
        ax.legend()
    paths.append(_save(fig, out / "latency_cdf.png"))
    fig, axes = plt.subplots(len(at_rate), 1, figsize=(10, 2.6 * len(at_rate)), sharex=True, sharey=True)
    for ax, (name, records) in zip(list(axes) if len(at_rate) > 1 else [axes], at_rate.items(), strict=True):
        for r in records:
            if r.kind != "chat" and r.ttft_s is not None:
                ax.axvspan(r.sent_at_s, r.sent_at_s + r.ttft_s, color="red", alpha=0.08)  # a long prompt's prefill
            elif r.kind == "chat" and len(r.token_times_s) > 1:
                times, counts = r.token_times_s, chunk_counts(r)
                pairs = zip(itertools.pairwise(times), itertools.pairwise(counts), strict=True)
                ax.plot(times[1:], [(b - a) / (n - m) for (a, b), (m, n) in pairs], lw=0.6)  # per token
        ax.set_ylabel(f"{name}\nITL s")
        ax.set_yscale("log")
    (axes[-1] if len(at_rate) > 1 else axes).set_xlabel(
        f"time s at {rate:.2f} req/s (red: long prompts from send to first token; one line per chat stream)"
    )
    paths.append(_save(fig, out / "itl_over_time.png"))
    return paths


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


# ---- the runs ---------------------------------------------------------------------------------------------------


def goodput_search(url: str, model: str, args: argparse.Namespace, runs: list[Any]) -> tuple[float | None, bool]:
    """Bisection on the rate between `lo` and `hi` (bounded: --goodput-steps runs; `lo` first, then `hi`): the
    highest rate found at which ≥ 90% of requests met both SLOs (None if even `lo` missed), and whether that rate is
    `hi` (the goodput is then at least `hi`: raise the bounds to find it)."""
    lo, hi = (float(x) for x in args.goodput.split(","))
    ceiling = hi
    best: float | None = None
    for step in range(args.goodput_steps):
        rate = lo if step == 0 else hi if step == 1 else (lo + hi) / 2
        records, wall = asyncio.run(run(url, model, workload(args, rate, args.seed), not args.quiet))
        row = summary(rate, records, wall, args)
        runs.append((row, records))
        print(f"rate {rate:.2f} req/s: {100 * row['slo_attainment']:.0f}% within both SLOs", flush=True)
        if row["slo_attainment"] >= ATTAINMENT:
            best = rate if best is None else max(best, rate)
            lo = rate
        else:
            hi = rate
        if best is None or best == ceiling:  # even the lowest rate misses, or the highest meets: nothing to bisect
            break
    return best, best == ceiling


def goodput_line(goodput: float | None, at_least: bool, args: argparse.Namespace) -> str:
    share = f"≥ {100 * ATTAINMENT:.0f}% of requests within both SLOs"
    if goodput is None:
        return f"goodput ({share}): none found — even {args.goodput.split(',')[0]} req/s missed; lower the bounds"
    return f"goodput ({share}): {'≥ ' if at_least else ''}{goodput:.2f} req/s" + (
        " (the search's highest rate met the SLOs: raise the bounds)" if at_least else ""
    )


@contextmanager
def served(
    kind: str, tiny: bool, threads: int | None, pin: bool = False, overrides: dict[str, Any] | None = None
) -> Iterator[tuple[str, str]]:
    """pdserve on a local Ray cluster: `colocated` or `1p1d` (SmolLM2-135M, or a tiny Llama with `tiny`); with
    `pin`, 1p1d's prefill runs on the first half of the cores and its decode on the rest (colocated: all);
    `overrides`: more ServeConfig fields (e.g. {"router": {"local_prefill_max_tokens": 0}})."""
    from ray import serve

    from pdserve.hub import resolve_model
    from pdserve.serve.app import build_app
    from pdserve.serve.config import ServeConfig
    from serving import free_port, ray_serve

    if tiny:
        from tiny_models import build_tiny_model

        path = str(build_tiny_model(Path(os.environ.get("TMPDIR", "/tmp")) / "pdserve-harness-tiny", "llama"))
    else:
        path = str(resolve_model(None))
    pool: dict[str, Any] = {"num_threads": threads}
    cores = sorted(os.sched_getaffinity(0))
    half = max(1, len(cores) // 2)
    prefill = {**pool, "cpus": cores[:half]} if pin else pool
    decode = {**pool, "cpus": cores[half:] or cores} if pin else pool
    config = ServeConfig(
        model=path, served_model_name="m", colocated=kind == "colocated", prefill=prefill, decode=decode,
        engine=pool, tracing_env={}, **(overrides or {}),
    )  # fmt: skip
    port = free_port()
    with ray_serve(port):
        serve.run(build_app(config), name="harness", route_prefix="/")
        yield f"http://127.0.0.1:{port}/v1", "m"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="the server's OpenAI base URL (ends in /v1)")
    parser.add_argument("--model", default=None, help="the model name it serves (default: the first it lists)")
    parser.add_argument("--serve", choices=["colocated", "1p1d"], help="start pdserve locally instead of --url")
    parser.add_argument("--tiny", action="store_true", help="with --serve: a tiny random Llama (smoke runs)")
    parser.add_argument("--threads", type=int, default=None, help="with --serve: torch threads per engine")
    parser.add_argument("--pin", action="store_true", help="with --serve 1p1d: P and D on halves of the cores")
    parser.add_argument(
        "--config", type=json.loads, default=None, metavar="JSON",
        help='with --serve: more ServeConfig fields, e.g. \'{"router": {"local_prefill_max_tokens": 0}}\'',
    )  # fmt: skip
    parser.add_argument("--workload", default="chat", choices=["chat", "summarize", "multiturn", "mixed", "trace"])
    parser.add_argument("--trace", help="JSONL trace for --workload trace")
    parser.add_argument("--rate", type=float, default=1.0, help="requests per second (Poisson)")
    parser.add_argument("--sweep", help="comma-separated rates to run one after another")
    parser.add_argument("--goodput", metavar="LO,HI", help="search the goodput between these rates")
    parser.add_argument("--goodput-steps", type=int, default=5)
    parser.add_argument("--duration-s", type=float, default=60.0)
    parser.add_argument("--ttft-slo-s", type=float, default=2.0)
    parser.add_argument("--tpot-slo-s", type=float, default=0.25)
    parser.add_argument("--max-prompt", type=int, default=8192)
    parser.add_argument("--max-output", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=49000, help="token ids are drawn below this")
    parser.add_argument("--system-prompt", type=int, default=512, help="multiturn: shared system prompt tokens")
    parser.add_argument("--conversations", type=int, default=8, help="multiturn: concurrent conversations")
    parser.add_argument("--burst-every-s", type=float, default=20.0, help="mixed: seconds between bursts")
    parser.add_argument("--burst-size", type=int, default=4, help="mixed: long prompts per burst")
    parser.add_argument(
        "--long-share", type=float, default=None, metavar="F",
        help="mixed: long prompts are this share of --rate, in bursts of --burst-size at Poisson times (instead of "
        "every --burst-every-s): the same mix at every rate, as a goodput search needs",
    )  # fmt: skip
    parser.add_argument(
        "--seed", type=int, default=None,
        help="the workload's seed (default: the time, printed in the summary): a long-running server's prefix "
        "cache must not hold an earlier run's prompts",
    )  # fmt: skip
    parser.add_argument(
        "--warmup", type=int, default=2, metavar="N",
        help="short requests sent at once before the first measured run (0: none)",
    )  # fmt: skip
    parser.add_argument("--out", default=None, help="directory for results.json, summary.md and plots")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument(
        "--nice", type=int, default=15,
        help="the client's niceness (pdserve's replicas and vLLM run at 0, Serve's proxy at Ray's 15)",
    )  # fmt: skip
    parser.add_argument(
        "--replot", nargs="+", metavar="NAME=DIR",
        help="no run: plot saved results (--out of earlier runs) side by side into --out, e.g. colocated=DIR 1p1d=DIR",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.replot:
        modes = {}
        for item in args.replot:
            name, _, directory = item.rpartition("=")
            data, runs = load(Path(directory))
            modes[name or directory] = runs
        saved = argparse.Namespace(**{**data["args"], "out": args.out})
        out = Path(args.out or ".")
        out.mkdir(parents=True, exist_ok=True)
        for path in compare_plots(out, modes, saved):
            print(f"plot: {path}")
        return {"modes": list(modes)}
    if not args.url and not args.serve:
        parser.error("give --url of a server, or --serve to start pdserve")
    if args.workload == "trace" and (args.goodput or args.sweep):
        parser.error("a trace replays its own arrival times: --goodput and --sweep vary a rate it does not have")
    if args.goodput is not None and args.goodput_steps < 2:  # `lo` then `hi` at least: one run bounds nothing above
        parser.error("--goodput-steps must be at least 2 (the lower bound, then the upper)")
    os.nice(max(0, args.nice - os.nice(0)))
    args.seed = int(time.time()) if args.seed is None else args.seed
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    cpu = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if "Model name" in line), "?")
    flags = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in lscpu]
    header = f"CPU: {cpu} ({' '.join(flags)}); client at niceness {os.nice(0)}"
    print(header, flush=True)
    runs: list[tuple[dict[str, Any], list[Record]]] = []
    goodput: float | None = None
    at_least = False
    server = (
        served(args.serve, args.tiny, args.threads, args.pin, args.config)
        if args.serve
        else _nothing(args.url, args.model)
    )
    with server as (url, model):
        if args.warmup:
            asyncio.run(_warm_up(url, model, args.warmup, args.vocab))
        if args.goodput:
            goodput, at_least = goodput_search(url, model, args, runs)
        else:
            rates = [float(x) for x in args.sweep.split(",")] if args.sweep else [args.rate]
            for rate in rates:
                records, wall = asyncio.run(run(url, model, workload(args, rate, args.seed), not args.quiet))
                runs.append((summary(rate, records, wall, args), records))
    rows = [row for row, _ in runs]
    text = markdown(rows, args, goodput_line(goodput, at_least, args) if args.goodput else None)
    print("\n" + text)
    result = {"cpu": header, "args": vars(args), "goodput": goodput, "goodput_at_least": at_least, "runs": rows,
              "requests": [[asdict(r) for r in records] for _, records in runs]}  # fmt: skip
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(result))
        (out / "summary.md").write_text(header + "\n\n" + text + "\n")
        for path in plots(out, runs, args):
            print(f"plot: {path}")
    return result


async def _warm_up(url: str, model: str, n: int, vocab: int) -> None:
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0, connect=30.0)) as client:
        await warm_up(client, url, model, n, vocab)


@contextmanager
def _nothing(url: str, model: str | None) -> Iterator[tuple[str, str]]:
    """A running server: `model`, or the first model it lists (`GET /models`)."""
    if model is None:
        listed = httpx.get(f"{url.rstrip('/')}/models", timeout=30).raise_for_status().json()["data"]
        model = str(listed[0]["id"])
    yield url, model


if __name__ == "__main__":
    main()
