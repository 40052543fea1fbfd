"""Core sharing between engine replicas on one node (engine/cores.py): an idle engine's cores are lent, a lent core
is used by one borrower at a time and never beside an owner, an owner gets its cores back within a borrower's step,
and a dead process's cores come back."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from oracle import greedy, random_prompts, run_staggered
from pdserve.config import CacheConfig, EngineConfig, ModelConfig
from pdserve.engine import EngineRequest, LLMEngine, native
from pdserve.engine.async_engine import AsyncEngine
from pdserve.engine.cores import CoreShare

SRC = str(Path(__file__).resolve().parents[1] / "src")


def test_an_idle_owner_lends_its_core_and_takes_it_back(tmp_path: Path) -> None:
    p, d = CoreShare([0], [1], directory=str(tmp_path)), CoreShare([1], [0], directory=str(tmp_path))
    assert d.begin_step() == 2  # P has not stepped yet: D borrows core 0
    d.end_step()
    assert p.begin_step() == 1  # D holds its own core while busy
    p.end_step()
    assert d.begin_step() == 1  # P is busy (has not gone idle): nothing to borrow
    d.end_step()
    p.idle()
    assert d.begin_step() == 2
    d.end_step()
    assert (d.borrowed_core_steps, p.borrowed_core_steps) == (2, 0)


def test_an_owner_waits_for_the_borrowers_step_and_is_never_passed_over(tmp_path: Path) -> None:
    p, d = CoreShare([0], [1], directory=str(tmp_path)), CoreShare([1], [0], directory=str(tmp_path))
    assert d.begin_step() == 2
    got: list[float] = []
    owner = threading.Thread(target=lambda: got.append(p.begin_step()))
    owner.start()
    time.sleep(0.1)
    assert not got, "the owner stepped on a core lent for a step that has not ended"
    d.end_step()
    owner.join(timeout=2)
    assert got == [1] and p.home_waits == 1 and p.home_timeouts == 0
    assert d.begin_step() == 1, "the borrower took the core again while its owner had work"
    d.end_step()


def test_an_owner_gets_its_core_from_a_borrower_stepping_back_to_back(tmp_path: Path) -> None:
    """A borrower in another process takes its next step the instant the last one ends; the owner, polling, still
    gets its core at the end of the step it found running, since it said it wants it."""
    code = (
        "import sys, time; sys.path.insert(0, sys.argv[1]);"
        "from pdserve.engine.cores import CoreShare;"
        "d = CoreShare([1], [0], directory=sys.argv[2]); end = time.monotonic() + 1.0; lent = []\n"
        "while time.monotonic() < end:\n"
        "    lent.append(d.begin_step() - 1); print(len(lent), flush=True) if len(lent) == 1 else None\n"
        "    t = time.monotonic() + 0.005\n"
        "    while time.monotonic() < t: pass\n"
        "    d.end_step()\n"
        "print(sum(lent), flush=True)"
    )
    child = subprocess.Popen([sys.executable, "-c", code, SRC, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "1"
        time.sleep(0.1)
        p = CoreShare([0], [1], directory=str(tmp_path))
        waits = []
        for _ in range(5):
            start = time.monotonic()
            assert p.begin_step() == 1
            waits.append(time.monotonic() - start)
            p.end_step()
            time.sleep(0.02)
            p.idle()
            time.sleep(0.02)  # the borrower takes the core again
        lent = int(child.stdout.readline())
        child.wait(timeout=10)
    finally:
        child.kill()
    # Each wait is at most one of the borrower's 5 ms steps; without the want lock the owner polls into the instant
    # between two steps only by chance (0.035-1.0 s when measured).
    assert max(waits) < 0.03 and p.home_timeouts == 0, f"the owner waited {max(waits):.3f} s"
    assert lent > 5, "the borrower never borrowed the idle core"


def test_owners_of_one_core_compute_beside_each_other(tmp_path: Path) -> None:
    """Two replicas of a pool on one node own its cores together, as without sharing: neither waits for the other."""
    a, b = CoreShare([0], [1], directory=str(tmp_path)), CoreShare([0], [1], directory=str(tmp_path))
    d = CoreShare([1], [0], directory=str(tmp_path))
    assert (a.begin_step(), b.begin_step()) == (2, 1)  # a borrowed core 1 first; b found it taken
    a.end_step()
    b.end_step()
    assert d.begin_step() == 1  # core 0's owners are busy
    assert a.home_waits == b.home_waits == 0


@pytest.mark.parametrize("seed", range(12))
def test_random_schedules_never_put_a_borrower_beside_anyone(tmp_path: Path, seed: int) -> None:
    """Engines on 3 cores (a pool of 2 replicas co-owning core 0, one owning 1, one owning 2) step and idle at random
    for random lengths; every step records the cores it computes on. A borrowed core is never in use by anyone else
    at the same time, an owner never gives up waiting for its core, and cores do get lent."""
    rng = random.Random(seed)
    homes = [[0], [0], [1], [2]]
    engines = [CoreShare(h, [0, 1, 2], directory=str(tmp_path)) for h in homes]
    lock = threading.Lock()
    users: dict[int, list[tuple[int, str]]] = {0: [], 1: [], 2: []}  # core -> (engine, "own" | "borrowed") now
    errors: list[str] = []
    schedules = [
        [(rng.random() < 0.6, rng.uniform(0, 0.002)) for _ in range(150)] for _ in engines
    ]  # (busy, seconds) per turn

    def run(i: int) -> None:
        share = engines[i]
        for busy, seconds in schedules[i]:
            if not busy:
                share.idle()
                time.sleep(seconds)
                continue
            share.begin_step()
            mine = [(c, "own") for c in share.home] + [(c, "borrowed") for c in share._borrowed]
            with lock:
                for core, how in mine:
                    others = users[core]
                    if (how == "borrowed" and others) or any(h == "borrowed" for _, h in others):
                        errors.append(f"engine {i} ({how}) on core {core} beside {others}")
                    others.append((i, how))
            time.sleep(seconds)
            with lock:
                for core, how in mine:
                    users[core].remove((i, how))
            share.end_step()
        share.idle()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(engines))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors[:5]
    assert sum(e.home_timeouts for e in engines) == 0
    assert sum(e.borrowed_core_steps for e in engines) > 0
    for e in engines:
        e.close()


def test_a_dead_borrowers_core_comes_back(tmp_path: Path) -> None:
    code = (
        "import sys, time; sys.path.insert(0, sys.argv[1]);"
        "from pdserve.engine.cores import CoreShare;"
        "d = CoreShare([1], [0], directory=sys.argv[2]); print(d.begin_step(), flush=True); time.sleep(60)"
    )
    child = subprocess.Popen([sys.executable, "-c", code, SRC, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "2"  # it borrowed core 0
        p = CoreShare([0], [1], directory=str(tmp_path))
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
        start = time.monotonic()
        assert p.begin_step() == 2  # its own core back, and the dead one's
        assert time.monotonic() - start < 0.5 and p.home_timeouts == 0
    finally:
        child.kill()


def test_the_engine_steps_with_borrowed_threads_and_the_same_tokens(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """An AsyncEngine sharing cores runs each decode step with its own thread plus one per borrowed core (none while
    the peer is busy; none for a step with a prompt chunk, which an owner would wait long for), gives the same tokens
    as the engine alone, and frees its core when it shuts down."""
    path = tiny_models["llama"]
    config = EngineConfig(ModelConfig(str(path), dtype="float32"), CacheConfig(num_blocks=64))
    prompts = random_prompts([1, 17, 40, 90], 500, seed=5)
    requests = [EngineRequest(f"r{i}", tuple(p), greedy(10)) for i, p in enumerate(prompts)]
    want = run_staggered(LLMEngine(config), [(0, r) for r in requests])
    peer = CoreShare([0], [1], directory=str(tmp_path))
    threads_seen: list[tuple[int, bool]] = []  # per step: torch threads, whether a prompt chunk may run
    affinity: set[frozenset[int]] = set()  # the engine thread's cores, every step

    async def main() -> dict[str, list[int]]:
        engine = AsyncEngine(LLMEngine(config), 1, cores=CoreShare([1], [0], threads=1, directory=str(tmp_path)))
        step = engine.engine.step

        def counted_step():  # type: ignore[no-untyped-def]
            threads_seen.append((torch.get_num_threads(), engine.engine.has_prompt_work()))
            affinity.add(frozenset(os.sched_getaffinity(0)))
            return step()

        engine.engine.step = counted_step  # type: ignore[method-assign]

        async def collect(request: EngineRequest) -> list[int]:
            return [t async for out in engine.generate(request) for t in out.new_token_ids]

        async def run(batch: list[EngineRequest]) -> dict[str, list[int]]:
            outs = await asyncio.gather(*map(collect, batch))
            return {r.request_id: out for r, out in zip(batch, outs, strict=True)}

        got = await run(requests[:2])
        await asyncio.to_thread(peer.begin_step)  # the peer has work: its core is no longer lent
        seen = len(threads_seen)
        got |= await run(requests[2:])
        assert set(threads_seen[:seen]) == {(1, True), (2, False)}  # decodes borrowed, prompt chunks did not
        assert {threads for threads, _ in threads_seen[seen:]} == {1}
        peer.end_step()
        peer.idle()
        engine.shutdown()
        engine._thread.join(timeout=5)
        return got

    assert asyncio.run(main()) == want
    assert peer.begin_step() == 2, "the engine kept its core after it shut down"
    if native.pin_threads_op() is not None and {0, 1} <= os.sched_getaffinity(0):
        assert affinity == {frozenset({1})}, "the engine thread left its own core"


def test_only_decode_batches_of_min_batch_or_more_borrow(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """With min_batch 3, a decode step borrows the idle peer's core exactly when it decodes 3 or more sequences
    (batches shrink 4 -> 1 as requests of different lengths finish), and the tokens are the engine alone's."""
    config = EngineConfig(ModelConfig(str(tiny_models["llama"]), dtype="float32"), CacheConfig(num_blocks=64))
    prompts = random_prompts([1, 9, 20, 33], 500, seed=9)
    requests = [EngineRequest(f"r{i}", tuple(p), greedy(4 + 5 * i)) for i, p in enumerate(prompts)]
    want = run_staggered(LLMEngine(config), [(0, r) for r in requests])
    seen: list[tuple[int, int]] = []  # per step: torch threads, the decode-only batch (0: a prompt chunk may run)

    async def main() -> dict[str, list[int]]:
        share = CoreShare([1], [0], threads=1, directory=str(tmp_path), min_batch=3)
        engine = AsyncEngine(LLMEngine(config), 1, cores=share)
        step = engine.engine.step

        def counted_step():  # type: ignore[no-untyped-def]
            seen.append((torch.get_num_threads(), engine.engine.decode_batch()))
            return step()

        engine.engine.step = counted_step  # type: ignore[method-assign]

        async def collect(request: EngineRequest) -> list[int]:
            return [t async for out in engine.generate(request) for t in out.new_token_ids]

        outs = await asyncio.gather(*map(collect, requests))
        engine.shutdown()
        engine._thread.join(timeout=5)
        return {r.request_id: out for r, out in zip(requests, outs, strict=True)}

    assert asyncio.run(main()) == want
    assert all(threads == (2 if batch >= 3 else 1) for threads, batch in seen), seen
    assert {batch for _, batch in seen} >= {0, 1, 2, 3, 4}, seen  # every batch size was stepped


def test_lending_needs_both_pools_pinned_and_lends_the_other_pools_cores() -> None:
    from pdserve.serve.config import ServeConfig

    for bad in ({}, {"prefill": {"cpus": [0]}}, {"colocated": True, "engine": {"cpus": [0]}}):
        with pytest.raises(ValueError, match="lend_idle_cores needs"):
            ServeConfig(lend_idle_cores=True, **bad)
    config = ServeConfig(lend_idle_cores=True, prefill={"cpus": [0, 1]}, decode={"cpus": [1, 2, 3]})
    assert (config.lendable_cores("prefill"), config.lendable_cores("decode")) == ([2, 3], [0])
    assert config.lendable_cores("ingress") == []
    assert ServeConfig(prefill={"cpus": [0]}, decode={"cpus": [1]}).lendable_cores("decode") == []


def test_pin_threads_pins_nothing_unless_the_team_is_one_thread_per_core() -> None:
    """A team smaller than the cores listed (the runtime granted fewer threads: OMP_THREAD_LIMIT, OMP_DYNAMIC) handed
    a thread another's index, and it was pinned to that core (found in review): nothing is pinned now."""
    pin = native.pin_threads_op()
    if pin is None:
        pytest.skip("no native kernels here")
    cpu = min(os.sched_getaffinity(0))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert pin([cpu, cpu, cpu]) == 0
    finally:
        torch.set_num_threads(threads)
