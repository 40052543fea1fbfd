"""The decode side of a handoff: open reservations, their leases, and the write fence over their blocks.

A reservation's blocks past its cached prefix are written from outside (a KV transport), so freeing them is only
safe once no writer can touch them again. Three rules make that so (DESIGN.md §4):
- a writer may write only blocks whose permit names its epoch, before the permit's deadline (`KVCache.open_writes`);
  every transport checks before each layer, so revoking the permits stops any later layer;
- revocation with a writer maybe still mid-layer (abort of a reservation in flight, lease expiry) parks the blocks in
  quarantine until no write that began before it can still land — past the permit's deadline plus a grace period;
- leases are durations judged on this process's monotonic clock, renewed while the work is alive.
Epochs are random 62-bit numbers: a stale or forged one never names a live reservation.
"""

from __future__ import annotations

import heapq
import itertools
import secrets
from dataclasses import dataclass, field

from pdserve.engine.sequence import Sequence
from pdserve.kvcache import KVCache


@dataclass
class OpenReservation:
    seq: Sequence
    epoch: int
    expires_at: float  # time.monotonic(): commit, renew or abort must come before it
    written_block_ids: list[int]  # the blocks past the cached prefix: what writers fill and the fence guards


@dataclass(order=True)
class _Quarantined:
    until: float
    order: int
    block_ids: list[int] = field(compare=False)  # the references it holds, dropped at `until`
    num_fenced_blocks: int = field(compare=False)  # its blocks a writer may still hit (the rest are shared, cached)


class Reservations:
    def __init__(self, kv: KVCache, block_size: int, grace_s: float) -> None:
        self.kv = kv
        self.block_size = block_size
        self.grace_s = grace_s
        self.open: dict[str, OpenReservation] = {}
        self._quarantine: list[_Quarantined] = []  # a heap by release time
        self._order = itertools.count()

    def grant(self, seq: Sequence, lease_s: float, now: float) -> OpenReservation:
        """Open a reservation over `seq`'s blocks: writers of its (fresh) epoch may write the uncached ones."""
        epoch = secrets.randbits(62) + 1
        written = seq.block_ids[seq.num_cached_tokens // self.block_size :]
        reservation = OpenReservation(seq, epoch, now + lease_s, written)
        self.open[seq.request_id] = reservation
        self.kv.open_writes(written, epoch, _ns(reservation.expires_at))
        return reservation

    def renew(self, request_id: str, lease_s: float, now: float) -> bool:
        """Push the lease (and the writers' deadline) to `lease_s` from now; False if it is not open."""
        reservation = self.open.get(request_id)
        if reservation is None:
            return False
        reservation.expires_at = max(reservation.expires_at, now + lease_s)
        self.kv.open_writes(reservation.written_block_ids, reservation.epoch, _ns(reservation.expires_at))
        return True

    def revoke(self, request_id: str) -> OpenReservation | None:
        """Close the reservation and its write permits (commit, abort, expiry); None if it was not open."""
        reservation = self.open.pop(request_id, None)
        if reservation is not None:
            self.kv.close_writes(reservation.written_block_ids)
        return reservation

    def is_complete(self, reservation: OpenReservation) -> bool:
        """Every block a writer had to fill carries the reservation's epoch (its KV fully arrived)."""
        ids = reservation.written_block_ids
        return not ids or bool((self.kv.block_epochs[ids] == reservation.epoch).all())

    def expired(self, now: float) -> list[str]:
        return [r for r, reservation in self.open.items() if reservation.expires_at <= now]

    def quarantine(self, reservation: OpenReservation, until: float) -> None:
        """Keep the reservation's blocks (its sequence's references) out of use until `until` (monotonic) plus the
        grace; `release_due` hands the references back."""
        entry = _Quarantined(
            until + self.grace_s,
            next(self._order),
            list(reservation.seq.block_ids),
            len(reservation.written_block_ids),
        )
        heapq.heappush(self._quarantine, entry)

    def pin(self, block_ids: list[int], until: float) -> None:
        """Hold references the caller took on `block_ids` until `until` plus the grace: blocks a committed request
        uses, that an abandoned writer (a timed-out prefill attempt) may still hit, must not go to another request
        before then — even if this one ends sooner."""
        heapq.heappush(
            self._quarantine, _Quarantined(until + self.grace_s, next(self._order), block_ids, len(block_ids))
        )

    def release_due(self, now: float) -> list[list[int]]:
        """The references whose time is up, for the caller to drop."""
        due = []
        while self._quarantine and self._quarantine[0].until <= now:
            due.append(heapq.heappop(self._quarantine).block_ids)
        return due

    @property
    def num_reserved_blocks(self) -> int:
        return sum(len(r.written_block_ids) for r in self.open.values())

    @property
    def num_fenced_blocks(self) -> int:
        return sum(q.num_fenced_blocks for q in self._quarantine)


def _ns(monotonic_s: float) -> int:
    return int(monotonic_s * 1e9)
