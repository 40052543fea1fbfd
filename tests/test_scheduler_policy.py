"""The scheduler's prefill order, without a model: fcfs keeps arrival order; shortest_prefill_first lets a short prompt
overtake a long one's remaining chunks (decodes still first), ages waiting prompts so none starves, and never
schedules a sequence in the step that preempted it. Token-exactness of either order against transformers is
test_engine_fuzz.py's (its random schedules draw the policy)."""

from __future__ import annotations

import random

import pytest

from pdserve.config import SchedulerConfig
from pdserve.engine.block_manager import BlockManager
from pdserve.engine.request import EngineRequest, SamplingParams
from pdserve.engine.scheduler import Scheduler, SchedulerOutput
from pdserve.engine.sequence import Sequence, SequenceStatus
from pdserve.kvcache.block_pool import BlockPool

BLOCK = 4


class Queue:
    def __init__(
        self, policy: str, budget: int = 8, aging: float = 0.0, num_blocks: int = 1000, max_num_seqs: int = 16
    ) -> None:
        pool = BlockPool(num_blocks, enable_prefix_caching=False)
        self.blocks = BlockManager(pool, BLOCK)
        self.scheduler = Scheduler(SchedulerConfig(budget, max_num_seqs, policy, aging), self.blocks)
        self.arrivals = 0

    def add(self, name: str, num_prompt_tokens: int, waited_s: float = 0.0) -> Sequence:
        request = EngineRequest(name, tuple(range(1, num_prompt_tokens + 1)), SamplingParams(max_tokens=4))
        seq = Sequence(request, self.arrivals)
        seq.arrival_time -= waited_s
        self.arrivals += 1
        self.scheduler.add(seq)
        return seq

    def step(self) -> list[tuple[str, int]]:
        """Schedule one step and pretend it ran: every chunk's tokens computed, a finished prefill samples one."""
        out = self.scheduler.schedule()
        for chunk in out.chunks:
            chunk.seq.num_computed_tokens += chunk.num_new_tokens
            if chunk.seq.num_computed_tokens == chunk.seq.num_tokens:
                chunk.seq.token_ids.append(7)
        return _layout(out)


def _layout(out: SchedulerOutput) -> list[tuple[str, int]]:
    return [(c.seq.request_id, c.num_new_tokens) for c in out.chunks]


def test_a_later_sequence_preempts_itself_not_an_earlier_committed_reservation() -> None:
    """R reserved first; S arrived after it and runs; R's KV arrives while S holds the only seat, so R waits holding
    its transferred blocks. When S, growing, finds the pool full, the latest arrival gives way — S itself, as vLLM
    preempts — not R: its transfer would be lost and its prompt recomputed. (Before: the latest-arrived *other*
    holder was taken, an earlier one too.)"""
    q = Queue("fcfs", num_blocks=5, max_num_seqs=1)
    reserved = Sequence(EngineRequest("R", tuple(range(1, 9)), SamplingParams(max_tokens=4)), arrival=0)
    q.arrivals = 1
    running = q.add("S", 7)
    assert q.step() == [("S", 7)]
    assert q.blocks.admit(reserved, [], 8)  # reserved at its arrival; its KV arrives now: committed
    reserved.num_computed_tokens = 8
    reserved.token_ids.append(7)
    q.scheduler.add_running(reserved)
    transferred = list(reserved.block_ids)
    preempted: list[str] = []
    while not preempted:
        out = q.scheduler.schedule()
        preempted = [seq.request_id for seq in out.preempted]
        for chunk in out.chunks:
            chunk.seq.num_computed_tokens += chunk.num_new_tokens
            chunk.seq.token_ids.append(7)
    assert preempted == ["S"] and running.status is SequenceStatus.WAITING and not running.block_ids
    # R took the seat S gave up, its transferred KV intact (never recomputed)
    assert reserved.status is SequenceStatus.RUNNING and reserved.block_ids[:2] == transferred
    assert reserved.num_computed_tokens >= 8


def test_fcfs_runs_a_long_prompt_to_its_end_before_a_later_short_one() -> None:
    q = Queue("fcfs")
    q.add("long", 20)
    assert q.step() == [("long", 8)]
    q.add("chat", 3)
    assert q.step() == [("long", 8)]
    assert q.step() == [("long", 4), ("chat", 3)]


def test_shortest_first_lets_a_short_prompt_overtake_a_long_ones_remaining_chunks() -> None:
    q = Queue("shortest_prefill_first")
    q.add("long", 20)
    assert q.step() == [("long", 8)]
    q.add("chat", 3)
    assert q.step() == [("chat", 3), ("long", 5)]  # chat first, the long prompt takes what is left
    assert q.step() == [("chat", 1), ("long", 7)]  # chat decodes first; long prompt's last chunk


def test_shortest_first_orders_waiting_prompts_by_tokens_left_and_ties_by_arrival() -> None:
    q = Queue("shortest_prefill_first", budget=64)
    for name, n in [("a", 30), ("b", 5), ("c", 12), ("d", 5)]:
        q.add(name, n)
    assert q.step() == [("b", 5), ("d", 5), ("c", 12), ("a", 30)]


def test_aging_puts_a_long_waiting_prompt_ahead_of_a_fresh_short_one() -> None:
    q = Queue("shortest_prefill_first", budget=8, aging=100.0)
    q.add("old-long", 40, waited_s=1.0)  # 40 tokens - 100 tokens/s x 1 s: ranks as -60
    q.add("new-chat", 3)
    assert q.step() == [("old-long", 8)]


def test_a_prompt_whose_admission_fails_blocks_the_prompts_behind_it() -> None:
    """As in arrival order: a big prompt the pool cannot take yet is not starved by smaller ones passing it."""
    q = Queue("shortest_prefill_first", budget=64, aging=1000.0, num_blocks=6)
    q.add("running", 8)
    assert q.step() == [("running", 8)]  # 3 blocks with the sampled token's room
    q.add("big", 24, waited_s=1.0)  # needs 6 blocks: only 3 free
    q.add("small", 4)
    assert q.step() == [("running", 1)]


@pytest.mark.parametrize("policy", ["fcfs", "shortest_prefill_first"])
def test_random_queues_respect_budget_and_seq_limit_and_finish_every_prompt(policy: str) -> None:
    """Seeded random arrivals of prompts from 1 token: every step stays within the budget, schedules a sequence at most
    once, never schedules a sequence in the step that preempted it, and every prompt is eventually prefilled (no
    starvation with aging)."""
    num_preempted = 0
    for seed in range(200):
        rng = random.Random(seed)
        budget = rng.choice([1, 3, 8, 17, 64])
        q = Queue(policy, budget=budget, aging=rng.choice([0.5, 50.0]), num_blocks=rng.choice([17, 24, 400]))
        seqs: list[Sequence] = []
        for step in range(2000):
            if step < 40 and rng.random() < 0.5:
                seqs.append(q.add(f"r{len(seqs)}", rng.choice([1, 2, 5, 16, 33, 60])))
            out = q.scheduler.schedule()
            layout = _layout(out)
            assert sum(n for _, n in layout) <= budget, (seed, layout)
            assert len({name for name, _ in layout}) == len(layout), (seed, layout)
            preempted = {s.request_id for s in out.preempted}
            assert not preempted & {name for name, _ in layout}, (seed, layout, preempted)
            num_preempted += len(preempted)
            for chunk in out.chunks:
                chunk.seq.num_computed_tokens += chunk.num_new_tokens
                if chunk.seq.num_computed_tokens == chunk.seq.num_tokens:
                    chunk.seq.token_ids.append(7)
                    if chunk.seq.num_output_tokens >= 2:  # done: leave the queues, free its blocks
                        q.scheduler.remove(chunk.seq)
                        q.scheduler.blocks.free(chunk.seq)
                        chunk.seq.status = SequenceStatus.FINISHED
            if step >= 40 and not q.scheduler.running and not q.scheduler.waiting:
                break
        unfinished = [s.request_id for s in seqs if s.status is not SequenceStatus.FINISHED]
        assert not unfinished, (seed, policy, unfinished)
    assert num_preempted > 0  # the small pools really preempt


@pytest.mark.parametrize("fields", [{"policy": "sjf"}, {"policy": "FCFS"}, {"prefill_aging_tokens_per_s": -1.0}])
def test_an_unknown_policy_or_negative_aging_is_refused_not_run_as_fcfs(fields: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=r"policy|aging"):
        SchedulerConfig(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize("policy", ["fcfs", "shortest_prefill_first"])
def test_decodes_past_the_budget_take_turns(policy: str) -> None:
    """A decode replica seats committed reservations in every free seat, whatever the token budget: with more
    decodes seated than `max_num_batched_tokens`, each still gets a token at least every ceil(seated / budget)
    steps (before: the first `budget` in running order decoded every step, the rest not at all until they ended),
    beside prompts arriving too. Seeded random seats, budgets and lengths."""
    for seed in range(40):
        rng = random.Random(seed)
        budget, max_num_seqs = rng.choice([1, 3, 8]), rng.choice([8, 24])
        q = Queue(policy, budget=budget, max_num_seqs=max_num_seqs)
        for i in range(rng.randint(budget + 1, 2 * max_num_seqs)):  # committed: prompt computed, first token in
            seq = Sequence(EngineRequest(f"c{i}", tuple(range(1, rng.randint(2, 9))), SamplingParams()), q.arrivals)
            q.arrivals += 1
            assert q.blocks.admit(seq, [], seq.num_tokens)
            seq.num_computed_tokens = seq.num_tokens
            seq.token_ids.append(7)
            q.scheduler.add_running(seq)
        wants = {}  # request id -> output tokens it stops at
        waited: dict[str, tuple[int, int]] = {}  # a seated decode's steps since its last token, and their bound
        for step in range(3000):
            if step < 30 and rng.random() < 0.3:
                q.add(f"p{step}", rng.choice([1, 5, 20]))
            out = q.scheduler.schedule()
            scheduled = {c.seq.request_id for c in out.chunks}
            for seq in q.scheduler.running:
                if seq.num_tokens - seq.num_computed_tokens == 1 and seq.request_id not in scheduled:
                    steps, bound = waited.get(seq.request_id, (0, 0))
                    bound = max(bound, -(-len(q.scheduler.running) // budget))  # the most seated while it waits
                    waited[seq.request_id] = (steps + 1, bound)
                    assert steps + 1 <= bound, (seed, step, seq.request_id, steps + 1, bound)
                else:
                    waited.pop(seq.request_id, None)
            for chunk in out.chunks:
                seq = chunk.seq
                seq.num_computed_tokens += chunk.num_new_tokens
                if seq.num_computed_tokens == seq.num_tokens:
                    seq.token_ids.append(7)
                    if seq.num_output_tokens >= wants.setdefault(seq.request_id, rng.randint(20, 60)):
                        q.scheduler.remove(seq)
                        q.blocks.free(seq)
            if not q.scheduler.running and not q.scheduler.waiting:
                break
        assert not q.scheduler.running and not q.scheduler.waiting, seed
