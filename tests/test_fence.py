"""The write fence: a KV writer whose reservation is not (any more) open to its epoch writes nothing — never granted,
revoked mid-transfer, expired, or granted to a newer reservation — over every host transport (shm, tcp, gloo P2P),
with real receivers; and the decode engine's side of it: reserve grants, commit/abort/reap revoke, quarantined
blocks come back only once no late write can land."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from kv_peer import grant, kv_peer, open_peer, push_in_thread
from oracle import greedy
from pdserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from pdserve.engine import EngineRequest, LLMEngine, RequestOutput
from pdserve.kvcache import KVCache, KVLayout
from pdserve.transfer import (
    FencedError,
    KVEndpoint,
    KVReceiver,
    KVSender,
    LayerProgress,
    P2PReceiver,
    P2PSender,
    SharedMemoryReceiver,
    SharedMemorySender,
    TcpReceiver,
    TcpSender,
    TransferError,
    TransferSpec,
)
from pdserve.transfer.gloo import GlooBackend
from test_p2p import assert_moved, wait_until

LAYOUT = KVLayout(num_layers=3, num_blocks=16, block_size=4, num_kv_heads=2, head_dim=8, dtype=torch.float32)
TRANSPORTS = ("shm", "tcp", "gloo")
FAR_S = 60.0


def shm_path() -> str:
    return f"/dev/shm/pdserve-test-{uuid.uuid4().hex}"


def random_cache(seed: int, layout: KVLayout = LAYOUT) -> KVCache:
    kv = KVCache(layout)
    kv.flat.copy_(torch.randn(kv.flat.shape, generator=torch.Generator().manual_seed(seed)).to(layout.dtype))
    return kv


@dataclass(frozen=True)
class Snapshot:
    k: list[torch.Tensor]
    v: list[torch.Tensor]
    epochs: torch.Tensor


def snapshot(kv: KVCache) -> Snapshot:
    return Snapshot([t.clone() for t in kv.k], [t.clone() for t in kv.v], kv.block_epochs.clone())


def assert_unchanged(kv: KVCache, before: Snapshot) -> None:
    """Not one byte of any layer, K or V, and no arrival stamp changed."""
    for layer in range(kv.layout.num_layers):
        assert torch.equal(kv.k[layer], before.k[layer]) and torch.equal(kv.v[layer], before.v[layer])
    assert torch.equal(kv.block_epochs, before.epochs)


# ---- the transports -------------------------------------------------------------------------------------------


@dataclass
class Rig:
    """A destination cache (in shared memory, as a decode replica's), a real receiver serving it over one transport,
    and a sender of that transport; `new_sender` makes another (a second prefill replica, or a stale one)."""

    name: str
    kv: KVCache
    receiver: KVReceiver
    new_sender: Callable[[], KVSender]
    senders: list[KVSender] = field(default_factory=list)  # every sender made, closed at the end
    _main: KVSender | None = None

    @property
    def endpoint(self) -> KVEndpoint:
        return self.receiver.endpoint

    def sender(self) -> KVSender:
        """The test's usual sender (one per rig)."""
        if self._main is None:
            self._main = self.another_sender()
        return self._main

    def another_sender(self) -> KVSender:
        sender = self.new_sender()
        self.senders.append(sender)
        return sender

    def num_fenced(self) -> int | None:
        """Transfers the receiver refused at the fence (None for shm: the sender itself checks, in its process)."""
        if isinstance(self.receiver, TcpReceiver):
            return self.receiver.num_fenced
        if isinstance(self.receiver, P2PReceiver):
            return self.receiver.counters.fenced
        return None


@pytest.fixture(params=TRANSPORTS)
def rig(request: pytest.FixtureRequest) -> Iterator[Rig]:
    kv = KVCache(LAYOUT, shared_path=shm_path())
    receiver: KVReceiver
    if request.param == "shm":
        receiver = SharedMemoryReceiver(kv, "node-a", "m")
        made = Rig("shm", kv, receiver, lambda: SharedMemorySender("m"))
    elif request.param == "tcp":
        receiver = TcpReceiver(kv, node_id="node-a", model_id="m")
        made = Rig("tcp", kv, receiver, lambda: TcpSender("m"))
    else:
        receiver = P2PReceiver(kv, GlooBackend(), node_id="node-a", model_id="m")
        made = Rig("gloo", kv, receiver, lambda: P2PSender("m", GlooBackend()))
    yield made
    for sender in made.senders:
        sender.close()
    receiver.close()


def assert_refused(rig: Rig, sender: KVSender, spec: TransferSpec, src: KVCache) -> None:
    """The send fails, the destination is untouched, and the receiver counted one refusal at its fence."""
    before, fenced = snapshot(rig.kv), rig.num_fenced()
    with pytest.raises(TransferError) as info:
        sender.send(rig.endpoint, spec, src, timeout_s=10)
    if rig.name == "shm":
        assert isinstance(info.value, FencedError)  # the sender is the writer: it checks the permits itself
    elif rig.name == "gloo":
        assert "no longer open to it" in str(info.value)  # refused before any receive was posted, with the reason
    assert_unchanged(rig.kv, before)
    if fenced is not None:
        wait_until(lambda: rig.num_fenced() == fenced + 1)


def assert_still_serves(rig: Rig, sender: KVSender, spec: TransferSpec, src: KVCache) -> None:
    """A granted transfer after the refusal arrives exactly, and is not counted as fenced."""
    fenced = rig.num_fenced()
    sender.send(rig.endpoint, grant(rig.kv, spec), src, timeout_s=10)
    assert_moved(src, rig.kv, spec)
    assert rig.num_fenced() == fenced


def test_a_never_granted_epoch_writes_nothing_and_the_receiver_keeps_serving(rig: Rig) -> None:
    src, sender = random_cache(1), rig.sender()
    assert_refused(rig, sender, TransferSpec(5, [1, 2, 3], [4, 5, 6], "never"), src)
    assert_still_serves(rig, sender, TransferSpec(6, [1, 2, 3], [4, 5, 6], "granted"), src)
    if isinstance(sender, P2PSender):  # refused before any receive was posted: the pair stayed usable
        assert sender.counters.built == 1 and sender.counters.aborted == 0
        assert isinstance(rig.receiver, P2PReceiver) and rig.receiver.counters.aborted == 0


def test_an_expired_permit_writes_nothing(rig: Rig) -> None:
    src, sender = random_cache(2), rig.sender()
    spec = TransferSpec(7, [0, 1], [8, 9], "expired")
    rig.kv.open_writes([8, 9], spec.epoch, time.monotonic_ns() - 1)  # the lease ended a moment ago
    assert_refused(rig, sender, spec, src)
    assert_still_serves(rig, sender, TransferSpec(8, [0, 1], [8, 9], "renewed"), src)


def test_a_stale_writer_with_an_older_epoch_writes_nothing(rig: Rig) -> None:
    """Blocks 2-4 were freed and reserved again by a newer reservation: the writer of the old one (epoch 10) must not
    touch them — neither before the live writer (epoch 11) delivered, nor after, over its complete KV."""
    stale_src, live_src = random_cache(3), random_cache(4)
    stale = TransferSpec(10, [5, 6, 7], [2, 3, 4], "old")
    rig.kv.open_writes([2, 3, 4], 11, time.monotonic_ns() + int(FAR_S * 1e9))  # the live reservation's permits
    stale_sender = rig.another_sender()
    assert_refused(rig, stale_sender, stale, stale_src)
    live = TransferSpec(11, [0, 1, 2], [2, 3, 4], "live")
    assert_still_serves(rig, rig.sender(), live, live_src)
    assert_refused(rig, stale_sender, stale, stale_src)
    assert_moved(live_src, rig.kv, live)  # the live KV and its stamps are intact


def test_a_partly_granted_transfer_writes_nothing(rig: Rig) -> None:
    """One destination block is not open to the epoch (another reservation holds it): none is written."""
    src = random_cache(5)
    spec = TransferSpec(20, [0, 1, 2], [10, 11, 12], "partly")
    grant(rig.kv, TransferSpec(20, [0, 1], [10, 11], "partly"))
    grant(rig.kv, TransferSpec(21, [0], [12], "other"))
    assert_refused(rig, rig.sender(), spec, src)


def _close(kv: KVCache, ids: list[int], epoch: int) -> None:
    kv.close_writes(ids)


def _expire(kv: KVCache, ids: list[int], epoch: int) -> None:
    kv.open_writes(ids, epoch, time.monotonic_ns() - 1)


def _reuse(kv: KVCache, ids: list[int], epoch: int) -> None:
    kv.close_writes(ids)
    kv.open_writes(ids, epoch + 1, time.monotonic_ns() + int(FAR_S * 1e9))  # freed, then reserved by another


REVOCATIONS = {"close_writes": _close, "lease expired": _expire, "blocks reserved again": _reuse}


@pytest.mark.parametrize("revocation", REVOCATIONS)
def test_a_permit_revoked_mid_transfer_stops_the_later_layers(rig: Rig, revocation: str) -> None:
    """A layer-pipelined send: layer 0 goes through, then the destination's permits are revoked, then the other
    layers are computed. They are never written, the epoch is never stamped, and the sender fails."""
    src, sender = random_cache(6), rig.sender()
    spec = grant(rig.kv, TransferSpec(30, [3, 4], [13, 14], "revoked"))
    before = snapshot(rig.kv)
    progress = LayerProgress()
    fenced = rig.num_fenced()
    errors, done = push_in_thread(sender, rig.endpoint, spec, src, progress)
    progress.layer_done(0, [3, 4])
    d, s = [13, 14], [3, 4]
    wait_until(lambda: torch.equal(rig.kv.k[0][d], src.k[0][s]) and torch.equal(rig.kv.v[0][d], src.v[0][s]))
    assert not done.is_set()  # waiting for layer 1
    REVOCATIONS[revocation](rig.kv, d, spec.epoch)
    for layer in range(1, LAYOUT.num_layers):
        progress.layer_done(layer, s)
    assert done.wait(timeout=15) and len(errors) == 1
    if rig.name == "shm":
        assert isinstance(errors[0], FencedError)
    for layer in range(1, LAYOUT.num_layers):  # nothing after the revocation, in any block
        assert torch.equal(rig.kv.k[layer], before.k[layer]) and torch.equal(rig.kv.v[layer], before.v[layer])
    assert torch.equal(rig.kv.block_epochs, before.epochs)  # never stamped: the decode side cannot commit it
    if fenced is not None:
        wait_until(lambda: rig.num_fenced() == fenced + 1)
    # The receiver keeps serving: the next (granted) transfer into other blocks arrives exactly.
    assert_still_serves(rig, sender, TransferSpec(31, [3, 4], [0, 1], "next"), src)


@pytest.mark.parametrize("revoked", [False, True])
def test_a_stream_ordered_receiver_writes_nothing_before_the_last_layer_landed(
    monkeypatch: pytest.MonkeyPatch, revoked: bool
) -> None:
    """On a CUDA stream (NCCL) a scatter queued as its layer landed ran behind every receive posted after it, and,
    were those cut by an abort, ran then, long after its fence check, into blocks maybe reused (found in review).
    There nothing is written until every layer landed. Run here over gloo told it is stream-ordered (the branch NCCL
    takes): layer 0 landed writes nothing; a revocation then leaves every layer untouched; else all arrive."""
    from pdserve.transfer.gloo import _GlooCommunicator

    monkeypatch.setattr(_GlooCommunicator, "is_stream_ordered", property(lambda self: True))
    kv = KVCache(LAYOUT, shared_path=shm_path())
    receiver = P2PReceiver(kv, GlooBackend(), node_id="node-a", model_id="m")
    sender = P2PSender("m", GlooBackend())
    try:
        src = random_cache(8)
        spec = grant(kv, TransferSpec(50, [3, 4], [13, 14], "ordered"))
        before, progress = snapshot(kv), LayerProgress()
        errors, done = push_in_thread(sender, receiver.endpoint, spec, src, progress)
        progress.layer_done(0, [3, 4])
        time.sleep(1.0)  # layer 0 has landed by now (the CPU path writes it at once: the test above)
        assert not done.is_set()
        assert_unchanged(kv, before)
        if revoked:
            _reuse(kv, [13, 14], spec.epoch)
        for layer in range(1, LAYOUT.num_layers):
            progress.layer_done(layer, [3, 4])
        assert done.wait(timeout=15) and len(errors) == int(revoked)
        if revoked:
            assert_unchanged(kv, before)  # no layer written, nothing stamped
        else:
            assert_moved(src, kv, spec)
    finally:
        sender.close()
        receiver.close()


@pytest.mark.parametrize("sender_cls", [SharedMemorySender, TcpSender])
def test_permits_granted_in_one_process_bind_writers_in_others(sender_cls: type[KVSender]) -> None:
    """The decode cache's owner and receiver live in another process; this process grants and revokes through its
    own mapping of that shared memory, and the writers (this process's shm sender, the peer's TCP receiver) obey."""
    src = random_cache(7)
    with kv_peer(LAYOUT, shm_path()) as endpoint:
        dst = open_peer(endpoint)
        sender = sender_cls("m")  # type: ignore[call-arg]
        spec = TransferSpec(40, [0, 1], [6, 7], "peer")
        before = snapshot(dst)
        with pytest.raises(TransferError):
            sender.send(endpoint, spec, src, timeout_s=10)
        assert_unchanged(dst, before)
        sender.send(endpoint, grant(dst, spec), src, timeout_s=10)
        assert_moved(src, dst, spec)
        dst.close_writes([6, 7])  # committed: a duplicate from another source must not land
        before = snapshot(dst)
        with pytest.raises(TransferError):
            sender.send(endpoint, spec, random_cache(8), timeout_s=10)
        assert_unchanged(dst, before)
        sender.close()


def test_permits_moved_to_shared_host_memory_bind_a_writer_that_maps_them() -> None:
    """A cache outside shared memory (a GPU's, served over CUDA IPC) moves its permits into a shared host file at
    once, keeping those already granted; a writer's own mapping of that file (in the CUDA IPC sender's process) sees
    every later grant and revocation of the owner."""
    owner = KVCache(LAYOUT)
    owner.open_writes([1, 2], 5, time.monotonic_ns() + int(FAR_S * 1e9))
    address = owner.share_permits()
    assert owner.share_permits() == address  # once
    writer = KVCache.from_tensors(LAYOUT, owner.flat, owner.block_epochs, KVCache.open_permits(address, 16))
    assert is_writable(writer, [1, 2], 5) and not is_writable(writer, [1, 2], 6)
    owner.open_writes([3], 6, time.monotonic_ns() + int(FAR_S * 1e9))
    assert is_writable(writer, [3], 6) and not is_writable(writer, [2, 3], 6)
    owner.close_writes([1, 2])
    assert not is_writable(writer, [1], 5) and is_writable(writer, [3], 6)
    owner.open_writes([3], 6, time.monotonic_ns() - 1)  # expired
    assert not is_writable(writer, [3], 6)
    with pytest.raises(ValueError, match="another number of blocks"):
        KVCache.open_permits(address, 17)
    owner.close()
    with pytest.raises(OSError):
        KVCache.open_permits(address, 16)  # closed: no new writer maps it


# ---- the decode engine ----------------------------------------------------------------------------------------

BLOCK = 16
GRACE_S = 0.05


def make_engine(path: Path, **cache: float) -> LLMEngine:
    return LLMEngine(
        EngineConfig(
            ModelConfig(str(path), dtype="float32"),
            CacheConfig(block_size=BLOCK, num_blocks=64, fence_grace_s=GRACE_S, **cache),  # type: ignore[arg-type]
            SchedulerConfig(max_num_batched_tokens=512, max_num_seqs=8),
        )
    )


@pytest.fixture(scope="module")
def model_dir(tiny_models: dict[str, Path]) -> Path:
    return tiny_models["llama"]


def prompt(n: int, seed: int = 0) -> tuple[int, ...]:
    return tuple(torch.randint(1, 200, (n,), generator=torch.Generator().manual_seed(seed)).tolist())


def request(request_id: str, n: int = 40, seed: int = 0, max_tokens: int = 8) -> EngineRequest:
    return EngineRequest(request_id, prompt(n, seed), greedy(max_tokens))


def written(reservation: object) -> list[int]:
    """The blocks a writer must fill: those past the cached prefix."""
    return list(reservation.block_ids[reservation.num_cached_tokens // BLOCK :])  # type: ignore[attr-defined]


def is_writable(kv: KVCache, ids: list[int], epoch: int) -> bool:
    until = kv.writable_until_ns(ids, epoch)
    return until is not None and time.monotonic_ns() < until


def reap_until(engine: LLMEngine, condition: Callable[[], bool], timeout_s: float = 5.0) -> float:
    """Call `reap()` every few ms until `condition()`; the `time.monotonic()` just after the reap that made it."""
    end = time.monotonic() + timeout_s
    while True:
        engine.reap()
        at = time.monotonic()
        if condition():
            return at
        assert at < end, "the reaper never got there"
        time.sleep(0.005)


def run_until_held(engine: LLMEngine, request_id: str) -> tuple[RequestOutput, float]:
    """Step until the prefill-only request holds its result; (that output, the monotonic time before its step)."""
    while True:
        before = time.monotonic()
        for out in engine.step():
            if out.request_id == request_id and out.kv_block_ids is not None:
                return out, before


def test_reserve_grants_only_the_uncached_blocks_to_its_epoch(model_dir: Path) -> None:
    engine = make_engine(model_dir)
    assert engine.kv.has_fence
    # Put the first two blocks of the prompt in the prefix cache.
    engine.add_request(EngineRequest("warm", prompt(40)[:33], greedy(1)))
    while engine.has_unfinished():
        engine.step()
    start = time.monotonic_ns()
    reservation = engine.reserve(request("r"), lease_s=30)
    assert reservation is not None and reservation.num_cached_tokens == 2 * BLOCK
    cached, fresh = list(reservation.block_ids[:2]), written(reservation)
    assert len(fresh) == 1  # 40 tokens: 3 blocks, 2 cached
    until = engine.kv.writable_until_ns(fresh, reservation.epoch)
    assert until is not None and start + 29e9 < until < time.monotonic_ns() + 31e9  # the lease, on the monotonic clock
    assert engine.kv.writable_until_ns(cached, reservation.epoch) is None  # shared KV: no writer may touch it
    assert engine.kv.writable_until_ns(fresh, reservation.epoch + 1) is None  # another epoch is refused
    other = engine.reserve(request("r2", seed=9), lease_s=30)
    assert other is not None and other.epoch != reservation.epoch
    assert engine.kv.writable_until_ns(written(other), reservation.epoch) is None
    assert is_writable(engine.kv, written(other), other.epoch)


def test_abort_revokes_and_frees_at_once(model_dir: Path) -> None:
    engine = make_engine(model_dir)
    rx = TcpReceiver(engine.kv, node_id="d", model_id="m")
    try:
        reservation = engine.reserve(request("r"), lease_s=30)
        assert reservation is not None
        ids = written(reservation)
        assert is_writable(engine.kv, ids, reservation.epoch) and engine.stats().num_used_blocks == len(ids)
        assert engine.abort("r")
        assert engine.kv.writable_until_ns(ids, reservation.epoch) is None
        stats = engine.stats()
        assert stats.num_used_blocks == 0 and stats.num_fenced_blocks == 0 and stats.num_reserved_blocks == 0
        # A writer that did not hear of the abort is refused by the receiver, and writes nothing.
        before = snapshot(engine.kv)
        spec = TransferSpec(reservation.epoch, list(range(len(ids))), ids, "r")
        sender = TcpSender("m")
        with pytest.raises(TransferError):
            sender.send(rx.endpoint, spec, random_cache(1, engine.layout), timeout_s=10)
        sender.close()
        assert_unchanged(engine.kv, before)
        assert rx.num_fenced == 1
    finally:
        rx.close()


def test_abort_of_a_reservation_maybe_written_fences_its_blocks_until_lease_and_grace(model_dir: Path) -> None:
    engine = make_engine(model_dir)
    lease_s = 0.2
    start = time.monotonic()
    reservation = engine.reserve(request("r"), lease_s=lease_s)
    reserved = time.monotonic()
    assert reservation is not None
    ids, num_blocks = written(reservation), len(reservation.block_ids)
    assert engine.abort("r", may_be_written=True)
    assert not is_writable(engine.kv, ids, reservation.epoch)  # revoked at once
    stats = engine.stats()
    assert stats.num_fenced_blocks == num_blocks > 0 and stats.num_used_blocks == num_blocks
    assert stats.num_fenced_aborts == 1 and stats.num_reserved_blocks == 0
    assert not engine.abort("r")  # gone from the engine already
    freed = reap_until(engine, lambda: engine.stats().num_fenced_blocks == 0)
    # Never before a write that began before the deadline could have landed; soon after.
    assert start + lease_s + GRACE_S <= freed < reserved + lease_s + GRACE_S + 2.0
    assert engine.stats().num_used_blocks == 0
    assert engine.reserve(request("again"), lease_s=30) is not None  # the blocks are usable again


@pytest.mark.parametrize("is_writer_stopped", [False, True])
def test_a_commit_with_an_abandoned_writer_keeps_its_blocks_from_others_until_no_write_can_land(
    model_dir: Path, is_writer_stopped: bool
) -> None:
    """A prefill attempt abandoned for a retry writes the same KV under the same epoch and may still land a layer
    after the retry's commit. The request runs and ends as usual, but its written blocks go to no other request
    before the writer's permits could have run out — the lease at commit (or only the grace, when the writer is
    known to have stopped) plus the grace — and are free right after: no block lost."""
    engine = make_engine(model_dir)
    lease_s = 0.3
    reserving = time.monotonic()  # the lease runs from the reservation (not from the commit)
    reservation = engine.reserve(request("r", max_tokens=2), lease_s=lease_s)
    assert reservation is not None
    ids = written(reservation)
    engine.kv.block_epochs[ids] = reservation.epoch  # the retry's KV arrived (its content is not the point here)
    committed = time.monotonic()
    assert engine.commit("r", 7, may_be_written=True, is_writer_stopped=is_writer_stopped) is None
    while engine.has_unfinished():
        engine.step()
    stats = engine.stats()
    assert stats.num_fenced_blocks == len(ids) > 0 and stats.num_used_blocks == len(ids)
    taken: set[int] = set()
    for i in range(30):  # other requests take every free block meanwhile: none of the pinned ones
        other = engine.reserve(request(f"o{i}", n=8, seed=100 + i), lease_s=30)
        if other is None:
            break
        taken.update(other.block_ids)
    assert not taken & set(ids)
    for i in range(30):
        engine.abort(f"o{i}")
    freed = reap_until(engine, lambda: engine.stats().num_fenced_blocks == 0)
    # Not before the writer's deadline plus the grace (the lease's end when the writer's state is unknown, else the
    # commit); soon after.
    assert freed >= (committed if is_writer_stopped else reserving + lease_s) + GRACE_S
    assert freed < committed + lease_s + GRACE_S + 2.0
    assert engine.stats().num_used_blocks == 0


def test_the_reaper_revokes_an_uncommitted_reservation_then_frees_it_after_the_grace(model_dir: Path) -> None:
    engine = make_engine(model_dir)
    lease_s = 0.2
    start = time.monotonic()
    reservation = engine.reserve(request("r"), lease_s=lease_s)
    assert reservation is not None
    ids, num_blocks = written(reservation), len(reservation.block_ids)
    engine.reap()  # within the lease: nothing happens
    if time.monotonic() < start + lease_s:
        assert engine.stats().num_reaped_leases == 0 and is_writable(engine.kv, ids, reservation.epoch)
    time.sleep(max(0.0, start + lease_s - time.monotonic()) + 0.01)
    # Past the lease a writer is refused by its permit's deadline even before the reaper runs.
    assert not is_writable(engine.kv, ids, reservation.epoch)
    before_reap = time.monotonic()
    reaped = reap_until(engine, lambda: engine.stats().num_reaped_leases == 1)
    assert reaped >= start + lease_s
    assert engine.kv.writable_until_ns(ids, reservation.epoch) is None  # revoked, not just expired
    with pytest.raises(ValueError, match="no open reservation"):
        engine.commit("r", 1)
    stats = engine.stats()
    if stats.num_fenced_blocks:  # quarantined for the grace (unless this reap already ran past it)
        assert stats.num_fenced_blocks == num_blocks and stats.num_used_blocks == num_blocks
    freed = reap_until(engine, lambda: engine.stats().num_fenced_blocks == 0)
    assert freed >= before_reap + GRACE_S
    assert engine.stats().num_used_blocks == 0 and engine.stats().num_reaped_leases == 1


def test_the_reaper_releases_a_prefill_result_nobody_released(model_dir: Path) -> None:
    ttl_s = 0.2
    engine = make_engine(model_dir, held_ttl_s=ttl_s)
    engine.add_request(request("p"), prefill_only=True)
    out, before_step = run_until_held(engine, "p")
    assert out.kv_block_ids is not None
    stats = engine.stats()
    assert stats.num_held == 1 and stats.num_used_blocks == len(out.kv_block_ids)
    released = reap_until(engine, lambda: engine.stats().num_reaped_held == 1)
    assert released >= before_step + ttl_s
    stats = engine.stats()
    assert stats.num_held == 0 and stats.num_used_blocks == 0
    with pytest.raises(ValueError, match="holds no prefill result"):
        engine.release("p")


def test_renew_pushes_the_lease_and_the_writers_deadline(model_dir: Path) -> None:
    engine = make_engine(model_dir)
    reservation = engine.reserve(request("r"), lease_s=0.2)
    assert reservation is not None
    ids = written(reservation)
    first = engine.kv.writable_until_ns(ids, reservation.epoch)
    assert first is not None
    assert engine.renew("r", 5.0)
    renewed = engine.kv.writable_until_ns(ids, reservation.epoch)
    assert renewed is not None and renewed > first + 4e9
    assert engine.renew("r", 0.01)  # never shortens it
    assert engine.kv.writable_until_ns(ids, reservation.epoch) == renewed
    assert not engine.renew("unknown", 5.0)
    time.sleep(0.2 + GRACE_S + 0.05)  # past the first lease and its grace
    engine.reap()
    assert engine.stats().num_reaped_leases == 0 and is_writable(engine.kv, ids, reservation.epoch)
    assert engine.stats().num_reserved_blocks == len(reservation.block_ids)


def test_a_real_transfer_into_a_reservation_decodes_exactly_and_commit_closes_it(model_dir: Path) -> None:
    """Prefill on P, push over TCP into D's reservation, commit, decode: the tokens of a colocated run. After the
    commit the permits are closed: a duplicate of the transfer is refused and writes nothing."""
    colocated = make_engine(model_dir)
    colocated.add_request(request("c", max_tokens=12))
    expected: list[int] = []
    while colocated.has_unfinished():
        for out in colocated.step():
            expected.extend(out.new_token_ids)
    prefill, decode = make_engine(model_dir), make_engine(model_dir)
    rx, sender = TcpReceiver(decode.kv, node_id="d", model_id="m"), TcpSender("m")
    try:
        reservation = decode.reserve(request("r", max_tokens=12), lease_s=30)
        assert reservation is not None and reservation.num_cached_tokens == 0
        prefill.add_request(request("r", max_tokens=12), prefill_only=True)
        first, _ = run_until_held(prefill, "r")
        assert first.kv_block_ids is not None
        spec = TransferSpec(reservation.epoch, list(first.kv_block_ids), list(reservation.block_ids), "r")
        sender.send(rx.endpoint, spec, prefill.kv, timeout_s=10)
        prefill.release("r")
        assert decode.commit("r", first.new_token_ids[0]) is None
        assert decode.kv.writable_until_ns(list(reservation.block_ids), reservation.epoch) is None
        tokens = list(first.new_token_ids)
        while decode.has_unfinished():
            for out in decode.step():
                tokens.extend(out.new_token_ids)
        assert tokens == expected
        before = snapshot(decode.kv)
        with pytest.raises(TransferError):
            sender.send(rx.endpoint, spec, random_cache(2, prefill.layout), timeout_s=10)
        assert_unchanged(decode.kv, before)
        # The receiver hangs up on a refused transfer without a reason; on this pooled connection the sender sees a
        # reset and retries once on a new one (tcp.py), which is refused again: one or two refusals, nothing written.
        assert rx.num_fenced in (1, 2)
    finally:
        sender.close()
        rx.close()


@pytest.mark.parametrize("num_prompt", [40, 48])  # a last block the prompt fills in part, and a full one
def test_a_late_layer_of_an_abandoned_attempt_leaves_the_committed_decode_exact(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch, num_prompt: int
) -> None:
    """Attempt A of a prefill (abandoned for a retry under the same epoch) passes its fence check for a layer, then
    stalls; the retry B completes, D commits and decodes; then A's layer lands. Writers copy whole blocks: in a last
    block the prompt fills in part, A's copy of the rows past the prompt (whatever P held there: another request's
    KV) overwrote the KV this request's decode had written there — wrong tokens with a 200 (found in review). The
    commit now computes that block's prompt tokens again into a fresh block, left to A: the tokens stay exact."""
    import pdserve.transfer.shm as shm_module

    colocated = make_engine(model_dir)
    colocated.add_request(request("c", n=num_prompt, max_tokens=12))
    expected: list[int] = []
    while colocated.has_unfinished():
        for out in colocated.step():
            expected.extend(out.new_token_ids)
    prefill = make_engine(model_dir)
    prefill.add_request(request("r", n=num_prompt, max_tokens=12), prefill_only=True)
    first, _ = run_until_held(prefill, "r")
    assert first.kv_block_ids is not None
    last, used = first.kv_block_ids[-1], num_prompt % BLOCK
    noise = torch.Generator().manual_seed(5)
    for layer in range(prefill.layout.num_layers if used else 0):  # an earlier request's KV past the prompt
        for cache in (prefill.kv.k[layer], prefill.kv.v[layer]):
            cache[last, used:] = torch.randn(cache[last, used:].shape, generator=noise) * 3
    decode = make_engine(model_dir, shared_path=shm_path())  # type: ignore[arg-type]
    rx = SharedMemoryReceiver(decode.kv, "d", "m")
    reservation = decode.reserve(request("r", n=num_prompt, max_tokens=12), lease_s=30)
    assert reservation is not None
    spec = TransferSpec(reservation.epoch, list(first.kv_block_ids), list(reservation.block_ids), "r")
    check = shm_module.fence_deadline
    passed, resume = threading.Event(), threading.Event()

    def stalling(*args: object) -> object:  # A's check for layer 1 passes, then A is descheduled
        deadline = check(*args)  # type: ignore[arg-type]
        if threading.current_thread().name == "attempt-a" and args[-1] == "layer 1":
            passed.set()
            resume.wait(10)
        return deadline

    monkeypatch.setattr(shm_module, "fence_deadline", stalling)
    late: list[BaseException] = []

    def attempt_a() -> None:
        try:
            SharedMemorySender("m").send(rx.endpoint, spec, prefill.kv, 30)
        except FencedError as e:  # its next layer's check: the permits closed at the commit
            late.append(e)

    a = threading.Thread(target=attempt_a, name="attempt-a")
    a.start()
    try:
        assert passed.wait(10)
        SharedMemorySender("m").send(rx.endpoint, spec, prefill.kv, 30)  # the retry B: complete, stamped
        assert decode.commit("r", first.new_token_ids[0], may_be_written=True, is_writer_stopped=False) is None
        tokens = list(first.new_token_ids)
        for _ in range(3):
            for out in decode.step():
                tokens.extend(out.new_token_ids)
    finally:
        resume.set()
        a.join(10)
    assert late, "attempt A was never fenced after its late layer"
    while decode.has_unfinished():
        for out in decode.step():
            tokens.extend(out.new_token_ids)
    assert tokens == expected
