"""load_tests/planner_sim.py's search for the best fixed split, on a fake runner (no simulation)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "load_tests"))
import planner_sim


class FakeRunner:
    """Goodput per replica-hour from a formula: best at (3, 5) on a cluster of 8, worse by distance from it."""

    def __init__(self) -> None:
        self.runs: list[tuple[int, int]] = []

    def map(self, tasks: Sequence[planner_sim.Task]) -> list[planner_sim.Run]:
        out = []
        for t in tasks:
            self.runs.append((t.prefill, t.decode))
            score = 1500.0 - 300.0 * abs(t.prefill - 3) - 200.0 * abs(t.decode - 5)
            out.append(planner_sim.Run("fixed", t.prefill, t.decode, goodput_per_replica_hour=score))
        return out


@pytest.fixture
def trace(monkeypatch: pytest.MonkeyPatch) -> None:
    # 100k requests over an hour: every split could beat any best at full attainment (no pruning)
    monkeypatch.setattr(planner_sim, "_TRACE", [SimpleNamespace(arrival_s=3600.0)] * 100_000)


@pytest.mark.usefixtures("trace")
def test_the_search_moves_replicas_between_pools_at_the_clusters_size() -> None:
    """From (4, 4) on a full cluster of 8, growing a pool is invalid: the budget goes to valid moves (it once went to
    invalid ones first, and the search stopped at (4, 4) with a neighbour 1.5x better untried)."""
    runner = FakeRunner()
    start = planner_sim.Run("fixed", 4, 4, goodput_per_replica_hour=1000.0)
    best, num = planner_sim.best_fixed(runner, 8, (4, 4), [start], max_runs=4, exhaustive=False)  # type: ignore[arg-type]
    assert (best.prefill, best.decode) == (3, 5)
    assert all(p + d <= 8 for p, d in runner.runs) and num <= 4


@pytest.mark.usefixtures("trace")
def test_the_exhaustive_search_runs_every_split() -> None:
    runner = FakeRunner()
    best, num = planner_sim.best_fixed(runner, 6, (3, 3), [], max_runs=0, exhaustive=True)  # type: ignore[arg-type]
    assert (best.prefill, best.decode) == (3, 3) and num == 15  # p + d <= 6, both >= 1: 1 + 2 + 3 + 4 + 5
