"""The prefix index: which replica caches which block hash, fed by the replicas' KV events.

Each replica owns one bit; `_holders[hash]` is the bitmask of replicas holding that block, so matching a prompt's
chain against every replica at once is one dict lookup and one AND per block. A replica's bit for a hash is set
while the hash is confirmed (stored by an event, not removed since) or optimistic (the router just sent a request
there whose blocks will be stored; the bit is cleared after `optimistic_ttl_s` unless an event confirmed it).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from pdserve.kvcache import BlockHash, KVEventBatch, KVEventKind


@dataclass
class _Replica:
    slot: int  # bit position in the holder masks
    incarnation: str | None = None  # the event log we follow; None until the first snapshot
    seq: int = 0  # last event applied
    hashes: set[BlockHash] = field(default_factory=set)  # confirmed by events
    synced_at: float = 0.0  # clock time of the last batch applied


@dataclass(frozen=True)
class SyncCursor:
    """What to ask a replica for next: events after `seq` of `incarnation` (None: send a snapshot)."""

    incarnation: str | None
    seq: int


class PrefixIndex:
    def __init__(self, optimistic_ttl_s: float = 2.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.optimistic_ttl_s = optimistic_ttl_s
        self.clock = clock
        self._replicas: dict[str, _Replica] = {}
        self._slot_owner: list[str | None] = []  # slot -> replica id
        self._holders: dict[BlockHash, int] = {}
        self._expiries: deque[tuple[float, str, tuple[BlockHash, ...]]] = deque()  # optimistic, oldest first
        self.num_resyncs = 0

    @property
    def replica_ids(self) -> list[str]:
        return list(self._replicas)

    def num_blocks(self, replica_id: str) -> int:
        """Confirmed blocks the replica caches (optimistic ones excluded)."""
        return len(self._replicas[replica_id].hashes)

    def cursor(self, replica_id: str) -> SyncCursor:
        r = self._replicas.get(replica_id)
        return SyncCursor(None, 0) if r is None else SyncCursor(r.incarnation, r.seq)

    def staleness_s(self, replica_id: str) -> float:
        """Seconds since the replica's last batch was applied."""
        return self.clock() - self._replicas[replica_id].synced_at

    def apply(self, replica_id: str, batch: KVEventBatch) -> bool:
        """Apply a replica's answer to `cursor(replica_id)`. Returns False when it does not follow on from what we
        hold (a gap, a seq regression, another incarnation without a snapshot): the replica's entries are then
        dropped and its next cursor asks for a snapshot, so the index never keeps ghost blocks."""
        r = self._replicas.get(replica_id) or self._add(replica_id)
        if batch.snapshot is not None and batch.incarnation == r.incarnation and batch.latest_seq < r.seq:
            return False  # an older snapshot than what we hold (a duplicate, reordered): it would bring back ghosts
        if batch.snapshot is not None:
            self._reset(r, replica_id, batch.snapshot)
        elif not self._follows(r, batch):
            self._reset(r, replica_id, ())
            r.incarnation, r.seq = None, 0
            self.num_resyncs += 1
            return False
        for event in batch.events:
            self._apply_event(r, replica_id, event.kind, event.block_hashes)
        r.incarnation, r.seq, r.synced_at = batch.incarnation, batch.latest_seq, self.clock()
        return True

    def remove_replica(self, replica_id: str) -> None:
        """Forget a replica that left: its bit is cleared everywhere and its slot reused."""
        r = self._replicas.pop(replica_id, None)
        if r is None:
            return
        for h in r.hashes | self._optimistic_hashes(replica_id):
            self._clear_bit(h, r.slot)
        self._slot_owner[r.slot] = None

    def record_optimistic(self, replica_id: str, block_hashes: Sequence[BlockHash]) -> None:
        """The router just sent these blocks' prompt to the replica: count them as held until the events arrive
        (or `optimistic_ttl_s` passes), so a burst of equal prompts does not scatter. Pass only the blocks the
        replica does not hold yet (the tail past its matched prefix)."""
        r = self._replicas.get(replica_id)
        if r is None or not block_hashes:
            return
        bit = 1 << r.slot
        holders = self._holders
        holders.update({h: holders.get(h, 0) | bit for h in block_hashes})
        self._expiries.append((self.clock() + self.optimistic_ttl_s, replica_id, tuple(block_hashes)))

    def match(self, block_hashes: Sequence[BlockHash]) -> dict[str, int]:
        """Number of leading blocks of the chain each replica holds (every known replica, 0 included)."""
        self._expire_optimistic()
        alive = sum(1 << r.slot for r in self._replicas.values())
        matched: dict[str, int] = {}
        holders = self._holders
        for i, h in enumerate(block_hashes):
            now = alive & holders.get(h, 0)
            if now != alive:
                self._record_bits(alive & ~now, i, matched)
                if not now:
                    break
            alive = now
        else:
            self._record_bits(alive, len(block_hashes), matched)
        return matched

    def _record_bits(self, mask: int, num_blocks: int, out: dict[str, int]) -> None:
        while mask:
            low = mask & -mask
            owner = self._slot_owner[low.bit_length() - 1]
            assert owner is not None
            out[owner] = num_blocks
            mask ^= low

    def _follows(self, r: _Replica, batch: KVEventBatch) -> bool:
        if batch.incarnation != r.incarnation or batch.latest_seq < r.seq:
            return False
        expected = r.seq + 1
        for event in batch.events:
            if event.seq != expected:
                return False
            expected += 1
        return expected - 1 == batch.latest_seq

    def _apply_event(self, r: _Replica, replica_id: str, kind: KVEventKind, block_hashes: Sequence[BlockHash]) -> None:
        if kind is KVEventKind.CLEARED:
            self._reset(r, replica_id, ())
        elif kind is KVEventKind.STORED:
            bit = 1 << r.slot
            for h in block_hashes:
                r.hashes.add(h)
                self._holders[h] = self._holders.get(h, 0) | bit
        else:
            for h in block_hashes:
                r.hashes.discard(h)
                self._clear_bit(h, r.slot)  # also an optimistic entry: an eviction beats an expectation

    def _reset(self, r: _Replica, replica_id: str, hashes: Iterable[BlockHash]) -> None:
        """Replace everything the replica holds (confirmed and optimistic) by `hashes`."""
        for h in r.hashes | self._optimistic_hashes(replica_id):
            self._clear_bit(h, r.slot)
        r.hashes = set()
        self._apply_event(r, replica_id, KVEventKind.STORED, tuple(hashes))

    def _clear_bit(self, h: BlockHash, slot: int) -> None:
        mask = self._holders.get(h, 0) & ~(1 << slot)
        if mask:
            self._holders[h] = mask
        else:
            self._holders.pop(h, None)

    def _expire_optimistic(self) -> None:
        """Clear the bits of optimistic entries past their TTL that no event confirmed. (A hash recorded twice
        for one replica loses its bit at the first expiry: rare — the tail recorded is past the matched prefix
        — and harmless: affinity is only shortened.)"""
        now = self.clock()
        while self._expiries and self._expiries[0][0] <= now:
            _, replica_id, block_hashes = self._expiries.popleft()
            r = self._replicas.get(replica_id)
            if r is None:
                continue
            for h in block_hashes:
                if h not in r.hashes:
                    self._clear_bit(h, r.slot)

    def _optimistic_hashes(self, replica_id: str) -> set[BlockHash]:
        return {h for _, rid, hashes in self._expiries if rid == replica_id for h in hashes}

    def _add(self, replica_id: str) -> _Replica:
        slot = next((i for i, owner in enumerate(self._slot_owner) if owner is None), len(self._slot_owner))
        if slot == len(self._slot_owner):
            self._slot_owner.append(replica_id)
        else:
            self._slot_owner[slot] = replica_id
        r = _Replica(slot)
        self._replicas[replica_id] = r
        return r
