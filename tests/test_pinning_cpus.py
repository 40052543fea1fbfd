"""Engine replicas pinned to cores (`PoolConfig.cpus`): every thread of the process, and those it starts later."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pdserve.serve.config import PoolConfig


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="Linux only")
def test_pinning_moves_every_thread_and_new_ones_inherit() -> None:
    cpu = min(os.sched_getaffinity(0))
    script = f"""
import os, threading
from pdserve.serve.replicas import pin_process
started = threading.Event()
blocker = threading.Thread(target=started.wait, daemon=True)  # a thread that exists before the pinning
blocker.start()
pin_process([{cpu}])
later = []
thread = threading.Thread(target=lambda: later.append(os.sched_getaffinity(0)))
thread.start(); thread.join()
tasks = [os.sched_getaffinity(int(t)) for t in os.listdir("/proc/self/task")]
started.set()
print(all(t == {{{cpu}}} for t in tasks) and later == [{{{cpu}}}])
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "True"


def test_a_pool_cannot_be_pinned_to_no_core() -> None:
    with pytest.raises(ValueError):
        PoolConfig(cpus=[])
    assert PoolConfig(cpus=[0, 1]).cpus == [0, 1]
