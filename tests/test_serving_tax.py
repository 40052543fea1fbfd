"""A seconds-long smoke run of load_tests/serving_tax.py with a tiny model: every system it compares answers and
lands in the table, so the benchmark that reports the serving tax cannot rot unnoticed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_smoke_run_prints_a_row_per_system() -> None:
    command = [
        sys.executable, "load_tests/serving_tax.py", "--tiny", "--num-requests", "3", "--prompt-len", "24",
        "--output-len", "6", "--pin", "--local-prefill-queue-s", "0", "--seed", "1",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    table = done.stdout.split("| system |")[-1].splitlines()[2:]  # the final table, after its header and rule
    rows = {cells[1].strip(): float(cells[2]) for line in table if (cells := line.split("|"))[1:]}
    names = list(rows)
    assert len(names) == 4 and names[:2] == ["engine alone (AsyncEngine, in process)", "pdserve colocated, HTTP"]
    assert names[2].startswith("pdserve 1P1D, HTTP, P on [")  # the cores depend on the machine
    assert names[3] == names[2] + ", queue-aware local prefill (0.0 s)"
    assert all(tokens_per_s > 0 for tokens_per_s in rows.values())
