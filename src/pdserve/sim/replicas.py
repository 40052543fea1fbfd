"""Modeled replicas: the engine's own `Scheduler`, `BlockManager` and `BlockPool` over real `Sequence`s; only the
time a step takes is modeled.

A replica steps back to back while it has work. `Scheduler.schedule()` picks each batch as in `LLMEngine.step`
(decodes first, chunked prefill under `max_num_batched_tokens`, preemption by recompute); the step lasts
`ReplicaModel.step_s`; then what `LLMEngine._postprocess` does after the model ran is reproduced without torch:
computed counts advance, full blocks are registered in the prefix cache (KV events), a token id is appended to every
sequence that ended its known tokens, finished sequences free their blocks.

A prefill replica runs prefill-only sequences and holds each prompt's blocks until its transfer ends. A decode
replica reserves a prompt's blocks (reusing its cached prefix), commits once the missing blocks arrived (the
sequence joins the running batch: `Scheduler.add_running`), or prefills a local request itself.
"""

from __future__ import annotations

import itertools
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from pdserve.config import SchedulerConfig
from pdserve.engine.block_manager import BlockManager
from pdserve.engine.request import EngineRequest, LoadCounters, SamplingParams
from pdserve.engine.scheduler import Scheduler, SchedulerOutput
from pdserve.engine.sequence import Sequence, SequenceStatus
from pdserve.kvcache import BlockHash, BlockPool
from pdserve.planner.signals import ReplicaSignals
from pdserve.router.cost import RouteDecision
from pdserve.router.load import ReplicaReport
from pdserve.sim.events import EventQueue
from pdserve.sim.trace import TraceRequest

NODE_ID = "node0"  # every modeled replica shares one node (one transfer bandwidth)


@dataclass(frozen=True)
class ReplicaModel:
    """What a step costs and what a replica holds. Model parameters, not measurements. The defaults resemble
    SmolLM2-135M bf16 on the 2-core dev CPU (a 512-token prefill in 0.176 s, ~2900 tok/s; a decode step 22 ms at
    batch 1, 38 ms at batch 16); `GPU_REPLICA` resembles an 8B model on one H100."""

    step_base_s: float = 0.021  # any step ...
    per_prefill_token_s: float = (0.176 - 0.021) / 512  # ... plus this per token of a prompt chunk (or recompute) ...
    per_decode_seq_s: float = 0.001  # ... plus this per sequence decoding one token
    num_blocks: int = 2048
    block_size: int = 16
    max_num_batched_tokens: int = 512  # the engine's SchedulerConfig
    max_num_seqs: int = 64

    def step_s(self, num_prefill_tokens: int, num_decode_seqs: int) -> float:
        prefill_s = self.per_prefill_token_s * num_prefill_tokens
        return self.step_base_s + prefill_s + self.per_decode_seq_s * num_decode_seqs

    @property
    def scheduler(self) -> SchedulerConfig:
        return SchedulerConfig(self.max_num_batched_tokens, self.max_num_seqs)

    @property
    def prefill_tokens_per_s(self) -> float:
        """Prompt tokens per second in full prefill steps."""
        return self.max_num_batched_tokens / self.step_s(self.max_num_batched_tokens, 0)


# An 8B model on one H100 (model parameters, not measurements): prefill ~10k tok/s, decode 12 ms + 0.1 ms/seq.
GPU_REPLICA = ReplicaModel(0.012, 1e-4, 1e-4, num_blocks=30_000, max_num_batched_tokens=2048, max_num_seqs=256)


@dataclass(eq=False)  # identity: a request is found by itself, not by value
class SimRequest:
    """One request's state as it moves through the modeled replicas."""

    trace: TraceRequest
    block_hashes: list[BlockHash]  # the prompt's full blocks
    decision: RouteDecision | None = None
    num_decode_cached_tokens: int = 0  # the decode replica's hit at reserve (what it need not receive)
    num_cached_tokens: int = 0  # realized hit on the replica that computed the prompt
    num_computed_tokens: int = 0  # prompt tokens that replica computed
    num_prefill_tokens: int = 0  # prompt tokens computed for it, on any replica (again after a preemption)
    num_transferred_blocks: int = 0
    num_output_tokens: int = 0
    num_preemptions: int = 0  # times a replica evicted it for room (it is recomputed there)
    first_token_s: float | None = None
    finish_s: float | None = None
    token_seed: int = field(init=False)

    def __post_init__(self) -> None:
        self.token_seed = zlib.crc32(self.trace.request_id.encode())  # stable across processes, unlike hash()

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.trace.prompt_token_ids)

    def output_token_id(self, index: int) -> int:
        """The token a model would sample at output `index`: any id, the same on every replica."""
        return 100 + (self.token_seed + 7919 * index) % 49_000


class _Replica:
    role = ""

    def __init__(self, replica_id: str, model: ReplicaModel, queue: EventQueue) -> None:
        self.replica_id = replica_id
        self.model = model
        self.queue = queue
        self.pool = BlockPool(model.num_blocks)
        self.blocks = BlockManager(self.pool, model.block_size)
        self.scheduler = Scheduler(model.scheduler, self.blocks)
        self.requests: dict[str, SimRequest] = {}  # every request with a sequence here
        self.seqs: dict[str, Sequence] = {}
        self.counters = LoadCounters()  # as the engine counts them
        self.num_ongoing = 0  # routed here and not done here (the simulation counts): Serve's "ongoing requests"
        self.is_stepping = False
        self._arrivals = itertools.count()

    @property
    def is_idle(self) -> bool:
        return not self.seqs and self.num_ongoing == 0

    def report(self) -> ReplicaReport:
        s = self.scheduler
        num_free = self.pool.num_free_blocks
        return ReplicaReport(self.replica_id, self.role, NODE_ID, self.model.num_blocks, num_free, len(s.running),
                             len(s.waiting), self._queued_prefill_tokens())  # fmt: skip

    def _queued_prefill_tokens(self) -> int:
        s = self.scheduler
        return sum(max(q.num_prompt_tokens - q.num_computed_tokens, 0) for q in (*s.waiting, *s.running))

    def signals(self, now_s: float) -> ReplicaSignals:
        s = self.scheduler
        queued = self._queued_prefill_tokens()
        return ReplicaSignals.from_counters(
            now_s, self.counters, queued_prefill_tokens=queued, num_running=len(s.running),
            num_waiting=len(s.waiting), kv_blocks_total=self.model.num_blocks,
            kv_blocks_used=self.model.num_blocks - self.pool.num_free_blocks,
            kv_blocks_reserved=self._num_reserved_blocks(),
            num_waiting_with_kv=sum(1 for q in s.waiting if q.block_ids),
        )  # fmt: skip

    def _num_reserved_blocks(self) -> int:
        return 0

    def _sequence(self, req: SimRequest, is_prefill_only: bool = False) -> Sequence:
        t = req.trace
        request = EngineRequest(t.request_id, t.prompt_token_ids, SamplingParams(t.output_len, ignore_eos=True))
        return Sequence(request, next(self._arrivals), is_prefill_only)

    def _accept(self, req: SimRequest, seq: Sequence) -> None:
        self.requests[seq.request_id], self.seqs[seq.request_id] = req, seq
        self.counters.requests += 1
        self.counters.prompt_tokens += seq.num_prompt_tokens

    def _append_token(self, req: SimRequest, seq: Sequence) -> int:
        """Append the next output token; returns the number of output tokens now."""
        index = len(seq.token_ids) - seq.num_prompt_tokens
        seq.token_ids.append(req.output_token_id(index))
        req.num_output_tokens = index + 1
        return index + 1

    def _drop(self, seq: Sequence) -> SimRequest:
        """Out of the scheduler and the pool (registered blocks stay cached until evicted)."""
        self.scheduler.remove(seq)
        self.blocks.free(seq)
        seq.status = SequenceStatus.FINISHED
        del self.seqs[seq.request_id]
        return self.requests.pop(seq.request_id)

    def _kick(self) -> None:
        """Start a step unless one runs; nothing to schedule leaves the replica idle until new work kicks it."""
        if self.is_stepping:
            return
        batch = self.scheduler.schedule()
        for seq in batch.preempted:
            self.requests[seq.request_id].num_preemptions += 1
        if not batch.chunks:
            return
        num_compute = num_decode = num_prompt = 0  # tokens of prefill chunks; 1-token decodes; prompt tokens
        for c in batch.chunks:
            seq = c.seq
            if c.num_new_tokens == 1 and seq.num_computed_tokens >= seq.num_prompt_tokens:
                num_decode += 1  # the KV of the newest output token
            else:
                num_compute += c.num_new_tokens  # a prompt's chunk, or a preempted sequence's recompute
            prompt = c.num_prompt_tokens
            self.requests[seq.request_id].num_prefill_tokens += prompt
            num_prompt += prompt
        step_s = self.model.step_s(num_compute, num_decode)
        self.is_stepping = True
        self.queue.after(step_s, lambda: self._end_step(batch, step_s, num_prompt))

    def _end_step(self, batch: SchedulerOutput, step_s: float, num_prompt: int) -> None:
        """LLMEngine._postprocess, the model's samples replaced by `SimRequest.output_token_id`."""
        self.is_stepping = False
        self.counters.count_step(num_prompt, len(batch.chunks), step_s)
        for chunk in batch.chunks:
            is_last = chunk.is_last  # read before num_computed_tokens moves
            seq = chunk.seq
            seq.num_computed_tokens += chunk.num_new_tokens
            self.blocks.register_computed(seq)
            if is_last:
                self.counters.generated_tokens += 1
                req = self.requests[seq.request_id]
                self._sampled(req, seq, self._append_token(req, seq))
        self._kick()

    def _sampled(self, req: SimRequest, seq: Sequence, num_output_tokens: int) -> None:
        raise NotImplementedError


class PrefillReplica(_Replica):
    """Prefill-only sequences; each result holds its blocks until `release` (its transfer ended)."""

    role = "prefill"

    def __init__(
        self, replica_id: str, model: ReplicaModel, queue: EventQueue, on_prefilled: Callable[[SimRequest], None]
    ) -> None:
        super().__init__(replica_id, model, queue)
        self.on_prefilled = on_prefilled

    def submit(self, req: SimRequest) -> None:
        seq = self._sequence(req, is_prefill_only=True)
        self._accept(req, seq)
        self.scheduler.add(seq)
        self._kick()

    def release(self, req: SimRequest) -> None:
        """The transfer ended: free the prompt's blocks (they stay cached); room may admit a waiting prompt."""
        self._drop(self.seqs[req.trace.request_id])
        self._kick()

    def _sampled(self, req: SimRequest, seq: Sequence, num_output_tokens: int) -> None:
        self.scheduler.remove(seq)  # LLMEngine._hold
        seq.status = SequenceStatus.HELD
        req.num_cached_tokens = seq.num_cached_tokens
        req.num_computed_tokens = seq.num_prompt_tokens - seq.num_cached_tokens
        self.on_prefilled(req)


class DecodeReplica(_Replica):
    """Reservations committed into the running batch, and local prefills; one token per running sequence a step."""

    role = "decode"

    def __init__(
        self,
        replica_id: str,
        model: ReplicaModel,
        queue: EventQueue,
        on_reserved: Callable[[SimRequest], None],
        on_first_token: Callable[[SimRequest], None],
        on_finish: Callable[[SimRequest], None],
    ) -> None:
        super().__init__(replica_id, model, queue)
        self.on_reserved = on_reserved
        self.on_first_token = on_first_token
        self.on_finish = on_finish
        self.reserved: dict[str, Sequence] = {}  # open reservations: KV being written from outside
        # Reserves refused for lack of room, retried in arrival order whenever blocks may have been freed. (The real
        # ingress polls with a backoff of 0.02-0.5 s; this is the limit of fast polling, and costs no events.)
        self.waiting_reserves: deque[SimRequest] = deque()

    def reserve(self, req: SimRequest) -> None:
        """LLMEngine.reserve: hold the prompt's blocks, reusing every cached full block; `on_reserved` once held
        (at once, or when room frees up)."""
        self.waiting_reserves.append(req)
        self._admit_reserves()

    def _admit_reserves(self) -> None:
        while self.waiting_reserves and self._try_reserve(self.waiting_reserves[0]):
            self.on_reserved(self.waiting_reserves.popleft())
        if self.waiting_reserves:
            self.counters.reserves_refused += 1

    def _try_reserve(self, req: SimRequest) -> bool:
        seq = self._sequence(req)
        cached = self.blocks.match_prefix(seq, max_tokens=seq.num_prompt_tokens)
        if not self.blocks.admit(seq, cached, seq.num_prompt_tokens):
            return False
        seq.num_cached_tokens = seq.num_computed_tokens = len(cached) * self.model.block_size
        seq.status = SequenceStatus.HELD
        self._accept(req, seq)
        self.reserved[seq.request_id] = seq
        req.num_decode_cached_tokens = seq.num_cached_tokens
        return True

    def _kick(self) -> None:
        super()._kick()
        self._admit_reserves()  # after the step took its blocks, as reserve calls come in between steps

    def commit(self, req: SimRequest) -> None:
        """LLMEngine.commit: the missing blocks arrived; the first token (P's) joins the running batch."""
        seq = self.reserved.pop(req.trace.request_id)
        seq.num_computed_tokens = seq.num_prompt_tokens
        self.blocks.register_computed(seq)
        num_output_tokens = self._append_token(req, seq)
        if num_output_tokens < req.trace.output_len:
            self.scheduler.add_running(seq)
        self._after_token(req, seq, num_output_tokens)
        self._kick()

    def add_local(self, req: SimRequest) -> None:
        """Prefill `req` here (chunked like any prompt), then decode it."""
        seq = self._sequence(req)
        self._accept(req, seq)
        self.scheduler.add(seq)
        self._kick()

    def _num_reserved_blocks(self) -> int:
        return sum(len(seq.block_ids) for seq in self.reserved.values())

    def _sampled(self, req: SimRequest, seq: Sequence, num_output_tokens: int) -> None:
        if num_output_tokens == 1:  # a local prefill's first token: its realized hit
            req.num_cached_tokens = req.num_decode_cached_tokens = seq.num_cached_tokens
            req.num_computed_tokens = seq.num_prompt_tokens - seq.num_cached_tokens
        self._after_token(req, seq, num_output_tokens)

    def _after_token(self, req: SimRequest, seq: Sequence, num_output_tokens: int) -> None:
        if num_output_tokens == 1:
            self.on_first_token(req)
        if num_output_tokens >= req.trace.output_len:
            self._drop(seq)
            self.counters.finished += 1
            self.on_finish(req)
