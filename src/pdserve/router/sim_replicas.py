"""Modeled replicas for the replay simulator: an event queue, a FIFO prefill replica, a batching decode replica.

Each replica owns a real `BlockPool`, so prefix hits, LRU eviction and the KV events the router consumes are the
engine's own; only compute is modeled (prefill at a token rate, decode steps at a base + per-sequence cost).
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from pdserve.kvcache import BlockHash, BlockPool
from pdserve.router.cost import RouteDecision
from pdserve.router.load import ReplicaReport
from pdserve.router.trace import TraceRequest

NODE_ID = "node0"  # every modeled replica shares one node (one transfer bandwidth)


@dataclass(frozen=True)
class ReplicaModel:
    """What a replica costs in time and holds in KV. Defaults: SmolLM2-135M bf16 on the 2-core dev CPU."""

    prefill_tokens_per_s: float = 2900.0  # also the decode replica's rate for local prefills
    decode_step_base_s: float = 0.021  # a decode step at batch 0 ...
    decode_step_per_seq_s: float = 0.001  # ... plus this per running sequence (22 ms at 1, 38 ms at 16)
    num_blocks: int = 2048
    block_size: int = 16


@dataclass(eq=False)  # identity: a request is found in run lists by itself, not by value
class SimRequest:
    """One request's state as it moves through the modeled replicas."""

    trace: TraceRequest
    block_hashes: list[BlockHash]  # the prompt's full blocks
    decision: RouteDecision | None = None
    decode_block_ids: list[int] = field(default_factory=list)  # held on the decode replica
    num_decode_cached_tokens: int = 0  # the decode replica's hit at reserve (what it need not receive)
    num_cached_tokens: int = 0  # realized hit on the replica that computed the prompt
    num_computed_tokens: int = 0
    num_transferred_blocks: int = 0
    num_output_tokens: int = 0
    num_preemptions: int = 0  # times the decode replica evicted it for room (it is recomputed there)
    first_token_s: float | None = None
    finish_s: float | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.trace.prompt_token_ids)


@dataclass(frozen=True)
class _Held:
    block_ids: list[int]  # the cached prefix first
    num_cached_tokens: int


@dataclass(frozen=True)
class _Admission:
    req: SimRequest
    num_compute_tokens: int  # prefill work in this step (prompt, or prompt + outputs after a preemption)


class EventQueue:
    """Simulated time: callbacks run in time order, ties in scheduling order (so runs are deterministic)."""

    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()

    def at(self, time_s: float, callback: Callable[[], None]) -> None:
        assert time_s >= self.now, "cannot schedule in the past"
        heapq.heappush(self._heap, (time_s, next(self._order), callback))

    def after(self, delay_s: float, callback: Callable[[], None]) -> None:
        self.at(self.now + delay_s, callback)

    def __len__(self) -> int:
        return len(self._heap)

    def run(self) -> None:
        while self._heap:
            self.now, _, callback = heapq.heappop(self._heap)
            callback()


class _Replica:
    role = ""

    def __init__(self, replica_id: str, model: ReplicaModel, queue: EventQueue) -> None:
        self.replica_id = replica_id
        self.model = model
        self.queue = queue
        self.pool = BlockPool(model.num_blocks)

    def _report(self, num_running: int, num_waiting: int) -> ReplicaReport:
        free = self.pool.num_free_blocks
        return ReplicaReport(self.replica_id, self.role, NODE_ID, self.model.num_blocks, free, num_running, num_waiting)

    def _hold(self, req: SimRequest, num_max_cached_blocks: int, num_tokens: int) -> _Held | None:
        """The engine's admission: touch the cached prefix (at most `num_max_cached_blocks`), allocate the rest of
        the blocks for `num_tokens`. None (nothing held) when the pool lacks room."""
        cached = self.pool.lookup(req.block_hashes[:num_max_cached_blocks])
        self.pool.touch(cached)
        num_total = -(-num_tokens // self.model.block_size)
        fresh = self.pool.allocate(num_total - len(cached))
        if fresh is None:
            self.pool.free(cached)
            return None
        return _Held(cached + fresh, len(cached) * self.model.block_size)

    def _cache_prompt(self, req: SimRequest, block_ids: list[int]) -> None:
        """Register the prompt's full blocks once computed (emits `stored` events)."""
        num_full = len(req.block_hashes)
        self.pool.cache(block_ids[:num_full], req.block_hashes)


class PrefillReplica(_Replica):
    """Computes one prompt at a time, FIFO, in (uncached tokens / rate); the blocks stay cached after."""

    role = "prefill"

    def __init__(
        self, replica_id: str, model: ReplicaModel, queue: EventQueue, on_done: Callable[[SimRequest], None]
    ) -> None:
        super().__init__(replica_id, model, queue)
        self.on_done = on_done
        self.waiting: deque[SimRequest] = deque()
        self.current: SimRequest | None = None

    def report(self) -> ReplicaReport:
        return self._report(int(self.current is not None), len(self.waiting))

    def submit(self, req: SimRequest) -> None:
        self.waiting.append(req)
        if self.current is None:
            self._start_next()

    def _start_next(self) -> None:
        req = self.current = self.waiting.popleft()
        # As the engine: at least the last prompt token is recomputed.
        held = self._hold(req, (req.num_prompt_tokens - 1) // self.model.block_size, req.num_prompt_tokens)
        assert held is not None, "one prompt at a time always fits (the simulation checks prompt sizes)"
        block_ids, req.num_cached_tokens = held.block_ids, held.num_cached_tokens
        req.num_computed_tokens = req.num_prompt_tokens - req.num_cached_tokens
        self.queue.after(req.num_computed_tokens / self.model.prefill_tokens_per_s, lambda: self._end(block_ids))

    def _end(self, block_ids: list[int]) -> None:
        req, self.current = self.current, None
        assert req is not None
        self._cache_prompt(req, block_ids)
        self.pool.free(block_ids)
        self.on_done(req)
        if self.waiting:
            self._start_next()


class DecodeReplica(_Replica):
    """Holds prompts (reserved for a transfer, or prefilled here when local) and runs decode steps back to back
    while it has work; each step yields one token per running sequence."""

    role = "decode"

    def __init__(
        self,
        replica_id: str,
        model: ReplicaModel,
        queue: EventQueue,
        on_first_token: Callable[[SimRequest], None],
        on_finish: Callable[[SimRequest], None],
    ) -> None:
        super().__init__(replica_id, model, queue)
        self.on_first_token = on_first_token
        self.on_finish = on_finish
        self.running: list[SimRequest] = []
        self.waiting_local: deque[SimRequest] = deque()
        self.is_stepping = False

    def report(self) -> ReplicaReport:
        return self._report(len(self.running), len(self.waiting_local))

    def reserve(self, req: SimRequest) -> bool:
        """Hold the prompt's blocks, reusing every cached full block; False (nothing held) when out of room."""
        held = self._hold(req, len(req.block_hashes), req.num_prompt_tokens)
        if held is None:
            return False
        req.decode_block_ids, req.num_decode_cached_tokens = held.block_ids, held.num_cached_tokens
        return True

    def commit(self, req: SimRequest) -> None:
        """The transferred KV is in place: cache the prompt, emit the first token, join the next step."""
        self._cache_prompt(req, req.decode_block_ids)
        self._first_token(req)
        self._kick()

    def add_local(self, req: SimRequest) -> None:
        """Prefill `req` here, in the next step that has room for it."""
        self.waiting_local.append(req)
        self._kick()

    def _kick(self) -> None:
        if not self.is_stepping and (self.running or self.waiting_local):
            self._start_step()

    def _start_step(self) -> None:
        num_preempted = len(self.waiting_local)
        decoding = self._grow_running()
        num_preempted = len(self.waiting_local) - num_preempted
        # As the engine: no admission in a step that preempted (unless nothing else would run).
        admitted = self._admit_local() if not num_preempted or not decoding else []
        if not decoding and not admitted:
            return  # everything waits for room: a commit or a finish elsewhere kicks again
        num_prefill_tokens = sum(a.num_compute_tokens for a in admitted)
        step_s = (
            self.model.decode_step_base_s
            + self.model.decode_step_per_seq_s * (len(decoding) + len(admitted))
            + num_prefill_tokens / self.model.prefill_tokens_per_s
        )
        self.is_stepping = True
        self.queue.after(step_s, lambda: self._end_step(decoding, admitted))

    def _end_step(self, decoding: list[SimRequest], admitted: list[_Admission]) -> None:
        self.is_stepping = False
        for req in decoding:
            self._next_token(req)
        for a in admitted:
            self._cache_prompt(a.req, a.req.decode_block_ids)
            if a.req.num_output_tokens == 0:
                self._first_token(a.req)
            else:  # a preempted sequence, recomputed: its next token
                self.running.append(a.req)
                self._next_token(a.req)
        self._kick()

    def _grow_running(self) -> list[SimRequest]:
        """Give every running sequence room for its next token; when the pool is out of blocks, preempt the
        newest running sequence (to be recomputed locally later), as the engine's scheduler does."""
        num_grown = 0
        while num_grown < len(self.running):
            req = self.running[num_grown]
            if self._grow(req):
                num_grown += 1
            else:
                self._preempt(self.running[-1])  # the newest; `req` itself when it is the newest
        return self.running[:num_grown]

    def _preempt(self, req: SimRequest) -> None:
        self.running.remove(req)
        self.pool.free(req.decode_block_ids)
        req.decode_block_ids = []
        req.num_preemptions += 1
        self.waiting_local.appendleft(req)

    def _admit_local(self) -> list[_Admission]:
        """FIFO admission of local prefills and preempted recomputes while the pool has room (one chunk each)."""
        admitted = []
        while self.waiting_local:
            req = self.waiting_local[0]
            num_tokens = req.num_prompt_tokens + req.num_output_tokens
            held = self._hold(req, (num_tokens - 1) // self.model.block_size, num_tokens)
            if held is None:
                break
            self.waiting_local.popleft()
            req.decode_block_ids, num_cached = held.block_ids, held.num_cached_tokens
            if req.num_output_tokens == 0:  # a prompt: its realized hit and compute
                req.num_cached_tokens = req.num_decode_cached_tokens = num_cached
                req.num_computed_tokens = req.num_prompt_tokens - num_cached
            admitted.append(_Admission(req, num_tokens - num_cached))
        return admitted

    def _grow(self, req: SimRequest) -> bool:
        """Blocks for the prompt and every output token so far (the next step writes the newest one's KV).
        Output blocks are never cached: generated tokens never match a later prompt in a trace."""
        num_tokens = req.num_prompt_tokens + req.num_output_tokens
        num_new = -(-num_tokens // self.model.block_size) - len(req.decode_block_ids)
        if num_new <= 0:
            return True
        fresh = self.pool.allocate(num_new)
        if fresh is None:
            return False
        req.decode_block_ids.extend(fresh)
        return True

    def _first_token(self, req: SimRequest) -> None:
        req.num_output_tokens = 1
        self.on_first_token(req)
        self.running.append(req)
        if req.num_output_tokens >= req.trace.output_len:
            self._finish(req)

    def _next_token(self, req: SimRequest) -> None:
        req.num_output_tokens += 1
        if req.num_output_tokens >= req.trace.output_len:
            self._finish(req)

    def _finish(self, req: SimRequest) -> None:
        self.running.remove(req)
        self.pool.free(req.decode_block_ids)
        req.decode_block_ids = []
        self.on_finish(req)
