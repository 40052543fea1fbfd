"""The replay simulator: exact timings and hits on tiny configs, traces, and policy ordering on a seeded chat trace.

Tiny model: 4-token blocks, prefill 1000 tok/s (1 ms per token), decode step 10 ms + 1 ms per sequence, 1 ms hops,
transfer 100 B per token at 100 kB/s (1 ms per token).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from pdserve.router import CostConfig, RouteMode
from pdserve.router.sim import SimConfig, calibrated_cost, simulate
from pdserve.router.sim_replicas import ReplicaModel
from pdserve.router.trace import TraceRequest, ideal_hit_rate, load_trace, multiturn_trace, save_trace

PROMPT = tuple(range(100, 110))  # 10 tokens: 2 full blocks + 2 tokens


def tiny(
    policy: str = "cache_aware",
    num_blocks: int = 64,
    local_prefill_max_tokens: int = 0,
    num_prefill: int = 1,
    num_decode: int = 1,
) -> SimConfig:
    model = ReplicaModel(1000.0, 0.010, 0.001, num_blocks, 4)
    knobs = CostConfig(local_prefill_max_tokens=local_prefill_max_tokens, block_size=4)
    config = SimConfig(
        num_prefill, num_decode, model, sync_period_s=0.1, hop_overhead_s=0.001, bytes_per_s=1e5,
        kv_bytes_per_token=100, reserve_retry_s=0.05, policy=policy, cost=knobs,
    )  # fmt: skip
    return dataclasses.replace(config, cost=calibrated_cost(config))


def request(request_id: str, arrival_s: float, prompt: tuple[int, ...] = PROMPT, output_len: int = 3) -> TraceRequest:
    return TraceRequest(request_id, arrival_s, prompt, output_len)


def test_disaggregated_timeline_and_second_prompt_hits_its_full_blocks() -> None:
    result = simulate([request("a", 0.0), request("b", 1.0)], tiny())
    a, b = result.records
    # a: reserve at 1 ms, P at 2 ms, 10 tokens in 10 ms, 10 tokens transfer in 10 ms + a hop -> first token at 23 ms;
    # two decode steps of 11 ms each.
    assert a.mode is RouteMode.DISAGGREGATED and (a.num_cached_tokens, a.num_computed_tokens) == (0, 10)
    assert a.ttft_s == pytest.approx(0.023) and a.finish_s == pytest.approx(0.045)
    assert a.num_transferred_blocks == 3
    # b: P and D both hold a's 2 full blocks; P recomputes 2 tokens, D receives the last, partial block.
    assert (b.num_cached_tokens, b.num_computed_tokens, b.num_transferred_blocks) == (8, 2, 1)
    assert b.ttft_s == pytest.approx(0.001 + 0.001 + 0.002 + 0.002 + 0.001)
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
    # b arrives with D idle: one step of 10 ms + 1 sequence + 2 missing tokens.
    assert (b.num_cached_tokens, b.num_computed_tokens, b.num_transferred_blocks) == (8, 2, 0)
    assert b.ttft_s == pytest.approx(0.001 + 0.010 + 0.001 + 0.002)
    assert result.decisions == {RouteMode.LOCAL: 2, RouteMode.DISAGGREGATED: 0}


def test_reserve_waits_for_room_on_a_full_decode_replica() -> None:
    # 5 blocks: one request (3 blocks for 10 prompt + 2 output tokens) at a time.
    other = tuple(range(200, 210))
    a, b = simulate([request("a", 0.0), request("b", 0.0, other)], tiny(num_blocks=5)).records
    assert a.finish_s == pytest.approx(0.045)
    # b's reserve fails at 1 ms, succeeds on the retry at 51 ms, after a freed its blocks.
    assert b.ttft_s == pytest.approx(0.051 + 0.001 + 0.010 + 0.010 + 0.001)


def test_decode_replica_preempts_the_newest_sequence_and_recomputes_it() -> None:
    # 5 blocks on D: a (8 prompt + 6 output tokens) needs 4 blocks at its end, b needs 3 to pass its first token.
    a_prompt, b_prompt = tuple(range(100, 108)), tuple(range(200, 208))
    a, b = simulate([request("a", 0.0, a_prompt, 6), request("b", 0.01, b_prompt, 6)], tiny(num_blocks=5)).records
    assert (a.first_token_s, b.first_token_s) == pytest.approx((0.019, 0.029))
    # At 30 ms b cannot grow to 3 blocks: it preempts itself (the newest). Readmission needs 3 blocks again and
    # waits for a's end at 74 ms; meanwhile a's last block evicted b's cached second block, so b recomputes 5
    # tokens (one 16 ms step, its 2nd token) and decodes 4 more tokens in 11 ms steps.
    assert (a.num_preemptions, b.num_preemptions) == (0, 1)
    assert a.finish_s == pytest.approx(0.074) and b.finish_s == pytest.approx(0.074 + 0.016 + 4 * 0.011)


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


def test_policies_on_a_seeded_chat_trace() -> None:
    trace = multiturn_trace(32, 4, 4, 256, 32, 64, output_len=32, turn_interval_s=2.0, conversation_stagger_s=0.1)
    config = dataclasses.replace(tiny(num_blocks=512, num_prefill=2, num_decode=2), seed=7)
    config = dataclasses.replace(config, replica=dataclasses.replace(config.replica, prefill_tokens_per_s=20000.0))
    config = dataclasses.replace(config, cost=calibrated_cost(config))
    results = {p: simulate(trace, dataclasses.replace(config, policy=p)) for p in ("cache_aware", "pow2", "oracle")}
    ideal = ideal_hit_rate(trace, 4)
    assert results["cache_aware"].hit_rate > results["pow2"].hit_rate + 0.05
    assert ideal >= results["oracle"].hit_rate >= results["cache_aware"].hit_rate - 0.01
    assert all(r.num_referenced_blocks_at_end == 0 for r in results.values())
    assert all(len(r.records) == len(trace) for r in results.values())
    assert simulate(trace, dataclasses.replace(config, policy="pow2")) == results["pow2"]  # same seed, same run
