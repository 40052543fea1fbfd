"""The autoscaling planner in the simulator: a diurnal day at cluster sizes 8-64, against the best fixed P:D split in
hindsight and Ray Serve's default per-deployment autoscaling.

    python load_tests/planner_sim.py --out load_tests/results/DATE-planner-sim     # the must-show, ~5 min on 2 cores
    python load_tests/planner_sim.py --sizes 8 --day-s 3600                         # one size, a slower day
    python load_tests/planner_sim.py --sizes 8 --exhaustive                         # every fixed split, not a search

Per size N (the most replicas the cluster holds, prefill + decode), one trace: `diurnal_trace` with its peak rate
scaled so that the busiest hour needs about N replicas (a capacity estimate from the replica model; the mix moves
from summarization in working hours to long answers in the evening, so the best P:D ratio moves too). On it:

  planner        pdserve.planner.Planner every tick, each pool bounded to [1, N - 1], at most N replicas in all
                 (growth beyond that waits for room, as on a full cluster); told the cluster's size
                 (`max_total_replicas` = N: the pools share N devices, so a pool short of room takes it from the
                 other at once); its priors set to the replica model, everything else its defaults
  best fixed     fixed pools (p, d), p + d <= N: the best goodput per replica-hour found in hindsight. A pattern search
                 on the (p, d) grid (moves of p, d, or one replica from one pool to the other; the step halves down
                 to 1) from the estimated peak need, or from the previous size's best split scaled; at most
                 --max-fixed-runs splits per size, and none that could not beat the best so far even at full
                 attainment. --exhaustive simulates every split instead (slow beyond N = 8).
  serve default  Ray Serve's default autoscaling on each pool (ongoing requests per replica vs 2; upscale 30 s,
                 downscale 600 s, 30 s look-back), the same bounds and cap

Goodput = requests meeting both TTFT <= --ttft-slo-s and TPOT <= --tpot-slo-s; replica-hours integrate every replica
held (starting and draining ones too) until the last request finishes. The autoscaled runs start at the estimated
need of midnight. At the smallest size two extras: the planner with tighter and looser SLOs of its own (goodput still
judged at the SLOs above), and the planner and the best fixed split on a day 4x less compressed.

Compression: simulating 24 h at 64 replicas takes hours on 2 cores, so `--day-s` compresses the day (the load changes
that much faster) while replica start-up (`--startup-s`), the planner's cool-downs and Serve's delays stay in real
seconds. At the default --day-s 1920 an "hour" lasts 80 s: a replica starts in 3/4 of an "hour", the planner scales a
pool down at most once per 3/4 "hour", and Serve's downscale delay (600 s) lasts 7.5 "hours". That makes every
autoscaler's job harder than on a real day, where load changes over hours (fixed pools are unaffected); the
4x-longer-day extra shows how much. --day-s 86400 is a real day.

Writes to --out: summary.md (the tables), results.json (every run: totals and timeline) and one timeline PNG per size
(arrival rate; replicas per pool, starting and draining ones included; TTFT and TPOT p90 per tick window).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import multiprocessing
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pdserve.planner import PlannerConfig, PoolBounds
from pdserve.sim import (
    GPU_REPLICA,
    SLO,
    PlannerPolicy,
    ReplicaModel,
    ScalingPolicy,
    ServeAutoscalingConfig,
    ServeDefaultPolicy,
    SimConfig,
    TraceRequest,
    calibrated_cost,
    diurnal_trace,
    simulate,
)
from pdserve.sim.workloads import DAY_MIX, day_rate

# Model parameters, not measurements. "emulated": the device load_tests/autoscale_step.py pads real replicas' steps to
# (20 ms + 0.5 ms per prompt token + 3 ms per sequence; the simulator charges the 3 ms to decoding sequences only),
# so the two tests share a device; it also streams half the tokens per replica of "cpu", so a day costs half as much
# to simulate. "cpu": SmolLM2-135M on the 2-core dev box; "gpu": an 8B model on one H100.
PRESETS = {
    "emulated": ReplicaModel(0.020, 0.0005, 0.003, num_blocks=2048, max_num_batched_tokens=512),
    "cpu": ReplicaModel(),
    "gpu": GPU_REPLICA,
}


@dataclass
class Run:
    """One simulated run, reduced to what the table, the JSON and the plots need."""

    name: str  # "planner", "serve_default", "fixed"
    prefill: int  # fixed pools; the initial ones otherwise
    decode: int
    num_requests: int = 0
    num_good: int = 0
    attainment: float = 0.0
    replica_hours: float = 0.0
    goodput_per_replica_hour: float = 0.0
    ttft_p90_s: float = 0.0
    tpot_p90_s: float = 0.0
    makespan_s: float = 0.0
    wall_s: float = 0.0
    timeline: list[dict[str, Any]] = field(default_factory=list)
    slo: tuple[float, float] = (0.0, 0.0)  # the planner's own SLOs (planner runs)


@dataclass
class Size:
    size: int
    day_s: float
    peak_rate_per_s: float
    num_requests: int
    planner: Run
    serve_default: Run
    best_fixed: Run
    num_fixed_runs: int
    wall_s: float
    slo_variants: list[Run] = field(default_factory=list)  # the planner with tight and loose SLOs of its own
    longer_day: list[Run] = field(default_factory=list)  # planner and the best fixed split on a less compressed day


# ---- sizing: a capacity estimate from the replica model (for the trace's scale and starting points only) ---------


def per_request_need(hour: float, model: ReplicaModel, slo: SLO) -> tuple[float, float]:
    """Prefill and decode replicas one request per second needs at `hour`'s mix: prompt tokens over 70% of the
    prefill rate; output tokens over what a decode replica streams at the batch its KV (80%), `max_num_seqs` and
    80% of the TPOT SLO allow."""
    weights = [c.share(hour) for c in DAY_MIX]
    total = sum(weights)
    prompt = sum(w * c.mean_user_tokens for w, c in zip(weights, DAY_MIX, strict=True)) / total  # system prompts hit
    output = sum(w * c.mean_output_tokens for w, c in zip(weights, DAY_MIX, strict=True)) / total
    resident = sum(w * (c.system_tokens + c.mean_user_tokens + c.mean_output_tokens / 2)
                   for w, c in zip(weights, DAY_MIX, strict=True)) / total  # fmt: skip
    by_kv = 0.8 * model.num_blocks * model.block_size / resident
    by_tpot = (0.8 * slo.tpot_s - model.step_base_s) / model.per_decode_seq_s
    batch = max(1.0, min(by_kv, by_tpot, model.max_num_seqs))
    per_decode_tokens_s = batch / model.step_s(0, round(batch))
    return prompt / (0.7 * model.prefill_tokens_per_s), output / per_decode_tokens_s


def peak_rate_for(size: int, model: ReplicaModel, slo: SLO) -> float:
    """The peak rate at which the day's busiest hour needs about `size` replicas."""
    hours = [h / 4 for h in range(96)]
    busiest = max(day_rate(h) * sum(per_request_need(h, model, slo)) for h in hours)
    return size / busiest


def need_at(hour: float, rate: float, size: int, model: ReplicaModel, slo: SLO) -> tuple[int, int]:
    p, d = per_request_need(hour, model, slo)
    p_n, d_n = max(1, math.ceil(rate * p)), max(1, math.ceil(rate * d))
    while p_n + d_n > size:
        p_n, d_n = (p_n - 1, d_n) if p_n / p >= d_n / d and p_n > 1 else (p_n, d_n - 1)
    return p_n, d_n


# ---- runs (in worker processes; the trace and the config are inherited through fork) ------------------------------

_TRACE: Sequence[TraceRequest] = ()
_CONFIG: SimConfig | None = None
_SLO = SLO(2.0, 0.1)


@dataclass(frozen=True)
class Task:
    name: str
    prefill: int
    decode: int
    planner_slo: tuple[float, float] | None = None


def run_task(task: Task) -> Run:
    assert _CONFIG is not None
    size = _CONFIG.max_replicas or 2
    config = dataclasses.replace(_CONFIG, num_prefill=task.prefill, num_decode=task.decode)
    policy: ScalingPolicy | None = None
    if task.name == "planner":
        ttft_s, tpot_s = task.planner_slo or (_SLO.ttft_s, _SLO.tpot_s)
        bounds, model = PoolBounds(1, size - 1), _CONFIG.replica
        policy = PlannerPolicy(
            PlannerConfig(
                ttft_s, tpot_s, bounds, bounds,
                prior_prefill_tokens_per_s=model.prefill_tokens_per_s,  # what an operator configures for the device
                prior_decode_step_base_s=model.step_base_s,
                prior_decode_step_per_seq_s=model.per_decode_seq_s,
                max_total_replicas=size,  # the pools share the cluster's N devices, as the fixed splits do
            )
        )  # fmt: skip
    elif task.name == "serve_default":
        serve = ServeAutoscalingConfig(min_replicas=1, max_replicas=size - 1)
        policy = ServeDefaultPolicy(serve, serve)
    start = time.perf_counter()
    result = simulate(_TRACE, config, policy)
    run = Run(task.name, task.prefill, task.decode, wall_s=time.perf_counter() - start)
    run.num_requests = len(result.records)
    run.num_good = result.num_good(_SLO)
    run.attainment = result.attainment(_SLO)
    run.replica_hours = result.replica_hours
    run.goodput_per_replica_hour = result.goodput_per_replica_hour(_SLO)
    run.ttft_p90_s = _p90([r.ttft_s for r in result.records])
    run.tpot_p90_s = _p90([r.tpot_s for r in result.records])
    run.makespan_s = result.makespan_s
    run.slo = task.planner_slo or (_SLO.ttft_s, _SLO.tpot_s)
    run.timeline = [
        {"time_s": p.time_s, "rate": p.arrivals_per_s, "prefill": asdict(p.prefill), "decode": asdict(p.decode),
         "ttft_p90_s": p.ttft_p90_s, "tpot_p90_s": p.tpot_p90_s}
        for p in result.timeline()
    ]  # fmt: skip
    return run


def _p90(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))] if ordered else 0.0


class Runner:
    """Runs tasks in a pool of forked workers (the trace is shared, not pickled), with a progress bar."""

    def __init__(self, jobs: int, label: str) -> None:
        self.pool = multiprocessing.get_context("fork").Pool(jobs) if jobs > 1 else None
        self.label = label
        self.num_done = 0

    def map(self, tasks: Sequence[Task]) -> list[Run]:
        if not tasks:
            return []
        results: dict[Task, Run] = {}
        it: Iterable[tuple[Task, Run]] = (
            self.pool.imap_unordered(_run_keyed, tasks) if self.pool else map(_run_keyed, tasks)
        )
        for task, run in _progress(it, len(tasks), self.label):
            results[task] = run
            self.num_done += 1
        return [results[t] for t in tasks]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool.join()


def _run_keyed(task: Task) -> tuple[Task, Run]:
    return task, run_task(task)


def _progress(it: Iterable[Any], total: int, label: str) -> Iterable[Any]:
    try:
        from tqdm import tqdm
    except ImportError:
        for i, x in enumerate(it, 1):
            print(f"  {label}: {i}/{total}", flush=True)
            yield x
        return
    yield from tqdm(it, total=total, desc=label, leave=False)


# ---- the best fixed split in hindsight ------------------------------------------------------------------------


def best_fixed(
    runner: Runner, size: int, start: tuple[int, int], first: list[Run], max_runs: int, exhaustive: bool
) -> tuple[Run, int]:
    """The fixed (p, d) with the best goodput per replica-hour, and how many fixed splits were simulated. `first`
    holds fixed runs already done (alongside the autoscaled runs)."""
    done: dict[tuple[int, int], Run] = {(r.prefill, r.decode): r for r in first}
    hours_floor = max(t.arrival_s for t in _TRACE) / 3600  # a fixed split is held at least this long
    valid = {(p, n - p) for n in range(2, size + 1) for p in range(1, n)}

    def best_run() -> Run:
        return max(done.values(), key=lambda r: (r.goodput_per_replica_hour, -r.prefill - r.decode))

    def evaluate(splits: Iterable[tuple[int, int]], limit: int | None = None) -> None:
        """Simulate the splits that are valid, new and could beat the best at all; at most `limit` of them."""
        bar = best_run().goodput_per_replica_hour if done else 0.0
        todo = [s for s in dict.fromkeys(splits) if s in valid and s not in done]
        todo = [s for s in todo if len(_TRACE) / (sum(s) * hours_floor) > bar][:limit]
        for run in runner.map([Task("fixed", p, d) for p, d in todo]):
            done[(run.prefill, run.decode)] = run

    if exhaustive:
        evaluate(sorted(valid, key=lambda s: (sum(s), s)))
        return best_run(), len(done)
    evaluate([start])
    current, step = start, max(1, size // 16)
    while step >= 1 and len(done) < max_runs:
        p, d = current
        # Moving replicas between the pools first (at the cluster's size they are the only moves that keep it),
        # then smaller pools, then larger ones; the budget counts only splits actually simulated.
        moves = [(p + step, d - step), (p - step, d + step), (p - step, d), (p, d - step), (p + step, d), (p, d + step)]
        evaluate(moves, max_runs - len(done))
        best = best_run()
        if (best.prefill, best.decode) != current:
            current = (best.prefill, best.decode)
        else:
            step //= 2
    return best_run(), len(done)


# ---- one cluster size ------------------------------------------------------------------------------------------


def run_size(args: argparse.Namespace, size: int, previous: Size | None) -> Size:
    start = time.perf_counter()
    model = PRESETS[args.preset]
    peak = peak_rate_for(size, model, _SLO) * args.load
    set_trace(args, size, args.day_s, peak)
    midnight = need_at(0.0, peak * day_rate(0.0), size, model, _SLO)
    first_split = max((need_at(h / 2, peak * day_rate(h / 2), size, model, _SLO) for h in range(48)), key=sum)
    if previous is not None:  # the smaller cluster's best split, scaled: a better start than the estimate
        scale = size / previous.size
        first_split = (round(previous.best_fixed.prefill * scale), round(previous.best_fixed.decode * scale))
    num_requests = len(_TRACE)
    extras = args.extras and size == min(args.sizes)
    runner = Runner(args.jobs, f"N={size}")
    try:
        tasks = [Task("planner", *midnight), Task("serve_default", *midnight), Task("fixed", *first_split)]
        if extras:
            tasks += [Task("planner", *midnight, slo) for slo in ((1.0, 0.05), (4.0, 0.2))]
        first = runner.map(tasks)
        fixed, num_fixed = best_fixed(runner, size, first_split, [first[2]], args.max_fixed_runs, args.exhaustive)
    finally:
        runner.close()
    longer: list[Run] = []
    if extras:  # the same size on a day 4x less compressed: how much of the result is the compression
        set_trace(args, size, 4 * args.day_s, peak)
        runner = Runner(args.jobs, f"N={size}, day {4 * args.day_s:.0f} s")
        try:
            longer = runner.map([Task("planner", *midnight), Task("fixed", fixed.prefill, fixed.decode)])
        finally:
            runner.close()
    return Size(size, args.day_s, peak, num_requests, first[0], first[1], fixed, num_fixed,
                time.perf_counter() - start, first[3:], longer)  # fmt: skip


def set_trace(args: argparse.Namespace, size: int, day_s: float, peak: float) -> None:
    """The trace and config the next forked workers inherit."""
    global _TRACE, _CONFIG
    _TRACE = diurnal_trace(peak, day_s=day_s, seed=args.seed)
    config = SimConfig(1, 1, PRESETS[args.preset], sync_period_s=args.sync_period_s, seed=args.seed,
                       tick_s=args.tick_s, startup_s=args.startup_s, max_replicas=size)  # fmt: skip
    _CONFIG = dataclasses.replace(config, cost=calibrated_cost(config))
    gc.freeze()  # the trace's millions of token ids never need a collector's visit


# ---- output ----------------------------------------------------------------------------------------------------


def table(sizes: list[Size]) -> str:
    lines = [
        "| N | peak req/s | requests | goodput/replica-h: planner | best fixed (p+d) | serve default "
        "| planner / best fixed | planner / serve | SLO attainment: planner / fixed / serve "
        "| replica-h: planner / fixed / serve | best fixed goodput | fixed splits run | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in sizes:
        p, f, v = s.planner, s.best_fixed, s.serve_default
        lines.append(
            f"| {s.size} | {s.peak_rate_per_s:.1f} | {s.num_requests} | {p.goodput_per_replica_hour:.0f} "
            f"| {f.goodput_per_replica_hour:.0f} ({f.prefill}+{f.decode}) | {v.goodput_per_replica_hour:.0f} "
            f"| {_ratio(p, f)} | {_ratio(p, v)} | {p.attainment:.3f} / {f.attainment:.3f} / {v.attainment:.3f} "
            f"| {p.replica_hours:.2f} / {f.replica_hours:.2f} / {v.replica_hours:.2f} | {f.num_good} "
            f"| {s.num_fixed_runs} | {s.wall_s:.0f} |"
        )
    return "\n".join(lines)


def slo_table(sizes: list[Size]) -> str:
    rows = [(s.size, r) for s in sizes if s.slo_variants for r in [s.planner, *s.slo_variants]]
    if not rows:
        return ""
    lines = [
        f"Planner SLOs tight vs loose (goodput judged at TTFT <= {_SLO.ttft_s} s, TPOT <= {_SLO.tpot_s} s):\n",
        "| N | planner SLOs (TTFT s, TPOT s) | attainment | replica-h | goodput/replica-h |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {n} | {r.slo[0]}, {r.slo[1]} | {r.attainment:.3f} | {r.replica_hours:.2f} "
        f"| {r.goodput_per_replica_hour:.0f} |"
        for n, r in rows
    ]
    return "\n".join(lines)


def day_table(sizes: list[Size]) -> str:
    s = next((s for s in sizes if s.longer_day), None)
    if s is None:
        return ""
    planner, fixed = s.longer_day
    return "\n".join([
        f"Compression check at N={s.size} (same peak, same fixed split {fixed.prefill}+{fixed.decode}):\n",
        "| day lasts | planner goodput/replica-h | fixed | planner / fixed | planner attainment | wall s |",
        "|---|---|---|---|---|---|",
        f"| {s.day_s:.0f} s | {s.planner.goodput_per_replica_hour:.0f} | {s.best_fixed.goodput_per_replica_hour:.0f} "
        f"| {_ratio(s.planner, s.best_fixed)} | {s.planner.attainment:.3f} | {s.planner.wall_s:.0f} |",
        f"| {4 * s.day_s:.0f} s | {planner.goodput_per_replica_hour:.0f} | {fixed.goodput_per_replica_hour:.0f} "
        f"| {_ratio(planner, fixed)} | {planner.attainment:.3f} | {planner.wall_s:.0f} |",
    ])  # fmt: skip


def _ratio(a: Run, b: Run) -> str:
    return f"{a.goodput_per_replica_hour / b.goodput_per_replica_hour:.2f}x" if b.goodput_per_replica_hour else "-"


def plot(size: Size, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(4, 1, figsize=(11, 11), sharex=True)
    runs = [("planner", size.planner, "C0"), ("serve default", size.serve_default, "C3"),
            (f"fixed {size.best_fixed.prefill}+{size.best_fixed.decode}", size.best_fixed, "C2")]  # fmt: skip
    hours = [24 * p["time_s"] / size.day_s for p in size.planner.timeline]
    axes[0].plot(hours, [p["rate"] for p in size.planner.timeline], color="k")
    axes[0].set_ylabel("arrivals/s")
    for label, run, color in runs:
        h = [24 * p["time_s"] / size.day_s for p in run.timeline]
        for pool, style in (("prefill", "-"), ("decode", "--")):
            held = [p[pool]["live"] + p[pool]["starting"] + p[pool]["draining"] for p in run.timeline]
            axes[1].plot(h, held, style, color=color, label=f"{label} {pool}")
        for ax, key in ((axes[2], "ttft_p90_s"), (axes[3], "tpot_p90_s")):
            ax.plot(h, [p[key] if p[key] is not None else math.nan for p in run.timeline], color=color, label=label)
    axes[1].set_ylabel("replicas held")
    axes[1].legend(fontsize=7, ncol=3)
    axes[2].axhline(_SLO.ttft_s, color="gray", lw=0.8)
    axes[2].set_ylabel("TTFT p90 s")
    axes[2].set_yscale("log")
    axes[3].axhline(_SLO.tpot_s, color="gray", lw=0.8)
    axes[3].set_ylabel("TPOT p90 s")
    axes[3].set_xlabel("hour of the (compressed) day")
    axes[2].legend(fontsize=7)
    fig.suptitle(f"N = {size.size}: peak {size.peak_rate_per_s:.1f} req/s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 32, 64], help="cluster sizes (max replicas)")
    p.add_argument("--day-s", type=float, default=1920.0, help="seconds a 24-hour day lasts (86400: real time)")
    p.add_argument("--load", type=float, default=1.0, help="peak rate as a multiple of what the size sustains")
    p.add_argument("--preset", choices=sorted(PRESETS), default="emulated", help="replica model")
    p.add_argument("--ttft-slo-s", type=float, default=2.0)
    p.add_argument("--tpot-slo-s", type=float, default=0.1)
    p.add_argument("--startup-s", type=float, default=60.0, help="a requested replica serves this much later")
    p.add_argument("--tick-s", type=float, default=5.0, help="autoscaling period (and timeline window)")
    p.add_argument("--sync-period-s", type=float, default=0.5, help="router's poll of replica reports and KV events")
    p.add_argument("--max-fixed-runs", type=int, default=6, help="fixed splits the search simulates per size")
    p.add_argument("--exhaustive", action="store_true", help="simulate every fixed split p + d <= N instead")
    extras = "skip, at the smallest size, the planner with tight and loose SLOs and a 4x longer day"
    p.add_argument("--no-extras", dest="extras", action="store_false", help=extras)
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="directory for summary.md, results.json and plots")
    return p.parse_args()


def main() -> None:
    global _SLO
    args = parse_args()
    _SLO = SLO(args.ttft_slo_s, args.tpot_slo_s)
    model = PRESETS[args.preset]
    print(f"# replica model ({args.preset}; model parameters, not measurements): {model}")
    print(f"# day compressed to {args.day_s:.0f} s; startup {args.startup_s:.0f} s; tick {args.tick_s:.0f} s; "
          f"SLO TTFT <= {_SLO.ttft_s} s, TPOT <= {_SLO.tpot_s} s; {args.jobs} worker(s)", flush=True)  # fmt: skip
    sizes: list[Size] = []
    for size in sorted(args.sizes):
        sizes.append(run_size(args, size, sizes[-1] if sizes else None))
        s = sizes[-1]
        print(f"N={size}: {s.num_requests} requests, {s.wall_s:.0f} s wall ({s.num_fixed_runs} fixed splits); "
              f"planner {s.planner.goodput_per_replica_hour:.0f}, best fixed {s.best_fixed.prefill}+"
              f"{s.best_fixed.decode} {s.best_fixed.goodput_per_replica_hour:.0f}, serve default "
              f"{s.serve_default.goodput_per_replica_hour:.0f} goodput/replica-h", flush=True)  # fmt: skip
    summary = "\n\n".join(t for t in (table(sizes), slo_table(sizes), day_table(sizes)) if t)
    print("\n" + summary)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "summary.md").write_text(summary + "\n")
        payload = {"args": {k: str(v) for k, v in vars(args).items()}, "model": asdict(model),
                   "sizes": [asdict(s) for s in sizes]}  # fmt: skip
        (args.out / "results.json").write_text(json.dumps(payload, separators=(",", ":")))
        for s in sizes:
            plot(s, args.out / f"timeline_n{s.size}.png")
        print(f"\nwrote {args.out}/summary.md, results.json, timeline_n*.png")


if __name__ == "__main__":
    main()
