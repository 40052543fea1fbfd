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


class _Rig:
    """A scheduler stepped as LLMEngine steps it (chunks computed, a token sampled at each last chunk, a request
    finished after `max_tokens`), with commits as LLMEngine.commit makes them."""

    def __init__(self, policy: str, num_blocks: int, max_num_seqs: int, max_tokens: int = 4) -> None:
        self.blocks = BlockManager(BlockPool(num_blocks, enable_prefix_caching=False), 4)
        self.sched = Scheduler(SchedulerConfig(64, max_num_seqs, policy, 32.0), self.blocks)
        self.arrivals = iter(range(10_000))
        self.max_tokens = max_tokens
        self.finished: list[str] = []

    def seq(self, name: str, n: int) -> Sequence:
        request = EngineRequest(name, tuple(range(1, n + 1)), SamplingParams(max_tokens=self.max_tokens))
        return Sequence(request, next(self.arrivals))

    def commit(self, s: Sequence) -> None:
        assert self.blocks.admit(s, [], s.num_tokens)
        s.num_computed_tokens = s.num_tokens
        s.token_ids.append(9)
        self.sched.add_running(s)

    def step(self) -> None:
        out = self.sched.schedule()
        assert len(out.chunks) <= self.sched.config.max_num_seqs
        for c in out.chunks:
            c.seq.num_computed_tokens += c.num_new_tokens
            if c.seq.num_computed_tokens == c.seq.num_tokens:
                c.seq.token_ids.append(7)
                if c.seq.num_output_tokens >= self.max_tokens:
                    self.sched.remove(c.seq)
                    self.blocks.free(c.seq)
                    c.seq.status = SequenceStatus.FINISHED
                    self.finished.append(c.seq.request_id)


@pytest.mark.parametrize("policy", ["fcfs", "shortest_prefill_first"])
def test_a_waiting_prompt_is_not_kept_out_by_committed_decodes(policy: str) -> None:
    """A prompt queued on a decode replica (a local prefill) while its batch is full, and reservations keep
    committing there, each reserved after the prompt arrived: the prompt gets the next seat, not the commits (a
    scheduler of 3c6518e gave every freed seat to a commit: the prompt waited as long as commits came)."""
    rig = _Rig(policy, 10_000, max_num_seqs=2)
    first = [rig.seq("R0", 5), rig.seq("R1", 5)]
    x = rig.seq("X", 20)
    rig.sched.add(x)
    for s in first:  # reserved before X arrived, committed after
        rig.commit(s)
    k = 2
    for _ in range(40):
        done = len(rig.finished)
        rig.step()
        for _ in range(len(rig.finished) - done):  # steady disaggregated load: a commit per finished request
            rig.commit(rig.seq(f"R{k}", 5))
            k += 1
    assert "X" in rig.finished, (x.num_computed_tokens, rig.finished)
    assert rig.finished.index("X") <= 3, rig.finished  # after R0 and R1, which were there first


@pytest.mark.parametrize("policy", ["fcfs", "shortest_prefill_first"])
def test_committed_reservations_holding_the_pool_run_though_a_prompt_waits_ahead(policy: str) -> None:
    """Nothing runs; a prompt waits first in line but cannot be admitted, because two committed reservations behind
    it hold the pool. They must run (and free their blocks) rather than wait for the prompt's seat forever."""
    rig = _Rig(policy, 6, max_num_seqs=1)
    x = rig.seq("X", 12)  # 3 blocks of 4, +1 to grow: more than the 2 the commits leave
    held = [rig.seq("C0", 7), rig.seq("C1", 7)]  # 2 blocks each, 4 of the 6
    rig.sched.add(x)
    for s in held:
        rig.commit(s)
    for _ in range(60):
        if len(rig.finished) == 3:
            break
        rig.step()
    assert sorted(rig.finished) == ["C0", "C1", "X"], (rig.finished, [s.request_id for s in rig.sched.waiting])


@pytest.mark.parametrize("policy", ["fcfs", "shortest_prefill_first"])
def test_a_sequence_preempted_in_a_step_is_not_readmitted_by_its_retry_pass(policy: str) -> None:
    """A running sequence that must grow preempts itself (it arrived last), so nothing runs, and the step's second
    pass seats the committed reservation waiting behind a prompt. That pass admitted again the sequence it had just
    preempted (its blocks freed, its work to redo, the pool as short as before: found in review); a sequence
    preempted in a step is not readmitted in it, whichever pass."""
    blocks = BlockManager(BlockPool(4, enable_prefix_caching=False), 4)
    sched = Scheduler(SchedulerConfig(4, 2, policy, 32.0), blocks)
    arrivals = iter(range(100))

    def seq(name: str, n: int) -> Sequence:
        return Sequence(EngineRequest(name, tuple(range(1, n + 1)), SamplingParams(max_tokens=4)), next(arrivals))

    p, c, a = seq("P", 6), seq("C", 7), seq("A", 8)  # arrival order: P, C, A
    sched.add(a)
    for _ in range(2):  # A's prompt, 4 tokens a step; its first token sampled
        for chunk in sched.schedule().chunks:
            chunk.seq.num_computed_tokens += chunk.num_new_tokens
    a.token_ids.append(7)
    assert len(a.block_ids) == 2
    sched.add(p)  # a prompt that waits (no room), holding the free seat
    assert blocks.admit(c, [], 7)  # a reservation committed: 2 blocks, the last 2 of the pool
    c.num_computed_tokens = 7
    c.token_ids.append(9)
    sched.add_running(c)
    out = sched.schedule()  # A needs a 3rd block: it preempts itself; the retry seats C
    assert [s.request_id for s in out.preempted] == ["A"]
    assert [ch.seq.request_id for ch in out.chunks] == ["C"], out.chunks
    assert a.status is SequenceStatus.WAITING and not a.block_ids
