"""Continuous batching: one token budget per step, decode first, chunked prefill, preemption by recompute."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from pdserve.config import SchedulerConfig
from pdserve.engine.block_manager import BlockManager
from pdserve.engine.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class ScheduledChunk:
    seq: Sequence
    num_new_tokens: int  # computes tokens [num_computed_tokens, num_computed_tokens + num_new_tokens)

    @property
    def is_last(self) -> bool:
        """The chunk reaches the end of the known tokens: its last row samples the next token."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens

    @property
    def num_prompt_tokens(self) -> int:
        """Of its tokens, those of the prompt (a recomputed output token is not one)."""
        return max(0, min(self.num_new_tokens, self.seq.num_prompt_tokens - self.seq.num_computed_tokens))


@dataclass(frozen=True)
class SchedulerOutput:
    chunks: list[ScheduledChunk]  # single-token chunks (decodes) first, then prefill chunks
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_new_tokens for c in self.chunks)

    @property
    def num_prompt_tokens(self) -> int:
        return sum(c.num_prompt_tokens for c in self.chunks)


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager) -> None:
        self.config = config
        self.blocks = blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_steps = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """Join a sequence that already holds its blocks, its prompt computed (a committed KV reservation). It waits
        for a seat among the waiting prompts in arrival order (its reservation's), keeping its blocks; the next
        `schedule` seats it at once if nobody waits ahead of it (`_seat_committed`): as in vLLM, where a request whose
        KV arrived from a remote prefill rejoins the waiting queue, so commits never keep a prompt out of the batch."""
        seq.status = SequenceStatus.WAITING
        at = next((i for i, w in enumerate(self.waiting) if w.arrival > seq.arrival), len(self.waiting))
        self.waiting.insert(at, seq)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out of the queues; the caller frees its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def schedule(self) -> SchedulerOutput:
        self.num_steps += 1
        out = self._schedule(hold_seats_for_prompts=True)
        if not out.chunks and any(w.block_ids for w in self.waiting):
            # Nothing could run: the prompts ahead could not be admitted, their blocks held by the committed
            # reservations behind them. Those take the seats instead (they need no allocation, and free blocks).
            # The first pass's preemptions count: a sequence preempted in this step is not readmitted in it.
            out = self._schedule(hold_seats_for_prompts=False, preempted=out.preempted)
        for chunk in out.chunks:
            chunk.seq.last_step = self.num_steps
        return out

    def _schedule(self, hold_seats_for_prompts: bool, preempted: list[Sequence] | None = None) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted = [] if preempted is None else list(preempted)  # this step's so far: no admission after one
        self._seat_committed(hold_seats_for_prompts)
        # At most max_num_seqs run. Decode first: a sequence with one token left to compute never waits behind a
        # prefill chunk. Decodes the budget cannot all take (more seated than max_num_batched_tokens: committed
        # reservations fill every seat) take turns, the longest unscheduled first: in a fixed order the first
        # `budget` would decode every step and the rest not at all until those end.
        eligible = self.running[: self.config.max_num_seqs]
        running = sorted(eligible, key=_decode_first)
        if self.config.policy == "shortest_prefill_first":
            # Running prefills then compete with the waiting prompts for what the decodes leave (_prefill_order).
            running = [s for s in running if s.num_tokens - s.num_computed_tokens == 1]
        for seq in running:
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:  # preempted earlier in this loop
                continue
            budget -= self._continue(seq, budget, chunks, preempted)
        if self.config.policy == "shortest_prefill_first":
            chunks.extend(self._prefill_order(budget, chunks, preempted, eligible))
        elif not preempted:
            chunks.extend(self._admit(budget))
        return SchedulerOutput(chunks, preempted)

    def _seat_committed(self, hold_seats_for_prompts: bool) -> None:
        """Give the free seats to the waiting queue in arrival order: a committed reservation (it holds its blocks)
        joins `running` now; a prompt keeps its seat for admission later in this step (unless told not to)."""
        seats = self.config.max_num_seqs - len(self.running)
        for seq in list(self.waiting):
            if seats <= 0:
                break
            if seq.block_ids:
                self.waiting.remove(seq)
                seq.status = SequenceStatus.RUNNING
                seq.last_step = self.num_steps  # behind the decodes seated before it, when they take turns
                self.running.append(seq)
                seats -= 1
            elif hold_seats_for_prompts:
                seats -= 1

    def _continue(self, seq: Sequence, budget: int, chunks: list[ScheduledChunk], preempted: list[Sequence]) -> int:
        """Schedule a running sequence's next chunk within `budget`; the tokens it takes (0: it was preempted)."""
        num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
        if not self._make_room(seq, seq.num_computed_tokens + num_new, chunks, preempted):
            return 0
        chunks.append(ScheduledChunk(seq, num_new))
        return num_new

    def _prefill_order(
        self, budget: int, chunks: list[ScheduledChunk], preempted: list[Sequence], eligible: list[Sequence]
    ) -> list[ScheduledChunk]:
        """shortest_prefill_first: running prefills and waiting prompts by prompt tokens left, less the aging credit
        of the time since arrival; ties in arrival order. Admission stops at the first prompt the pool cannot take (or
        after a preemption), as in arrival order."""
        now = time.monotonic()
        aging = self.config.prefill_aging_tokens_per_s
        scheduled = {id(c.seq) for c in chunks}
        candidates = [s for s in eligible if id(s) not in scheduled] + list(self.waiting)
        candidates.sort(
            key=lambda s: (s.num_tokens - s.num_computed_tokens - aging * (now - s.arrival_time), s.arrival)
        )
        new: list[ScheduledChunk] = []
        admitting = True
        for seq in candidates:
            if budget == 0:
                break
            if seq.status is SequenceStatus.RUNNING and seq in self.running:
                taken = self._continue(seq, budget, [*chunks, *new], preempted)
                if taken:
                    new.append(ScheduledChunk(seq, taken))
                    budget -= taken
            elif (
                admitting
                and not preempted  # a sequence preempted this step is not readmitted in it
                and seq.status is SequenceStatus.WAITING
                and not seq.block_ids  # a committed reservation is seated by _seat_committed, never admitted
                and len(self.running) < self.config.max_num_seqs
            ):
                chunk = self._admit_one(seq, budget)
                if chunk is None:
                    admitting = False
                    continue
                new.append(chunk)
                budget -= chunk.num_new_tokens
        return new

    def _make_room(
        self, seq: Sequence, num_tokens: int, chunks: list[ScheduledChunk], preempted: list[Sequence]
    ) -> bool:
        """Grow `seq` to `num_tokens`, preempting the latest-arrived unscheduled sequences as needed (committed
        reservations waiting for a seat too: they hold blocks) — `seq` itself when it arrived last, as vLLM does:
        a later request never evicts an earlier one's KV (a running prompt's, or a transfer's)."""
        scheduled = {id(c.seq) for c in chunks}
        while not self.blocks.grow(seq, num_tokens):
            holders = [*self.running, *(w for w in self.waiting if w.block_ids)]
            victims = [s for s in holders if id(s) not in scheduled and s is not seq]
            victim = max([*victims, seq], key=lambda s: s.arrival)
            self._preempt(victim)
            preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        """Free the sequence's blocks; it recomputes when admitted again (a committed reservation keeps its place in
        the waiting queue, a running sequence goes to its front)."""
        self.blocks.free(seq)
        seq.num_computed_tokens = 0
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            seq.status = SequenceStatus.WAITING
            self.waiting.appendleft(seq)

    def _admit(self, budget: int) -> list[ScheduledChunk]:
        """Admit waiting sequences in arrival order while the budget, seq limit and pool allow."""
        chunks = []
        for seq in list(self.waiting):
            if budget == 0 or len(self.running) >= self.config.max_num_seqs:
                break
            if seq.block_ids:  # a committed reservation: seated at the next step's start, it needs no allocation
                continue
            chunk = self._admit_one(seq, budget)
            if chunk is None:
                break
            chunks.append(chunk)
            budget -= chunk.num_new_tokens
        return chunks

    def _admit_one(self, seq: Sequence, budget: int) -> ScheduledChunk | None:
        """Move a waiting sequence to running with its first chunk, reusing cached prefix blocks; None when the pool
        cannot hold the chunk."""
        # At least one token must be computed to get logits, so a full hit leaves the last token out.
        cached = self.blocks.match_prefix(seq, max_tokens=seq.num_tokens - 1)
        if seq.sampling.prompt_logprobs is not None:  # every prompt token's logits are needed: no cache hit
            cached = []
        num_cached = len(cached) * self.blocks.block_size
        num_new = min(seq.num_tokens - num_cached, budget)
        if not self.blocks.admit(seq, cached, num_cached + num_new):
            return None
        self.waiting.remove(seq)
        seq.num_computed_tokens = num_cached
        if seq.num_cached_tokens < 0:  # first admission (not a re-admission after preemption)
            seq.num_cached_tokens = num_cached
            seq.queue_s = time.monotonic() - seq.arrival_time
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        return ScheduledChunk(seq, num_new)


def _decode_first(seq: Sequence) -> tuple[bool, int]:
    """Decodes first, the least recently scheduled first; prefills after them in running order (a stable sort)."""
    is_prefill = seq.num_tokens - seq.num_computed_tokens > 1
    return is_prefill, 0 if is_prefill else seq.last_step
