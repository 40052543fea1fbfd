"""KV events: what a replica's prefix cache gained and lost, for the router's prefix index.

Every change gets the next sequence number of its pool. Events live in a bounded buffer; a consumer asks for
"everything after seq N" and gets either the missing events in order or, if it fell behind the buffer (or the
pool restarted: a new incarnation), a snapshot of every cached hash as of the latest seq.
"""

from __future__ import annotations

import enum
import itertools
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from pdserve.kvcache.hashing import BlockHash


class KVEventKind(str, enum.Enum):
    STORED = "stored"  # blocks became reusable prefix-cache entries
    REMOVED = "removed"  # blocks were evicted (their hashes are gone)
    CLEARED = "cleared"  # the whole cache was dropped


@dataclass(frozen=True)
class KVEvent:
    seq: int  # per-pool, consecutive from 1
    kind: KVEventKind
    block_hashes: tuple[BlockHash, ...]  # empty for CLEARED


@dataclass(frozen=True)
class KVEventBatch:
    """Answer to `events_since`: either the events after the asked seq, or a snapshot to resync from."""

    incarnation: str  # changes when the pool is rebuilt; a consumer seeing a new one must resync
    latest_seq: int  # seq of the newest event in the pool (0 before any)
    events: tuple[KVEvent, ...]  # consecutive, oldest first; empty when `snapshot` is set
    snapshot: frozenset[BlockHash] | None  # every cached hash as of latest_seq; None when events suffice


class KVEventLog:
    """Bounded, sequence-numbered log of KV events of one pool."""

    def __init__(self, max_events: int = 10_000) -> None:
        self.incarnation = uuid.uuid4().hex
        self._events: deque[KVEvent] = deque(maxlen=max_events)
        self._seq = 0

    @property
    def latest_seq(self) -> int:
        return self._seq

    def record(self, kind: KVEventKind, block_hashes: Iterable[BlockHash] = ()) -> None:
        hashes = tuple(block_hashes)
        if not hashes and kind is not KVEventKind.CLEARED:
            return
        self._seq += 1
        self._events.append(KVEvent(self._seq, kind, hashes))

    def since(
        self, seq: int, snapshot: Callable[[], frozenset[BlockHash]], incarnation: str | None = None
    ) -> KVEventBatch:
        """Events with seq > `seq`; a snapshot instead when they are no longer all buffered or the incarnation
        differs (pass the incarnation the consumer last saw, None on first contact)."""
        oldest = self._events[0].seq if self._events else self._seq + 1
        is_stale = incarnation != self.incarnation or seq > self._seq or seq + 1 < oldest
        if is_stale:
            return KVEventBatch(self.incarnation, self._seq, (), snapshot())
        events = tuple(itertools.islice(self._events, seq + 1 - oldest, None))  # seqs are consecutive
        return KVEventBatch(self.incarnation, self._seq, events, None)
