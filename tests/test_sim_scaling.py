"""The simulator with pools that change size: Ray Serve's default policy reproduced (by hand and against Ray's own
code), goodput per replica-hour by hand, the planner on a step load, drains that lose nothing, and randomized runs
(arrivals, 1-token prompts and outputs, shared prefixes, random scaling) that keep every invariant."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping
from unittest import mock

import pytest

from pdserve.planner import PlannerConfig, PoolBounds
from pdserve.sim import (
    SLO,
    FixedPolicy,
    PlannerPolicy,
    PoolSnapshot,
    ServeAutoscalingConfig,
    SimConfig,
    SimResult,
    TraceRequest,
    calibrated_cost,
    diurnal_trace,
    serve_default_decision,
    simulate,
    step_trace,
)
from pdserve.sim.scaling import DelayState
from pdserve.sim.workloads import RequestClass, day_rate
from test_sim import assert_signals_add_up, request, tiny


@dataclasses.dataclass
class ScriptedPolicy:
    """Targets by time: the last (time_s, prefill, decode) at or before now."""

    steps: list[tuple[float, int, int]]
    name: str = "scripted"

    def targets(self, now_s: float, pools: Mapping[str, PoolSnapshot]) -> dict[str, int]:
        _, p, d = [s for s in self.steps if s[0] <= now_s][-1]
        return {"prefill": p, "decode": d}


@dataclasses.dataclass
class RandomPolicy:
    rng: random.Random
    name: str = "random"

    def targets(self, now_s: float, pools: Mapping[str, PoolSnapshot]) -> dict[str, int]:
        return {"prefill": self.rng.randint(0, 3), "decode": self.rng.randint(0, 3)}


# ---- Serve's default policy -------------------------------------------------------------------------------------


def test_serve_default_scales_up_after_the_upscale_delay() -> None:
    config = ServeAutoscalingConfig(max_replicas=8)
    # 3 running, 9 ongoing, 2 per replica wanted -> ceil(4.5) = 5, once the wish held for 30 s.
    n, state = serve_default_decision(9, 3, 3, config, DelayState(), now_s=100.0)
    assert (n, state) == (3, DelayState(1, 100.0))
    n, state = serve_default_decision(9, 3, 3, config, state, now_s=129.0)
    assert (n, state) == (3, DelayState(2, 100.0))
    n, state = serve_default_decision(9, 3, 3, config, state, now_s=130.0)
    assert (n, state) == (5, DelayState())
    # 40 ongoing -> 20, bounded by max_replicas.
    assert serve_default_decision(40, 5, 5, config, DelayState(1, 0.0), now_s=30.0)[0] == 8


def test_serve_default_scales_down_after_the_downscale_delay_and_resets_on_a_change_of_mind() -> None:
    config = ServeAutoscalingConfig(max_replicas=8)
    n, state = serve_default_decision(2, 4, 4, config, DelayState(), now_s=0.0)  # wants 1
    assert (n, state) == (4, DelayState(-1, 0.0))
    n, state = serve_default_decision(20, 4, 4, config, state, now_s=300.0)  # wants 10: the downscale wish resets
    assert (n, state) == (4, DelayState(1, 300.0))
    n, state = serve_default_decision(2, 4, 4, config, state, now_s=310.0)
    n, state = serve_default_decision(2, 4, 4, config, state, now_s=909.0)
    assert n == 4
    n, state = serve_default_decision(2, 4, 4, config, state, now_s=910.0)
    assert (n, state) == (1, DelayState())


def test_serve_default_scaling_factors_and_cold_start() -> None:
    half = ServeAutoscalingConfig(downscaling_factor=0.5, downscale_delay_s=0.0)
    assert serve_default_decision(2, 4, 4, half, DelayState(), 0.0)[0] == 3  # ceil(4 + 0.5 x (1 - 4))
    slow = ServeAutoscalingConfig(downscaling_factor=0.1, downscale_delay_s=0.0)
    assert serve_default_decision(6, 4, 4, slow, DelayState(), 0.0)[0] == 3  # stuck at 4 -> one less
    # Nothing running: a request starts one replica at once; no request keeps the target.
    assert serve_default_decision(1, 0, 0, ServeAutoscalingConfig(min_replicas=0), DelayState(), 0.0)[0] == 1
    assert serve_default_decision(0, 0, 2, ServeAutoscalingConfig(), DelayState(), 0.0)[0] == 2


def test_serve_default_matches_rays_own_policy() -> None:
    ap = pytest.importorskip("ray.serve.autoscaling_policy")
    from ray.serve._private.common import DeploymentID
    from ray.serve.config import AutoscalingConfig, AutoscalingContext

    rng = random.Random(5)
    ray_policy = ap._apply_autoscaling_config(ap.replica_queue_length_autoscaling_policy)
    for _ in range(20):
        factors = (rng.choice([None, 0.3, 1.0, 2.0]), rng.choice([None, 0.2, 0.5]))
        ray_config = AutoscalingConfig(
            min_replicas=rng.randint(0, 2), max_replicas=rng.randint(3, 12), upscale_delay_s=rng.choice([0, 30]),
            downscale_delay_s=rng.choice([0, 60, 600]), upscaling_factor=factors[0], downscaling_factor=factors[1],
        )  # fmt: skip
        ours = ServeAutoscalingConfig(
            ray_config.min_replicas, ray_config.max_replicas, 2.0, ray_config.upscale_delay_s,
            ray_config.downscale_delay_s, None, 30.0, factors[0] or 1.0, factors[1] or 1.0,
        )  # fmt: skip
        ray_state: dict[str, object] = {}
        state, target, now = DelayState(), ray_config.min_replicas, 0.0
        for _ in range(60):
            now += rng.choice([1.0, 5.0, 20.0])
            running = rng.randint(max(target - 2, 0), target)
            total = rng.choice([0.0, rng.uniform(0, 40)])
            ctx = AutoscalingContext(
                deployment_id=DeploymentID(name="d", app_name="a"), deployment_name="d", app_name="a",
                current_num_replicas=running, target_num_replicas=target, running_replicas=[],
                total_num_requests=total, total_queued_requests=None, aggregated_metrics=None, raw_metrics=None,
                capacity_adjusted_min_replicas=ray_config.min_replicas,
                capacity_adjusted_max_replicas=ray_config.max_replicas, policy_state=ray_state,
                last_scale_up_time=None, last_scale_down_time=None, current_time=now, config=ray_config,
            )  # fmt: skip
            with mock.patch.object(ap.time, "time", return_value=now):
                expected, ray_state = ray_policy(ctx)
            expected = ours.clamp(int(expected))  # AutoscalingState.get_decision_num_replicas: ceil, then bounds
            target, state = serve_default_decision(total, running, target, ours, state, now)
            assert target == expected


# ---- accounting ---------------------------------------------------------------------------------------------


def test_goodput_per_replica_hour_by_hand() -> None:
    # a alone (TTFT 33 ms, TPOT 11 ms); b waits for a's blocks (TTFT 87 ms); the run ends at b's last token.
    other = tuple(range(200, 210))
    result = simulate([request("a", 0.0), request("b", 0.0, other)], tiny(num_blocks=5))
    b = result.records[1]
    assert b.finish_s == pytest.approx(0.087 + 0.022) == pytest.approx(result.makespan_s)
    assert result.replica_hours == pytest.approx(2 * 0.109 / 3600)
    slo = SLO(ttft_s=0.05, tpot_s=0.02)
    assert (result.num_good(slo), result.attainment(slo)) == (1, 0.5)
    assert result.goodput_per_replica_hour(slo) == pytest.approx(1 / (2 * 0.109 / 3600))


def test_replica_hours_count_from_the_request_and_through_the_drain() -> None:
    trace = [request(f"r{i}", 0.5 * i, tuple(range(100 + i, 140 + i)), 40) for i in range(40)]
    config = dataclasses.replace(tiny(), tick_s=1.0, startup_s=2.0)
    result = simulate(trace, config, ScriptedPolicy([(0.0, 1, 1), (4.0, 2, 3), (12.0, 1, 1)]))
    end = result.makespan_s
    by_id = {s.replica_id: s for s in result.spans}
    assert set(by_id) == {"p0", "p1", "d0", "d1", "d2"}
    assert by_id["d1"].requested_s == 4.0 and by_id["d1"].available_s == 6.0  # paid while starting
    drained = [s for s in result.spans if s.drain_s is not None]
    assert {s.drain_s for s in drained} == {12.0} and all(s.left_s is not None for s in drained)
    assert result.replica_hours == pytest.approx(sum(s.held_s(end) for s in result.spans) / 3600)
    assert result.replica_hours < 5 * end / 3600
    assert [p.time_s for p in result.timeline()] == [s.time_s for s in result.samples]


# ---- scaling in a run ------------------------------------------------------------------------------------------


def test_drain_loses_no_request_and_the_router_stops_choosing_the_draining_replica_at_once() -> None:
    trace = [request(f"r{i}", 0.05 * i, tuple(range(100 + i % 7, 130 + i % 7)), 30) for i in range(300)]
    config = dataclasses.replace(tiny(num_prefill=3, num_decode=3, local_prefill_max_tokens=8), tick_s=1.0)
    result = simulate(trace, config, ScriptedPolicy([(0.0, 3, 3), (5.0, 1, 1)]))
    assert len(result.records) == len(trace) and {r.request_id for r in result.records} == {t.request_id for t in trace}
    assert all(r.num_output_tokens == 30 for r in result.records)
    drains = {s.replica_id: s.drain_s for s in result.spans if s.drain_s is not None}
    assert len(drains) == 4
    for r in result.records:  # routed on arrival: never to a replica already draining
        for rid in (r.prefill_replica_id, r.decode_replica_id):
            assert rid not in drains or r.arrival_s <= drains[rid]  # (a tie: the arrival ran first)
    assert any(r.finish_s > drains[r.decode_replica_id] for r in result.records if r.decode_replica_id in drains)
    assert result.samples[-1].decode.live == 1 and result.num_referenced_blocks_at_end == 0


def test_cluster_cap_grants_only_free_room() -> None:
    trace = [request(f"r{i}", 0.05 * i, tuple(range(100 + i, 120 + i)), 10) for i in range(200)]
    config = dataclasses.replace(tiny(), tick_s=1.0, startup_s=0.5, max_replicas=4)
    result = simulate(trace, config, FixedPolicy(5, 5))
    assert all(s.prefill.held + s.decode.held <= 4 for s in result.samples)
    assert (result.samples[-1].prefill.held, result.samples[-1].decode.held) == (2, 2)  # one each in turn


def test_planner_grows_prefill_before_decode_on_long_prompts_and_shrinks_after() -> None:
    long_prompts = RequestClass("summarize", 0, 1500.0, 16.0)
    trace = step_trace([(60.0, 0.3), (180.0, 5.0), (360.0, 0.2)], long_prompts, seed=3)
    config = dataclasses.replace(_cpu_config(), tick_s=5.0, startup_s=20.0)
    bounds = PoolBounds(1, 8)
    planner = PlannerPolicy(
        PlannerConfig(prefill=bounds, decode=bounds, downscale_stable_s=30.0, downscale_cooldown_s=30.0)
    )
    result = simulate(trace, config, planner)
    targets = [(t, d["prefill"].target, d["decode"].target) for t, d in planner.decisions]
    first_p = next(t for t, p, _ in targets if p > 1)
    first_d = next((t for t, _, d in targets if d > 1), float("inf"))
    assert 60.0 < first_p < first_d
    assert max(p for _, p, _ in targets) >= 3
    peak_p = max(p for t, p, _ in targets if t <= 240.0)
    assert targets[-1][1] < peak_p and result.samples[-1].prefill.live < peak_p  # shrank once the load dropped
    assert_signals_add_up(result)


def test_planner_run_is_deterministic_for_a_seed() -> None:
    trace = diurnal_trace(3.0, day_s=240.0, seed=11)
    config = dataclasses.replace(_cpu_config(), tick_s=5.0, startup_s=10.0, max_replicas=6)

    def run() -> SimResult:
        return simulate(trace, config, PlannerPolicy(PlannerConfig(prefill=PoolBounds(1, 5), decode=PoolBounds(1, 5))))

    assert run() == run()


def test_diurnal_trace_follows_the_day() -> None:
    trace = diurnal_trace(20.0, day_s=2400.0, seed=2)
    hours = [24 * r.arrival_s / 2400 for r in trace]
    night = sum(2 <= h < 5 for h in hours)
    afternoon = sum(13.5 <= h < 16.5 for h in hours)
    assert 0.1 < night / afternoon < 0.3 and day_rate(15.0) == 1.0 and day_rate(3.0) == pytest.approx(0.15)
    classes = [(h, r.conversation_id) for h, r in zip(hours, trace, strict=True)]
    share = {k: sum(c == k for h, c in classes if 10 <= h < 16) / sum(10 <= h < 16 for h, _ in classes) for k in (1, 2)}
    evening = {
        k: sum(c == k for h, c in classes if 19 <= h < 23) / sum(19 <= h < 23 for h, _ in classes) for k in (1, 2)
    }
    assert share[1] > 2 * evening[1] and evening[2] > 2 * share[2]  # summarization by day, long answers at night
    assert min(len(r.prompt_token_ids) for r in trace) >= 1 and min(r.output_len for r in trace) >= 1


# ---- randomized invariants --------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_random_runs_keep_every_invariant(seed: int) -> None:
    rng = random.Random(seed)
    systems = [tuple(rng.randrange(100, 1000) for _ in range(rng.choice([0, 4, 13, 32]))) for _ in range(3)]
    trace, now = [], 0.0
    for i in range(rng.randint(150, 300)):
        now += rng.expovariate(rng.choice([20.0, 100.0]))
        user = tuple(rng.randrange(100, 1000) for _ in range(rng.choice([1, 3, 8, 40])))
        prompt = user[:1] if rng.random() < 0.1 else rng.choice(systems) + user
        trace.append(TraceRequest(f"r{i}", now, prompt, rng.choice([1, 2, 5, 30, 80])))
    largest = max(-(-(len(t.prompt_token_ids) + t.output_len) // 4) for t in trace)
    config = tiny(
        policy=rng.choice(["cache_aware", "pow2", "oracle"]),
        num_blocks=largest + rng.choice([0, 8, 64]),
        local_prefill_max_tokens=rng.choice([0, 8, 64]),
        num_prefill=rng.randint(1, 2),
        num_decode=rng.randint(1, 2),
        max_num_batched_tokens=rng.choice([8, 32, 512]),
    )
    config = dataclasses.replace(config, tick_s=0.2, startup_s=rng.choice([0.0, 0.3]), seed=seed)
    result = simulate(trace, config, RandomPolicy(rng))
    assert sorted(r.request_id for r in result.records) == sorted(t.request_id for t in trace)
    by_id = {t.request_id: t for t in trace}
    for r in result.records:
        assert r.num_output_tokens == by_id[r.request_id].output_len
        assert r.arrival_s <= r.first_token_s <= r.finish_s
        assert 0 <= r.num_cached_tokens < r.num_prompt_tokens or r.num_prompt_tokens == r.num_cached_tokens == 0
        assert r.num_prefill_tokens >= r.num_computed_tokens == r.num_prompt_tokens - r.num_cached_tokens
    assert result.num_referenced_blocks_at_end == 0
    assert_signals_add_up(result)


def _cpu_config() -> SimConfig:
    """1P + 1D of the default (CPU) replica model, the router calibrated to it."""
    config = SimConfig(1, 1, sync_period_s=0.5)
    return dataclasses.replace(config, cost=calibrated_cost(config))
