"""Compare routing policies offline: replay one trace through the real router against modeled replicas.

    python load_tests/router_sim.py                                    # default multi-turn chat trace, 2P + 2D
    python load_tests/router_sim.py --prefill 16 --decode 16 --conversations 500 --stagger-s 0.03
    python load_tests/router_sim.py --trace trace.jsonl                # a recorded or saved trace
    python load_tests/router_sim.py --save-trace trace.jsonl           # keep the generated trace

Prints one markdown row per policy: realized prefix-cache hit rate (and the trace's ideal upper bound), TTFT,
KV blocks transferred P -> D, and the router's decisions by mode. The router's weights are calibrated to the
modeled replicas (`calibrated_cost`); the policy knobs come from the flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

from pdserve.router import CostConfig, RouteMode
from pdserve.sim import (
    SIM_POLICIES,
    ReplicaModel,
    SimConfig,
    SimResult,
    TraceRequest,
    calibrated_cost,
    ideal_hit_rate,
    load_trace,
    multiturn_trace,
    save_trace,
    simulate,
)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trace", help="JSON-lines trace (default: generate a multi-turn one)")
    p.add_argument("--save-trace", help="write the trace used here")
    g = p.add_argument_group("generated multi-turn trace")
    g.add_argument("--conversations", type=int, default=64)
    g.add_argument("--turns", type=int, default=4)
    g.add_argument("--system-prompts", type=int, default=4)
    g.add_argument("--system-tokens", type=int, default=512)
    g.add_argument("--user-tokens", type=int, default=64)
    g.add_argument("--reply-tokens", type=int, default=128)
    g.add_argument("--output-len", type=int, default=128)
    g.add_argument("--turn-interval-s", type=float, default=5.0)
    g.add_argument("--stagger-s", type=float, default=0.25, help="between conversation starts")
    g.add_argument("--seed", type=int, default=0)
    r = p.add_argument_group("modeled replicas")
    r.add_argument("--prefill", type=int, default=2)
    r.add_argument("--decode", type=int, default=2)
    r.add_argument("--step-base-s", type=float, default=ReplicaModel.step_base_s, help="any engine step")
    r.add_argument("--per-prefill-token-s", type=float, default=ReplicaModel.per_prefill_token_s)
    r.add_argument("--per-decode-seq-s", type=float, default=ReplicaModel.per_decode_seq_s)
    r.add_argument("--num-blocks", type=int, default=ReplicaModel.num_blocks, help="KV blocks per replica")
    r.add_argument("--block-size", type=int, default=ReplicaModel.block_size)
    r.add_argument("--max-num-batched-tokens", type=int, default=ReplicaModel.max_num_batched_tokens)
    r.add_argument("--sync-period-s", type=float, default=SimConfig.sync_period_s)
    r.add_argument("--hop-overhead-s", type=float, default=SimConfig.hop_overhead_s)
    r.add_argument("--bytes-per-s", type=float, default=SimConfig.bytes_per_s)
    r.add_argument("--kv-bytes-per-token", type=int, default=SimConfig.kv_bytes_per_token)
    k = p.add_argument_group("router")
    k.add_argument("--policies", nargs="+", choices=SIM_POLICIES, default=list(SIM_POLICIES))
    k.add_argument("--local-prefill-max-tokens", type=int, default=CostConfig.local_prefill_max_tokens)
    k.add_argument("--expected-output-tokens", type=int, default=CostConfig.expected_output_tokens)
    k.add_argument("--disaggregation-overhead-s", type=float, default=CostConfig.disaggregation_overhead_s)
    return p.parse_args()


def build_trace(args: argparse.Namespace) -> list[TraceRequest]:
    if args.trace:
        return load_trace(args.trace)
    return multiturn_trace(
        args.conversations, args.turns, args.system_prompts, args.system_tokens, args.user_tokens,
        args.reply_tokens, args.output_len, args.turn_interval_s, args.stagger_s, seed=args.seed,
    )  # fmt: skip


def build_config(args: argparse.Namespace) -> SimConfig:
    model = ReplicaModel(
        args.step_base_s, args.per_prefill_token_s, args.per_decode_seq_s, args.num_blocks, args.block_size,
        args.max_num_batched_tokens,
    )  # fmt: skip
    knobs = CostConfig(
        expected_output_tokens=args.expected_output_tokens,
        disaggregation_overhead_s=args.disaggregation_overhead_s,
        local_prefill_max_tokens=args.local_prefill_max_tokens,
        block_size=args.block_size,
    )
    config = SimConfig(
        args.prefill, args.decode, model, sync_period_s=args.sync_period_s, hop_overhead_s=args.hop_overhead_s,
        bytes_per_s=args.bytes_per_s, kv_bytes_per_token=args.kv_bytes_per_token, cost=knobs, seed=args.seed,
    )  # fmt: skip
    return dataclasses.replace(config, cost=calibrated_cost(config))


def table(results: list[SimResult], ideal: float, seconds: list[float]) -> str:
    lines = [
        "| policy | hit rate | ideal | mean TTFT ms | p90 TTFT ms | blocks transferred | local / disagg | preempted "
        "| sim s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r, s in zip(results, seconds, strict=True):
        d = r.decisions
        lines.append(
            f"| {r.policy} | {r.hit_rate:.3f} | {ideal:.3f} | {r.mean_ttft_s * 1e3:.1f} | {r.p90_ttft_s * 1e3:.1f} "
            f"| {r.num_transferred_blocks} | {d[RouteMode.LOCAL]} / {d[RouteMode.DISAGGREGATED]} | {r.num_preemptions} "
            f"| {s:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    trace = build_trace(args)
    if args.save_trace:
        save_trace(args.save_trace, trace)
    config = build_config(args)
    results, seconds = [], []
    for policy in args.policies:
        start = time.perf_counter()
        results.append(simulate(trace, dataclasses.replace(config, policy=policy)))
        seconds.append(time.perf_counter() - start)
    num_tokens = sum(len(r.prompt_token_ids) for r in trace)
    print(f"{len(trace)} requests, {num_tokens} prompt tokens; {config.num_prefill}P + {config.num_decode}D\n")
    print(table(results, ideal_hit_rate(trace, config.replica.block_size), seconds))


if __name__ == "__main__":
    main()
