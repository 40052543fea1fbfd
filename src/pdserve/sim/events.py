"""Simulated time: an event queue whose callbacks run in time order, ties in scheduling order (deterministic runs)."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable


class EventQueue:
    """`run` stops when no work event is left: periodic events (syncs, scaling ticks, replica starts) are scheduled
    as `daemon` and never keep a finished run going."""

    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list[tuple[float, int, bool, Callable[[], None]]] = []
        self._order = itertools.count()
        self._num_work = 0  # non-daemon events in the heap

    def at(self, time_s: float, callback: Callable[[], None], daemon: bool = False) -> None:
        assert time_s >= self.now, "cannot schedule in the past"
        heapq.heappush(self._heap, (time_s, next(self._order), daemon, callback))
        self._num_work += not daemon

    def after(self, delay_s: float, callback: Callable[[], None], daemon: bool = False) -> None:
        self.at(self.now + delay_s, callback, daemon)

    @property
    def has_work(self) -> bool:
        return self._num_work > 0

    def run(self) -> None:
        while self._num_work:
            self.now, _, daemon, callback = heapq.heappop(self._heap)
            self._num_work -= not daemon
            callback()
