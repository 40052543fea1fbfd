"""The replay simulator: exact timelines and hits on tiny configs (the engine's own Scheduler on every modeled
replica), traces, signals that add up, and policy ordering on a seeded chat trace.

Tiny model: 4-token blocks; a step takes 10 ms + 1 ms per prefill token + 1 ms per decoding sequence; 1 ms hops;
transfer 100 B per token at 100 kB/s (1 ms per token).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from pdserve.router import CostConfig, RouteMode
from pdserve.sim import (
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

PROMPT = tuple(range(100, 110))  # 10 tokens: 2 full blocks + 2 tokens


def tiny(
    policy: str = "cache_aware",
    num_blocks: int = 64,
    local_prefill_max_tokens: int = 0,
    num_prefill: int = 1,
    num_decode: int = 1,
    max_num_batched_tokens: int = 512,
) -> SimConfig:
    model = ReplicaModel(0.010, 0.001, 0.001, num_blocks, 4, max_num_batched_tokens)
    knobs = CostConfig(local_prefill_max_tokens=local_prefill_max_tokens, block_size=4)
    config = SimConfig(
        num_prefill, num_decode, model, sync_period_s=0.1, hop_overhead_s=0.001, bytes_per_s=1e5,
        kv_bytes_per_token=100, policy=policy, cost=knobs,
    )  # fmt: skip
    return dataclasses.replace(config, cost=calibrated_cost(config))


def request(request_id: str, arrival_s: float, prompt: tuple[int, ...] = PROMPT, output_len: int = 3) -> TraceRequest:
    return TraceRequest(request_id, arrival_s, prompt, output_len)


def test_disaggregated_timeline_and_second_prompt_hits_its_full_blocks() -> None:
    result = simulate([request("a", 0.0), request("b", 1.0)], tiny())
    a, b = result.records
    # a: reserve at 1 ms, P at 2 ms, one 20 ms step (10 + 10 tokens), 10 tokens transfer in 10 ms, a hop -> first
    # token at 33 ms; two decode steps of 11 ms each.
    assert a.mode is RouteMode.DISAGGREGATED and (a.num_cached_tokens, a.num_computed_tokens) == (0, 10)
    assert a.ttft_s == pytest.approx(0.033) and a.finish_s == pytest.approx(0.055)
    assert a.num_transferred_blocks == 3 and a.tpot_s == pytest.approx(0.011)
    # b: P and D both hold a's 2 full blocks; P recomputes 2 tokens, D receives the last, partial block.
    assert (b.num_cached_tokens, b.num_computed_tokens, b.num_transferred_blocks) == (8, 2, 1)
    assert b.ttft_s == pytest.approx(0.001 + 0.001 + 0.012 + 0.002 + 0.001)
    assert result.hit_rate == pytest.approx(8 / 20)
    assert result.num_referenced_blocks_at_end == 0


def test_block_aligned_prompt_recomputes_last_block_on_p_and_transfers_nothing() -> None:
    prompt = PROMPT[:8]
    b = simulate([request("a", 0.0, prompt), request("b", 1.0, prompt)], tiny()).records[1]
    assert (b.num_cached_tokens, b.num_computed_tokens, b.num_transferred_blocks) == (4, 4, 0)


def test_local_mode_prefills_inside_a_decode_step() -> None:
    result = simulate([request("a", 0.0), request("b", 1.0)], tiny(local_prefill_max_tokens=128))
    a, b = result.records
    assert a.mode is b.mode is RouteMode.LOCAL and a.prefill_replica_id is None
    # b arrives with D idle: one step of 10 ms + 2 missing tokens.
    assert (b.num_cached_tokens, b.num_computed_tokens, b.num_transferred_blocks) == (8, 2, 0)
    assert b.ttft_s == pytest.approx(0.001 + 0.010 + 0.002)
    assert result.decisions == {RouteMode.LOCAL: 2, RouteMode.DISAGGREGATED: 0}


def test_reserve_waits_for_room_on_a_full_decode_replica() -> None:
    # 5 blocks: one request (3 blocks for 10 prompt + 2 output tokens) at a time.
    other = tuple(range(200, 210))
    a, b = simulate([request("a", 0.0), request("b", 0.0, other)], tiny(num_blocks=5)).records
    assert a.finish_s == pytest.approx(0.055)
    # b's reserve waits on D until a frees its blocks at 55 ms; then P (20 ms), transfer (10 ms), a hop.
    assert b.ttft_s == pytest.approx(0.055 + 0.001 + 0.020 + 0.010 + 0.001)


def test_decode_replica_preempts_the_newest_sequence_and_recomputes_it() -> None:
    # 5 blocks on D: a (8 prompt + 6 output tokens) needs 4 blocks at its end, b needs 3 to pass its first token.
    a_prompt, b_prompt = tuple(range(100, 108)), tuple(range(200, 208))
    a, b = simulate([request("a", 0.0, a_prompt, 6), request("b", 0.01, b_prompt, 6)], tiny(num_blocks=5)).records
    assert (a.first_token_s, b.first_token_s) == pytest.approx((0.029, 0.047))
    # At 51 ms b cannot grow to 3 blocks: the scheduler preempts it (the newest). Readmission needs 3 blocks and
    # waits for a's end at 84 ms; meanwhile a's 4th block evicted b's cached second block, so b recomputes 5 tokens
    # (one 15 ms step, its 2nd token) and decodes 4 more tokens in 11 ms steps.
    assert (a.num_preemptions, b.num_preemptions) == (0, 1)
    assert a.finish_s == pytest.approx(0.084) and b.finish_s == pytest.approx(0.084 + 0.015 + 4 * 0.011)
    assert (a.num_prefill_tokens, b.num_prefill_tokens) == (8, 8 + 4)  # the recompute: 4 prompt tokens + 1 output


def test_chunked_prefill_takes_one_engine_step_per_chunk() -> None:
    # 100 tokens with a 32-token budget: chunks of 32, 32, 32, 4 -> 4 steps of 10 ms + 1 ms per token.
    prompt = tuple(range(100, 200))
    result = simulate([request("a", 0.0, prompt, 2)], tiny(max_num_batched_tokens=32))
    (a,) = result.records
    p = result.final_signals["p0"]
    assert (p.steps_total, p.prefill_tokens_total, p.decode_steps_total) == (4, 100, 0)
    assert p.step_s_total == pytest.approx(4 * 0.010 + 0.100)
    assert a.ttft_s == pytest.approx(0.002 + 4 * 0.010 + 0.100 + 0.100 + 0.001)  # + 100 tokens' transfer + a hop
    d = result.final_signals["d0"]
    assert (d.steps_total, d.decode_steps_total, d.decode_step_seqs_total, d.generated_tokens_total) == (1, 1, 1, 1)


def test_signals_add_up_to_the_run() -> None:
    trace = multiturn_trace(8, 3, 2, 64, 16, 16, output_len=8, turn_interval_s=0.5, vocab_size=1000)
    for local in (0, 64):
        result = simulate(trace, tiny(num_prefill=2, num_decode=2, local_prefill_max_tokens=local))
        assert_signals_add_up(result)
        assert sum(s.prefill_tokens_total for s in result.final_signals.values()) == sum(
            r.num_computed_tokens for r in result.records
        )  # no preemption here: every prefill token is a prompt's first computation


def assert_signals_add_up(result: SimResult) -> None:
    """Counters across replicas against the requests' own records (shared with the randomized test)."""
    signals = result.final_signals.values()
    prefills = [s for rid, s in result.final_signals.items() if rid.startswith("p")]
    decodes = [s for rid, s in result.final_signals.items() if rid.startswith("d")]
    records = result.records
    assert sum(s.prefill_tokens_total for s in signals) == sum(r.num_prefill_tokens for r in records)
    assert sum(s.generated_tokens_total for s in signals) == sum(r.num_output_tokens for r in records)
    disaggregated = [r for r in records if r.mode is RouteMode.DISAGGREGATED]
    assert sum(s.requests_total for s in prefills) == len(disaggregated)
    assert sum(s.prompt_tokens_total for s in prefills) == sum(r.num_prompt_tokens for r in disaggregated)
    assert sum(s.requests_total for s in decodes) == sum(s.finished_total for s in decodes) == len(records)
    assert all(s.kv_blocks_used == s.kv_blocks_reserved == s.num_running == s.num_waiting == 0 for s in signals)
    assert all(s.step_s_total >= s.decode_step_s_total >= 0 for s in signals)


def test_one_conversation_reaches_the_ideal_hit_rate() -> None:
    trace = multiturn_trace(1, 3, 1, 32, 8, 8, output_len=4, turn_interval_s=1.0, vocab_size=1000)
    assert [len(r.prompt_token_ids) for r in trace] == [40, 56, 72]
    assert trace[1].prompt_token_ids[:40] == trace[0].prompt_token_ids
    assert trace[2].prompt_token_ids[:56] == trace[1].prompt_token_ids
    result = simulate(trace, tiny())
    assert [r.num_cached_tokens for r in result.records] == [0, 40, 56]
    assert result.hit_rate == pytest.approx(96 / 168) == ideal_hit_rate(trace, 4)


def test_ideal_hit_rate_by_hand() -> None:
    trace = [
        request("r3", 2.0, (1, 2, 9, 9)),  # block [1, 2] seen; capped at (4 - 1) // 2 = 1 block
        request("r1", 0.0, (1, 2, 3, 4, 5)),  # nothing seen yet
        request("r2", 1.0, (1, 2, 3, 4, 5, 6)),  # [1, 2] [3, 4] seen; [5, 6] is past the cap
        request("r4", 3.0, (7, 8)),  # one block: the cap is 0
    ]
    assert ideal_hit_rate(trace, 2) == pytest.approx((0 + 4 + 2 + 0) / 17)


def test_trace_round_trip(tmp_path: Path) -> None:
    trace = multiturn_trace(3, 2, 2, 8, 4, 4, output_len=5, vocab_size=500, seed=3)
    assert all(100 <= t < 500 for r in trace for t in r.prompt_token_ids)
    assert [r.arrival_s for r in trace] == sorted(r.arrival_s for r in trace)
    save_trace(tmp_path / "t.jsonl", trace)
    assert load_trace(tmp_path / "t.jsonl") == trace


def test_config_errors_say_what_to_fix() -> None:
    with pytest.raises(ValueError, match="unknown policy"):
        SimConfig(policy="random")
    with pytest.raises(ValueError, match="block_size"):
        SimConfig(replica=ReplicaModel(block_size=32))
    with pytest.raises(ValueError, match="max_replicas"):
        SimConfig(num_prefill=2, num_decode=2, max_replicas=3)
    with pytest.raises(ValueError, match="num_blocks"):
        simulate([request("a", 0.0, tuple(range(100, 400)))], tiny(num_blocks=8))


def test_policies_on_a_seeded_chat_trace() -> None:
    trace = multiturn_trace(32, 4, 4, 256, 32, 64, output_len=32, turn_interval_s=2.0, conversation_stagger_s=0.1)
    config = dataclasses.replace(tiny(num_blocks=512, num_prefill=2, num_decode=2), seed=7)
    config = dataclasses.replace(config, replica=dataclasses.replace(config.replica, per_prefill_token_s=1 / 20000))
    config = dataclasses.replace(config, cost=calibrated_cost(config))
    results = {p: simulate(trace, dataclasses.replace(config, policy=p)) for p in ("cache_aware", "pow2", "oracle")}
    ideal = ideal_hit_rate(trace, 4)
    assert results["cache_aware"].hit_rate > results["pow2"].hit_rate + 0.05
    assert ideal >= results["oracle"].hit_rate >= results["cache_aware"].hit_rate - 0.01
    assert all(r.num_referenced_blocks_at_end == 0 for r in results.values())
    assert all(len(r.records) == len(trace) for r in results.values())
    assert simulate(trace, dataclasses.replace(config, policy="pow2")) == results["pow2"]  # same seed, same run
