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
from pdserve.serve.process import pin_process
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


@pytest.mark.skipif(os.geteuid() != 0, reason="lowering a niceness needs root or CAP_SYS_NICE")
def test_niceness_reaches_every_thread_and_new_ones_inherit() -> None:
    """A process Ray started at niceness 15, with a thread from before: `set_niceness(0)` moves every thread."""
    script = """
import os, threading
from pdserve.serve.process import set_niceness
started = threading.Event()
blocker = threading.Thread(target=started.wait, daemon=True)
blocker.start()
set_niceness(0)
later = []
thread = threading.Thread(target=lambda: later.append(os.getpriority(os.PRIO_PROCESS, 0)))
thread.start(); thread.join()
tasks = []
for t in os.listdir("/proc/self/task"):
    try:
        tasks.append(os.getpriority(os.PRIO_PROCESS, int(t)))
    except ProcessLookupError:  # a library's thread that just ended
        pass
started.set()
print(len(tasks) >= 2 and set(tasks) == {0} and later == [0])
"""
    out = subprocess.run(["nice", "-n", "15", sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


@pytest.mark.skipif(os.geteuid() != 0, reason="lowering a niceness needs root or CAP_SYS_NICE")
def test_http_front_renice_reaches_the_process_and_its_children() -> None:
    """What the ingress runs inside Serve's proxy actor: every thread of that process and of the processes under it
    (HAProxy) moves."""
    script = """
import os, subprocess, sys, threading
from pdserve.serve.process import _renice_process_tree
child = subprocess.Popen([sys.executable, "-c", "import subprocess, sys; subprocess.run(['sleep', '30'])"])
threading.Thread(target=threading.Event().wait, daemon=True).start()
import time
time.sleep(0.5)  # the grandchild exists
error = _renice_process_tree()(None, 0)
def levels(pid):
    return {os.getpriority(os.PRIO_PROCESS, int(t)) for t in os.listdir(f"/proc/{pid}/task")}
def parent(pid):
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])
grandchildren = [int(p) for p in os.listdir("/proc") if p.isdigit() and parent(p) == child.pid]
print(error, levels(os.getpid()), levels(child.pid), [levels(g) for g in grandchildren])
for pid in grandchildren:  # the grandchild holds our stdout: left running, the test waited out its sleep (30 s)
    os.kill(pid, 9)
child.kill()
"""
    out = subprocess.run(["nice", "-n", "15", sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "None {0} {0} [{0}]"


def test_niceness_without_privilege_warns_and_keeps_going() -> None:
    """An unprivileged process cannot go below its niceness: the replica warns and runs on (as Ray started it)."""
    script = """
import logging, os
logging.basicConfig()
from pdserve.serve.process import set_niceness
os.nice(5)
if os.geteuid() == 0:  # drop the privilege to lower it, as an ordinary user has none
    os.setuid(65534)
set_niceness(0)
print(os.getpriority(os.PRIO_PROCESS, 0))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(os.getpriority(os.PRIO_PROCESS, 0) + 5)
    assert "cannot set niceness 0" in out.stderr
