"""Committed reservations may take `running` past max_num_seqs; a step runs at most max_num_seqs sequences, chosen
in the order they joined, so a prefill already running is never starved by the decodes that keep committing."""

from __future__ import annotations

import pytest

from pdserve.config import SchedulerConfig
from pdserve.engine.block_manager import BlockManager
from pdserve.engine.request import EngineRequest, SamplingParams
from pdserve.engine.scheduler import Scheduler
from pdserve.engine.sequence import Sequence, SequenceStatus
from pdserve.kvcache.block_pool import BlockPool


@pytest.mark.parametrize("policy", ["fcfs", "shortest_prefill_first"])
def test_running_prefill_is_not_starved_by_committed_decodes(policy: str) -> None:
    blocks = BlockManager(BlockPool(10_000, enable_prefix_caching=False), 4)
    sched = Scheduler(SchedulerConfig(8, 2, policy, 32.0), blocks)
    arrivals = iter(range(10_000))

    def seq(name: str, n: int) -> Sequence:
        return Sequence(EngineRequest(name, tuple(range(1, n + 1)), SamplingParams(max_tokens=4)), next(arrivals))

    def commit(name: str) -> None:  # what LLMEngine.commit does: blocks held, prompt computed, first token known
        s = seq(name, 5)
        assert blocks.admit(s, [], 5)
        s.num_computed_tokens = 5
        s.token_ids.append(9)
        sched.add_running(s)

    x = seq("X", 40)  # a colocated request on the decode replica (e.g. a prefill retried there)
    sched.add(x)
    for c in sched.schedule().chunks:
        c.seq.num_computed_tokens += c.num_new_tokens
    assert x.num_computed_tokens == 8  # admitted, first chunk computed: X is running and holds its blocks
    commit("R0")
    commit("R1")
    k = 2
    for _ in range(100):  # steady disaggregated load: a reservation commits whenever one finishes
        for c in sched.schedule().chunks:
            c.seq.num_computed_tokens += c.num_new_tokens
            if c.seq.num_computed_tokens == c.seq.num_tokens:
                c.seq.token_ids.append(7)
                if c.seq.num_output_tokens >= 4:
                    sched.remove(c.seq)
                    blocks.free(c.seq)
                    c.seq.status = SequenceStatus.FINISHED
                    commit(f"R{k}")
                    k += 1
    # with the decodes chosen first X never got another chunk (a scheduler of ecc97ff)
    assert x.num_computed_tokens == x.num_tokens or x.num_output_tokens > 0, (x.num_computed_tokens, k)
