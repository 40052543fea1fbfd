"""Fault injection for tests and drills: off unless `PDSERVE_FAULTS` names faults (set it in a pool's
`ray_actor_options.runtime_env.env_vars` to aim at one pool). Real processes, real signals.

    PDSERVE_FAULTS="prefill.push=kill@/tmp/once-1; engine.step=raise"

Each entry is `point=action[:argument][@marker]`:
- points: `prefill.compute` (a prefill call starts), `prefill.push` (its KV push starts, in the push thread),
  `decode.commit` (a decode call commits), `engine.step` (the engine thread, before a step);
- actions: `kill` (SIGKILL this process), `hang` (block the calling thread for good), `slow:<seconds>` (sleep),
  `raise` (RuntimeError);
- `@marker`: fire once across every process and restart — only the caller that creates the file `marker` fires.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from functools import cache

logger = logging.getLogger(__name__)
ENV = "PDSERVE_FAULTS"
POINTS = ("prefill.compute", "prefill.push", "decode.commit", "engine.step")
ACTIONS = ("kill", "hang", "slow", "raise")


class InjectedFault(RuntimeError):
    """Raised by a `raise` fault."""


@dataclass(frozen=True)
class Fault:
    action: str
    seconds: float = 0.0  # for slow
    marker: str | None = None  # fire once: only the caller that creates this file


def parse(spec: str) -> dict[str, Fault]:
    """`PDSERVE_FAULTS`'s value as {point: Fault}; ValueError naming what is wrong."""
    faults: dict[str, Fault] = {}
    for entry in filter(None, (e.strip() for e in spec.split(";"))):
        point, sep, rest = entry.partition("=")
        action, _, marker = rest.partition("@")
        name, _, argument = action.partition(":")
        if not sep or point not in POINTS or name not in ACTIONS:
            raise ValueError(
                f"bad {ENV} entry {entry!r}: want point=action with point in {POINTS}, action in {ACTIONS}"
            )
        seconds = float(argument) if name == "slow" else 0.0
        faults[point] = Fault(name, seconds, marker or None)
    return faults


@cache
def _configured() -> dict[str, Fault]:
    return parse(os.environ.get(ENV, ""))


def fault_point(point: str) -> None:
    """Act out the fault configured at `point`, if any (nothing when `PDSERVE_FAULTS` is unset)."""
    fault = _configured().get(point)
    if fault is None or not _claim(fault.marker):
        return
    logger.warning("injected fault at %s: %s", point, fault.action)
    if fault.action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif fault.action == "hang":
        threading.Event().wait()
    elif fault.action == "slow":
        time.sleep(fault.seconds)
    else:
        raise InjectedFault(f"injected fault at {point}")


def _claim(marker: str | None) -> bool:
    if marker is None:
        return True
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        return False
    return True
