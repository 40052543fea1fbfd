"""Admission control at the ingress: a budget of prompt tokens waiting for their first token, decided before any
work. Beyond it a request is refused at once (429 + Retry-After) instead of queueing into a latency nobody wants;
colocated and disaggregated modes apply the same budget, so both behave the same when full.

Pure Python: the ingress calls `admit` before routing, `started` at the first token, `finish` at the end.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class AdmissionCounters:
    num_admitted: int = 0
    num_refused: int = 0


class Admission:
    def __init__(self, max_queued_tokens: int) -> None:
        """`max_queued_tokens`: prompt tokens admitted and not yet at their first token, across the pool (a request
        longer than the whole budget is still admitted when nothing else waits, so it can never starve)."""
        self.max_queued_tokens = max_queued_tokens
        self.num_queued_tokens = 0
        self._queued: dict[str, int] = {}  # request id -> its prompt tokens, until its first token
        self.counters = AdmissionCounters()

    def admit(
        self, request_id: str, num_prompt_tokens: int, is_part_of_admitted: bool = False, room_for: int | None = None
    ) -> bool:
        """Admit the request (its tokens count against the budget) or refuse it; refusing changes nothing.
        `is_part_of_admitted`: it belongs to a request admitted earlier (a further choice of n > 1, a further prompt
        of a batch): counted, never refused. `room_for`: the tokens to hold room for until this request's first token,
        instead of its own (a batch's, whose further prompts join as parts then), capped at the whole budget: a batch
        larger than the budget is admitted as a prompt larger than it is, when nothing else waits."""
        needed = num_prompt_tokens
        if room_for is not None:
            needed = max(num_prompt_tokens, min(room_for, self.max_queued_tokens))
        is_room = is_part_of_admitted or self.num_queued_tokens + needed <= self.max_queued_tokens or not self._queued
        if not is_room:
            self.counters.num_refused += 1
            return False
        self._queued[request_id] = needed
        self.num_queued_tokens += needed
        self.counters.num_admitted += 1
        return True

    def started(self, request_id: str) -> None:
        """The request has its first token: its prompt no longer waits."""
        self.num_queued_tokens -= self._queued.pop(request_id, 0)

    def finish(self, request_id: str) -> None:
        """The request ended (any way); idempotent."""
        self.started(request_id)

    @property
    def num_queued(self) -> int:
        return len(self._queued)
