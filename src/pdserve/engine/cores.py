"""Cores shared between engine replicas on one node: each replica owns the cores it is pinned to and lends them to
the others while it has nothing to compute.

Disaggregation on a CPU node splits its cores between a prefill and a decode replica, and whichever has no work
leaves its cores idle: at the end of a burst D decodes the last streams on its half while P's half waits. With
`lend_idle_cores`, an engine about to step borrows the cores of peers that are idle, runs that step with one more
torch thread per borrowed core, and hands them back after it. Each thread of the step is pinned to its core
(`csrc/threads.cpp`); the rest of a replica's threads (its event loop, KV pushes) stay on its own cores. An owner
with work takes its cores back before its next step, waiting at most one of the borrower's decode steps (only decode
steps borrow); while it holds them, nobody borrows them.

Two advisory locks per core, in a per-user directory under /dev/shm (node-local; the kernel drops a dead process's
locks, so a crashed replica never keeps a core):
- `core-N.lock`: held by whoever computes on core N: shared by its owners while busy, exclusively by one borrower
  for a step;
- `core-N.want`, shared: held by N's owners from the moment they want N until they go idle. A borrower takes it
  exclusively for an instant, without waiting, before borrowing N: when it cannot, an owner wants the core, and it
  does not borrow. So an owner waiting for a borrower's step to end is never passed over for the next one.
Every replica of a pool on a node owns the pool's cores together, and they compute beside each other on them as
they would without sharing.
"""

from __future__ import annotations

import fcntl
import logging
import os
import tempfile
import time
from collections.abc import Iterable

logger = logging.getLogger(__name__)

HOME_WAIT_S = 1.0  # an owner waits this long for a borrower's step at most, then computes beside it
_POLL_S = 0.0002


def default_directory() -> str:
    """Node-local and per user: every engine on this node that shares cores meets there."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    return os.path.join(base, f"pdserve-cores-{os.getuid()}")


def _try_lock(fd: int, mode: int) -> bool:
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


class CoreShare:
    """One engine's side of the node's core sharing; used from its engine thread only.

    `home`: the cores this engine owns (its pool's `cpus`); `lendable`: the other cores it may borrow (the other
    pools' `cpus` on this node). `threads` (default: one per home core) is the engine's torch thread count on its
    own cores; each borrowed core adds one."""

    def __init__(
        self,
        home: Iterable[int],
        lendable: Iterable[int],
        threads: int | None = None,
        directory: str | None = None,
        min_batch: int = 1,
    ) -> None:
        self.home = sorted(set(home))
        self.min_batch = min_batch  # the smallest decode batch whose step borrows (the engine's policy, kept here)
        self.lendable = sorted(set(lendable) - set(self.home))
        if not self.home:
            raise ValueError("an engine sharing cores needs cores of its own")
        self.threads = threads or len(self.home)
        self.directory = directory or default_directory()
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        self._fds: dict[tuple[int, str], int] = {}
        for core in self.home + self.lendable:
            for kind in ("lock", "want"):
                path = os.path.join(self.directory, f"core-{core}.{kind}")
                self._fds[core, kind] = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        self._holds_home = False
        self._borrowed: list[int] = []
        self.borrowed_core_steps = 0  # steps x cores borrowed, since start
        self.home_waits = 0  # times this engine waited for a borrower to hand its cores back
        self.home_timeouts = 0  # ... and gave up waiting (computed beside the borrower)

    def begin_step(self, borrow: bool = True) -> int:
        """Before a step: hold the home cores (waiting for a borrower's step to end, at most HOME_WAIT_S), and with
        `borrow` every idle peer core nobody wants; returns the torch threads this step runs with. Borrow only for
        short steps (decodes): an owner wanting its core back waits for the step to end."""
        if not self._holds_home:
            self._take_home()
        for core in self.lendable if borrow else ():
            if not _try_lock(self._fds[core, "want"], fcntl.LOCK_EX):
                continue  # an owner wants it (or another borrower is checking it)
            fcntl.flock(self._fds[core, "want"], fcntl.LOCK_UN)
            if _try_lock(self._fds[core, "lock"], fcntl.LOCK_EX):
                self._borrowed.append(core)
        self.borrowed_core_steps += len(self._borrowed)
        return self.threads + len(self._borrowed)

    def team(self) -> list[int]:
        """The core of each torch thread this step (after `begin_step`): the engine's own threads on its own cores,
        one more thread per borrowed core."""
        return [self.home[i % len(self.home)] for i in range(self.threads)] + self._borrowed

    def end_step(self) -> None:
        """After a step: the borrowed cores go back (their owners may be waiting)."""
        for core in self._borrowed:
            fcntl.flock(self._fds[core, "lock"], fcntl.LOCK_UN)
        self._borrowed.clear()

    def idle(self) -> None:
        """Nothing to compute: the home cores may be lent until the next `begin_step`."""
        if not self._holds_home:
            return
        for core in self.home:
            fcntl.flock(self._fds[core, "lock"], fcntl.LOCK_UN)
            fcntl.flock(self._fds[core, "want"], fcntl.LOCK_UN)
        self._holds_home = False

    def close(self) -> None:
        self.end_step()
        self.idle()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def _take_home(self) -> None:
        for core in self.home:  # first say so: no borrower takes them again once its step ends
            fcntl.flock(self._fds[core, "want"], fcntl.LOCK_SH)  # waits only for a borrower's instant check
        deadline = None
        for core in self.home:
            fd = self._fds[core, "lock"]
            while not _try_lock(fd, fcntl.LOCK_SH):
                if deadline is None:
                    self.home_waits += 1
                    deadline = time.monotonic() + HOME_WAIT_S
                elif time.monotonic() > deadline:
                    self.home_timeouts += 1
                    logger.warning("core %d not handed back within %.1f s: computing beside its borrower", core,
                                   HOME_WAIT_S)  # fmt: skip
                    break
                time.sleep(_POLL_S)
        self._holds_home = True
