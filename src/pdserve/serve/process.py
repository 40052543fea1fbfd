"""Where a replica's threads run: niceness and CPU pinning, applied to every thread of the process; and the same
niceness for Serve's HTTP front, which streams every token to the clients."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable

logger = logging.getLogger(__name__)

FRONT_LEVEL_EVERY_S = 60.0  # proxies start with new nodes and restart after failures

# Ray Serve's periodic work, paid on every node whatever the load: its controller reconciles every 0.1 s and each
# replica and handle exports its cached metrics every 0.1 s. Idle on 2 cores that is ~15% of a core across the
# controller, the GCS and the replicas; these values cut it to ~10% (docs/DEPLOY.md). They are defaults: a value
# already in the environment wins. Read by the processes Ray starts, so they must be set before Ray starts.
# Also: Serve kills an HTTP proxy not ready within 5 s, and on a loaded small box (Ray's workers at niceness 15) the
# first one can take longer: `serve.start` then failed with ActorDiedError (the tests have long set 30 s).
# And with direct ingress an ingress replica that stops stays reachable 30 s so that external load balancers can
# deregister it: the cluster `pdserve serve` starts is one node, whose HAProxy Serve reloads within a second, and
# those 30 s made every Ctrl-C take 31 s (the controller's shutdown gave up waiting).
QUIET_SERVE_ENV = {
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5",
    "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "1000",
    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "30",
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
}


def quiet_serve_env(environ: dict[str, str] | None = None) -> None:
    """Set `QUIET_SERVE_ENV` where `environ` (default `os.environ`) leaves a variable unset."""
    env = os.environ if environ is None else environ
    for name, value in QUIET_SERVE_ENV.items():
        env.setdefault(name, value)


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
    """Run every thread of this process (and those it starts later) on `cpus` only. ValueError when none of them
    is a core this process may use (the pool's `cpus` name cores this node lacks, or outside its cpuset)."""
    for task in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(task), cpus)
        except ProcessLookupError:  # a thread that just ended
            continue
        except OSError as e:
            raise ValueError(
                f"cannot pin to cores {cpus} (this process may use {sorted(os.sched_getaffinity(0))}): {e}"
            ) from e


def _renice_process_tree() -> Callable[[object, int], str | None]:
    """A function for `__ray_call__` that moves every thread of the actor's process, and of the processes under it
    (HAProxy under Serve's HAProxyManager with direct ingress), to a niceness. Defined inside a function so that Ray
    ships it by value: the proxy's process need not import pdserve."""

    def renice(_actor: object, niceness: int) -> str | None:
        import os

        parents: dict[int, int] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:  # "pid (comm) state ppid ...": comm may hold spaces
                        parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
        tree, frontier = [os.getpid()], [os.getpid()]
        while frontier:
            frontier = [pid for pid, parent in parents.items() if parent in frontier]
            tree += frontier
        for pid in tree:
            try:
                tasks = os.listdir(f"/proc/{pid}/task")
            except OSError:
                continue
            for task in tasks:
                try:
                    os.setpriority(os.PRIO_PROCESS, int(task), niceness)
                except PermissionError as e:
                    return str(e)
                except ProcessLookupError:
                    continue
        return None

    return renice


async def level_http_front(niceness: int | None) -> None:
    """Keep Serve's HTTP front at the replicas' `niceness`, every FRONT_LEVEL_EVERY_S, until cancelled: the proxy
    actor on each node (and HAProxy under it with direct ingress). Ray starts the proxy at niceness 15 like every
    worker; beside a busy engine thread at 0 the scheduler gives it 36/1060 of the core (~3%), while streaming
    takes ~0.1-0.3 ms of its CPU per token. On the 2-core box a third of 1P1D's chat tokens during long-prompt
    prefills (P's core busy) reached the client < 3 ms after the previous one, against 3% outside them: tokens
    held back and sent in clumps."""
    if niceness is None:
        return
    import ray

    renice = _renice_process_tree()
    warned = False
    while True:
        try:
            actors = await asyncio.to_thread(ray.util.list_named_actors, all_namespaces=True)
            for actor in actors:
                if actor["name"].startswith("SERVE_PROXY_ACTOR"):
                    handle = ray.get_actor(actor["name"], namespace=actor["namespace"])
                    error = await handle.__ray_call__.remote(renice, niceness)
                    if error is not None and not warned:
                        warned = True
                        logger.warning("cannot set the HTTP front's niceness to %d: %s", niceness, error)
        except Exception:  # a proxy restarting, the GCS busy: try again next round
            logger.debug("levelling the HTTP front's niceness failed", exc_info=True)
        await asyncio.sleep(FRONT_LEVEL_EVERY_S)
