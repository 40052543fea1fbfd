"""Autoscaling on a local Ray cluster: load steps through the planner, timeline of rate, replicas and latencies.

    python load_tests/autoscale_step.py --out load_tests/results/DATE-autoscale        # the must-show, ~11 min
    python load_tests/autoscale_step.py --quick                                        # ~2 min, smaller steps
    python load_tests/autoscale_step.py --quick --fake-nodes --out DIR                 # + the Ray autoscaler's nodes

With `--fake-nodes` the cluster is Ray's local autoscaling cluster (`ray start --autoscaling-config` with
RAY_FAKE_CLUSTER=1: the fake multi-node provider Ray tests its autoscaler with; `fake_cluster` writes the config, as
Ray 2.60's wheel lacks the example `ray.cluster_utils.AutoscalingCluster` reads): a head for the ingress and two
node types, one per pool, each node offering one `prefill_pool` or `decode_pool` unit, and every engine replica
asking for one unit of its pool's (as deploy/gpu-autoscale.yaml does with GPU nodes). The planner's targets then go
through Serve to pending replicas, and the Ray autoscaler starts a node of the right type for each and stops nodes
left idle: the timeline adds the nodes of each type.

pdserve starts disaggregated with one prefill and one decode replica and the planner on (`autoscaling.enabled`), and
open-loop Poisson traffic runs through HTTP in phases:

  base         long prompts at the rate one P+D pair sustains within the SLOs
  4x prompts   the same prompts at 4x that rate: the prefill pool must grow, and TTFT p90 come back under the SLO
  long outputs short prompts, long outputs: the decode pool must grow (and the prefill pool shrink)
  low          a trickle: both pools shrink back

Every `--sample-s` the script reads /metrics: the planner's target and current size per pool
(`pdserve_planner_*_replicas`) and the replicas reporting per role (`pdserve_kv_blocks_total`). Output in `--out`:
`timeline.json` (samples and every request), `summary.md` (per phase: requests, failures, TTFT/TPOT p90, replicas;
scaling events with times) and `timeline.png` (rate, replicas per pool, TTFT/TPOT p90 per window).

A CPU-only box has no accelerators to add: on 2 cores, more replicas share the same cores and add no capacity. So
the engine replicas here run with `emulated_step` (config.py: `EmulatedStep`): each step of a tiny Llama is padded
with a sleep to a modeled device's time (20 ms + 0.5 ms per prompt token + 3 ms per sequence: a slow accelerator,
so that the padded replicas leave the cores free), which makes a replica's capacity the modeled device's, as GPU-bound
replicas are. Everything else is real: Ray Serve's autoscaler applying the planner's decisions, replica start-up,
drain on scale-down, routing, KV transfer, HTTP.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Record, Spec, pct, run

EMULATED = {"base_s": 0.02, "per_prompt_token_s": 0.0005, "per_seq_s": 0.003}


@dataclass(frozen=True)
class Phase:
    name: str
    duration_s: float
    rate: float  # requests per second
    prompt_tokens: int
    output_tokens: int


def phases(quick: bool) -> list[Phase]:
    """Rates from the emulated device: a prefill replica computes ~1,850 prompt tokens/s (512-token steps of
    20 + 256 ms), so 600-token prompts at 1.5 req/s keep one busy ~50% of the time, which the planner's M/M/1 model
    puts at a TTFT p90 of ~1.5 s (within the 2 s SLO: one P+D pair sustains it); 4x that needs 3-4. A decode
    replica at the 0.1 s TPOT SLO holds ~26 sequences (20 + 3 * 26 ms per step), ~265 tokens/s: 3 req/s of
    200-token outputs needs 3."""
    if quick:
        return [
            Phase("base", 15, 1.5, 600, 16),
            Phase("4x prompts", 60, 6.0, 600, 16),
            Phase("low", 45, 0.3, 32, 16),
        ]
    return [
        Phase("base", 60, 1.5, 600, 16),
        Phase("4x prompts", 180, 6.0, 600, 16),
        Phase("long outputs", 180, 3.0, 32, 200),
        Phase("low", 240, 0.3, 32, 16),
    ]


def specs_for(plan: list[Phase], seed: int, vocab: int = 256) -> list[Spec]:
    rng = random.Random(seed)
    specs, start = [], 0.0
    for phase in plan:
        t = start + rng.expovariate(phase.rate)
        while t < start + phase.duration_s:
            prompt = [rng.randrange(3, vocab) for _ in range(phase.prompt_tokens)]
            specs.append(Spec(t, prompt, phase.output_tokens, phase.name))
            t += rng.expovariate(phase.rate)
        start += phase.duration_s
    return specs


def pool_nodes() -> dict[str, int]:
    """Alive Ray nodes per pool (the autoscaler's fake nodes offer `prefill_pool` or `decode_pool`)."""
    import ray

    alive = [n for n in ray.nodes() if n.get("Alive")]
    return {f"{pool}_nodes": sum(f"{pool}_pool" in n.get("Resources", {}) for n in alive) for pool in POOLS}


POOLS = ("prefill", "decode")


async def sample(
    root: str,
    until: asyncio.Event,
    every_s: float,
    start: float,
    nodes: Any = None,
    out: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Rows of the planner's metrics every `every_s` until `until` is set, appended to `out` (a caller's list, to
    watch them as they come) and returned."""
    from prometheus_client.parser import text_string_to_metric_families

    out = [] if out is None else out
    async with httpx.AsyncClient(timeout=10) as client:
        while not until.is_set():
            row: dict[str, Any] = {"t": time.perf_counter() - start}
            try:
                text = (await client.get(f"{root}/metrics")).text
                replicas: dict[str, set[str]] = {"prefill": set(), "decode": set()}
                for family in text_string_to_metric_families(text):
                    for s in family.samples:
                        if s.name.startswith("pdserve_planner_") and s.name.endswith("_replicas"):
                            key = s.name.removeprefix("pdserve_planner_").removesuffix("_replicas")
                            row[f"{s.labels['pool']}_{key}"] = s.value
                        elif s.name == "pdserve_kv_blocks_total" and s.labels.get("role") in replicas:
                            replicas[s.labels["role"]].add(s.labels["replica"])
                row.update({f"{role}_live": len(ids) for role, ids in replicas.items()})
                if nodes is not None:
                    row.update(nodes())
                out.append(row)
            except httpx.HTTPError as e:
                row["error"] = repr(e)
                out.append(row)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(until.wait(), every_s)
    return out


async def drive(
    url: str, specs: list[Spec], every_s: float, nodes: Any = None, tail_s: float = 0.0
) -> tuple[list[Record], list[dict[str, Any]]]:
    done = asyncio.Event()
    start = time.perf_counter()
    sampler = asyncio.create_task(sample(url.removesuffix("/v1"), done, every_s, start, nodes))
    records, _ = await run(url, "m", specs)
    await asyncio.sleep(tail_s)  # keep sampling: nodes leave after the autoscaler's idle timeout
    done.set()
    return records, await sampler


def scaling_events(samples: list[dict[str, Any]]) -> list[str]:
    events, last = [], {}
    for row in samples:
        for pool in ("prefill", "decode"):
            for key in ("target", "live", "nodes"):
                value = row.get(f"{pool}_{key}")
                name = f"{pool}_{key}"
                if value is not None and last.get(name) != value:
                    if name in last:
                        events.append(f"{row['t']:6.1f} s  {pool} {key} {last[name]:.0f} -> {value:.0f}")
                    last[name] = value
    return events


def summarize(
    plan: list[Phase], specs: list[Spec], records: list[Record], samples: list[dict[str, Any]], args: Any
) -> str:
    lines = [
        f"# Autoscaling load steps ({time.strftime('%Y-%m-%d')}, {cpu_model()})",
        "",
        f"SLOs: TTFT p90 <= {args.ttft_slo_s} s, TPOT <= {args.tpot_slo_s} s. Emulated device per step: {EMULATED}.",
        "",
        "| phase | window s | rate req/s | prompt -> output | requests | failed | TTFT p90 s (whole / last third) | "
        "TPOT p90 s | prefill replicas (min-max) | decode replicas (min-max) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    start = 0.0
    for phase in plan:
        end = start + phase.duration_s
        rows = [r for s, r in zip(specs, records, strict=True) if s.kind == phase.name]
        late = [r for r in rows if r.sent_at_s >= start + 2 * phase.duration_s / 3]
        ttft = pct([r.ttft_s for r in rows if r.ttft_s is not None], 90)
        ttft_late = pct([r.ttft_s for r in late if r.ttft_s is not None], 90)
        tpot = pct([t for r in rows if (t := r.tpot_s) is not None], 90)
        window = [row for row in samples if start <= row["t"] < end]
        pre = [row.get("prefill_live", 0) for row in window] or [0]
        dec = [row.get("decode_live", 0) for row in window] or [0]
        failed = sum(r.status != 200 or r.output_tokens != s.max_tokens for s, r in zip(specs, records, strict=True)
                     if s.kind == phase.name)  # fmt: skip
        lines.append(
            f"| {phase.name} | {start:.0f}-{end:.0f} | {phase.rate} | {phase.prompt_tokens} -> {phase.output_tokens} "
            f"| {len(rows)} | {failed} | {_f(ttft)} / {_f(ttft_late)} | {_f(tpot)} | {min(pre)}-{max(pre)} | "
            f"{min(dec)}-{max(dec)} |"
        )
        start = end
    lines += ["", "Scaling events (planner target, replicas reporting):", "", "```", *scaling_events(samples), "```"]
    return "\n".join(lines) + "\n"


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f", {os.cpu_count()} cores"
    except OSError:
        pass
    return "unknown CPU"


def plot(out: Path, plan: list[Phase], specs: list[Spec], records: list[Record], samples: list[dict[str, Any]],
         args: Any) -> Path | None:  # fmt: skip
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    t_end = sum(p.duration_s for p in plan)
    edges, start = [], 0.0
    for p in plan:
        edges.append((start, start + p.duration_s, p.rate, p.name))
        start += p.duration_s
    ax = axes[0]
    ax.step([e[0] for e in edges] + [t_end], [e[2] for e in edges] + [edges[-1][2]], where="post", label="offered")
    ax.set_ylabel("req/s")
    for s0, _, _, name in edges:
        ax.axvline(s0, color="grey", lw=0.5)
        ax.text(s0 + 2, ax.get_ylim()[1] * 0.9 if ax.get_ylim()[1] else 1, name, fontsize=8)
    ax.legend(loc="upper right")
    ax = axes[1]
    ts = [row["t"] for row in samples]
    for pool, color in (("prefill", "tab:blue"), ("decode", "tab:orange")):
        ax.plot(ts, [row.get(f"{pool}_live", 0) for row in samples], color=color, label=f"{pool} replicas")
        ax.plot(ts, [row.get(f"{pool}_target", float("nan")) for row in samples], color=color, ls="--",
                label=f"{pool} target")  # fmt: skip
        if any(f"{pool}_nodes" in row for row in samples):
            ax.plot(ts, [row.get(f"{pool}_nodes", float("nan")) for row in samples], color=color, ls=":",
                    label=f"{pool} nodes (Ray autoscaler)")  # fmt: skip
    ax.set_ylabel("replicas")
    ax.legend(loc="upper right", fontsize=8)
    ax = axes[2]
    window = 15.0
    centers, ttft90, tpot90 = [], [], []
    t = 0.0
    while t < t_end:
        rows = [r for s, r in zip(specs, records, strict=True) if t <= s.at_s < t + window]
        centers.append(t + window / 2)
        ttft90.append(pct([r.ttft_s for r in rows if r.ttft_s is not None], 90) or float("nan"))
        tpot90.append(pct([x for r in rows if (x := r.tpot_s) is not None], 90) or float("nan"))
        t += window
    ax.plot(centers, ttft90, marker="o", label="TTFT p90 (s)")
    ax.axhline(args.ttft_slo_s, color="tab:blue", ls=":", lw=1)
    ax2 = ax.twinx()
    ax2.plot(centers, tpot90, marker="x", color="tab:red", label="TPOT p90 (s)")
    ax2.axhline(args.tpot_slo_s, color="tab:red", ls=":", lw=1)
    ax.set_ylabel("TTFT p90 s (by arrival, 15 s windows)")
    ax2.set_ylabel("TPOT p90 s")
    ax.set_xlabel("seconds")
    ax.legend(loc="upper left")
    ax2.legend(loc="upper right")
    fig.tight_layout()
    path = out / "timeline.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def config_for(model: str, args: Any) -> Any:
    from pdserve.serve.config import ServeConfig

    def engine_pool(pool: str) -> dict[str, Any]:
        resources = {"resources": {f"{pool}_pool": 1}} if args.fake_nodes else {}
        return {"num_threads": 1, "ray_actor_options": {"num_cpus": 0, **resources}}

    return ServeConfig.model_validate({
        "model": model, "served_model_names": ["m"], "dtype": "float32", "tracing_env": {},
        "num_kv_blocks": 2048, "max_num_batched_tokens": 512, "emulated_step": EMULATED,
        "prefill": {**engine_pool("prefill"), "num_replicas": 1, "min_replicas": 1, "max_replicas": args.max_prefill},
        "decode": {**engine_pool("decode"), "num_replicas": 1, "min_replicas": 1, "max_replicas": args.max_decode},
        "router": {"prefill_tokens_per_s": 2000.0, "decode_step_per_seq_s": 0.003, "local_prefill_max_tokens": 0},
        "autoscaling": {
            "enabled": True, "ttft_slo_s": args.ttft_slo_s, "tpot_slo_s": args.tpot_slo_s, "interval_s": 2.0,
            "upscale_cooldown_s": 10.0, "downscale_cooldown_s": args.downscale_s,
            "downscale_stable_s": args.downscale_s,
        },
    })  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("load_tests/results/autoscale"))
    p.add_argument("--quick", action="store_true", help="three short phases (~2.5 min)")
    p.add_argument("--ttft-slo-s", type=float, default=2.0)
    p.add_argument("--tpot-slo-s", type=float, default=0.1)
    p.add_argument("--max-prefill", type=int, default=5)
    p.add_argument("--max-decode", type=int, default=4)
    p.add_argument("--downscale-s", type=float, default=30.0, help="downscale stable time and cool-down")
    p.add_argument("--sample-s", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fake-nodes", action="store_true", help="on Ray's local autoscaling cluster: a node per replica")
    p.add_argument("--idle-timeout-s", type=float, default=20.0, help="--fake-nodes: the autoscaler's idle timeout")
    args = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    from pdserve.serve.app import deploy_application
    from serving import free_port, ray_serve
    from tiny_models import build_tiny_model

    model = str(build_tiny_model(Path(os.environ.get("TMPDIR", "/tmp")) / "pdserve-autoscale-tiny", "llama"))
    config = config_for(model, args)
    plan = phases(args.quick)
    specs = specs_for(plan, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    with fake_cluster(port, args) if args.fake_nodes else ray_serve(port):
        client = _get_global_client()
        app = deploy_application(config, name="autoscale", route_prefix="/")
        client.deploy_apps(ServeDeploySchema(applications=[app]), _blocking=True)
        url = f"http://127.0.0.1:{port}/v1"
        _wait_ready(url, 300.0 if args.fake_nodes else 120.0)
        nodes, tail_s = (pool_nodes, args.downscale_s * 2 + args.idle_timeout_s + 30) if args.fake_nodes else (None, 0)
        records, samples = asyncio.run(drive(url, specs, args.sample_s, nodes, tail_s))
    text = summarize(plan, specs, records, samples, args)
    (args.out / "summary.md").write_text(text)
    (args.out / "timeline.json").write_text(json.dumps({
        "phases": [asdict(ph) for ph in plan], "emulated_step": EMULATED, "samples": samples,
        "requests": [{**asdict(r), "itl_s": None, "token_times_s": None} for r in records],
        "config": config.model_dump(mode="json", exclude={"model"}),
    }, indent=1))  # fmt: skip
    path = plot(args.out, plan, specs, records, samples, args)
    print(text)
    print(f"wrote {args.out / 'summary.md'}, {args.out / 'timeline.json'}" + (f", {path}" if path else ""))
    failed = sum(r.status != 200 or r.output_tokens != s.max_tokens for s, r in zip(specs, records, strict=True))
    return {"failed": failed, "samples": samples, "records": records, "specs": specs}


@contextlib.contextmanager
def fake_cluster(port: int, args: Any) -> Any:
    """Ray's local autoscaling cluster (the `fake_multinode` provider Ray tests its autoscaler with; `ray start
    --autoscaling-config` with RAY_FAKE_CLUSTER=1): a head (the ingress, Serve's controller) and a node type per
    pool, each node one replica's worth (`{pool}_pool: 1`), started and stopped by the Ray autoscaler."""
    import subprocess
    import tempfile

    import ray
    import yaml
    from ray import serve

    node = {"node_config": {}, "min_workers": 0}
    config = {
        "cluster_name": "pdserve-fake", "max_workers": args.max_prefill + args.max_decode,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 2}, "node_config": {}, "max_workers": 0},
            **{f"{pool}_node": {**node, "resources": {"CPU": 0, f"{pool}_pool": 1, "object_store_memory": 10**8},
                                "max_workers": args.max_prefill if pool == "prefill" else args.max_decode}
               for pool in POOLS},
        },
        "head_node_type": "ray.head.default", "auth": {}, "upscaling_speed": 1.0,
        "idle_timeout_minutes": args.idle_timeout_s / 60, "docker": {}, "initialization_commands": [],
        "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [], "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
    }  # fmt: skip
    path = Path(tempfile.mkdtemp()) / "fake-cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    ray_cli = str(Path(sys.executable).with_name("ray"))
    env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
    subprocess.run([ray_cli, "stop", "--force"], check=False, capture_output=True)
    subprocess.run([ray_cli, "start", "--head", f"--autoscaling-config={path}", "--num-cpus=2",
                    "--include-dashboard=false"], check=True, env=env, capture_output=True)  # fmt: skip
    ray.init("auto", log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()
        subprocess.run([ray_cli, "stop", "--force"], check=False, capture_output=True, env=env)


def _wait_ready(url: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url.removesuffix("/v1") + "/ready", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError("pdserve did not become ready")


if __name__ == "__main__":
    main()
