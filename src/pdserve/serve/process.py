"""Where a replica's threads run: niceness and CPU pinning, applied to every thread of the process."""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)


def set_niceness(niceness: int | None) -> None:
    """Give every thread of this process (and those it starts later) `niceness`: Linux keeps it per thread, and
    threads inherit their creator's. None leaves the process as it is. Lowering it needs root or CAP_SYS_NICE:
    without them a warning, and the process keeps the niceness it has."""
    if niceness is None or os.getpriority(os.PRIO_PROCESS, 0) == niceness:
        return
    for task in os.listdir("/proc/self/task"):
        try:
            os.setpriority(os.PRIO_PROCESS, int(task), niceness)
        except PermissionError:
            logger.warning(
                "cannot set niceness %d (needs root or CAP_SYS_NICE); replicas keep Ray's %d, and busier processes "
                "at a lower niceness on this host take their cores", niceness, os.getpriority(os.PRIO_PROCESS, 0)
            )  # fmt: skip
            return
        except ProcessLookupError:  # a thread that just ended
            continue


def pin_process(cpus: list[int]) -> None:
    """Run every thread of this process (and those it starts later) on `cpus` only."""
    for task in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(task), cpus)
        except OSError:  # a thread that just ended
            continue
