"""Committed reservations waiting for a seat in the running batch hold their KV blocks but are reported as waiting.
The planner's blocks-per-sequence estimate (the decode pool's KV bound: resident sequences x blocks_per_seq) must
count them beside the running ones; dividing by `num_running` alone inflated it exactly when the batch was full, and
the planner asked for decode replicas it did not need."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import pytest

from pdserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from pdserve.engine import EngineRequest, LLMEngine, SamplingParams
from pdserve.planner.planner import Planner, PlannerConfig
from pdserve.planner.signals import ReplicaSignals
from pdserve.serve.replicas import _EngineReplica


@pytest.fixture(scope="module")
def llama(tiny_models: dict[str, Path]) -> Path:
    return tiny_models["llama"]


def test_blocks_per_seq_counts_commits_waiting_for_a_seat(llama: Path) -> None:
    decode = LLMEngine(
        EngineConfig(
            ModelConfig(str(llama), dtype="float32"),
            CacheConfig(num_blocks=64, enable_prefix_caching=False),
            SchedulerConfig(max_num_batched_tokens=512, max_num_seqs=2),
        )
    )
    block_size = decode.layout.block_size
    prompt_len = 2 * block_size - 4  # 2 blocks, with room for the first tokens
    for i in range(5):
        request = EngineRequest(f"r{i}", tuple(range(10 + i, 10 + i + prompt_len)), SamplingParams(max_tokens=8))
        reservation = decode.reserve(request)
        assert reservation is not None
        decode.kv.block_epochs[list(reservation.block_ids)] = reservation.epoch  # the KV "arrived"
        assert decode.commit(request.request_id, 1) is None
    decode.step()  # two seated, three waiting for a seat: all five hold their 2 blocks
    assert (len(decode.scheduler.running), len(decode.scheduler.waiting)) == (2, 3)
    assert (decode.stats().num_used_blocks, decode.stats().num_reserved_blocks) == (10, 0)

    async def stats() -> object:
        return decode.stats()

    # the decode replica's report to Serve's autoscaler, as the planner reads it (serve/autoscaling.py)
    replica = SimpleNamespace(engine=SimpleNamespace(stats=stats))
    metrics = asyncio.run(_EngineReplica.record_autoscaling_stats(replica))  # type: ignore[arg-type]
    planner = Planner(PlannerConfig(smoothing=1.0))
    planner.plan(0.0, {"decode": {"d0": ReplicaSignals.from_metrics(metrics)}}, {"decode": 1})
    # every sequence here holds 2 blocks (on c77cb2e^ all five were `running`: 10 / 5 = 2)
    assert planner.estimates.blocks_per_seq == pytest.approx(2.0), planner.estimates.blocks_per_seq
