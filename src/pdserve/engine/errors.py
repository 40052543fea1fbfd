"""The engine's failures that travel: a replica raises them to the ingress, which unpickles them (Ray pickles an
exception by its class's module). They live here, apart from the torch-importing engine, so that unpickling one
imports no torch: it runs on Ray's core-worker thread holding the GIL, and the ingress's first import of torch there
(3-8 s on a loaded 2-core box) stalled every call of that ingress (a dead engine's request took 7-10 s to fail)."""


class EngineUnavailableError(RuntimeError):
    """A replica's engine cannot serve until Serve replaces the replica (its health check fails too). `replica_id`
    names the replica where a replica's `generate` raised it (a dead engine fails every call at once): the ingress
    then routes around that replica meanwhile — answering at once, it looked the least loaded, and power-of-two
    choices sent it most requests and their retries too. (A wedged engine's calls wait instead: its health check
    raises EngineWedgedError, and Serve's queue-length probes already steer around its growing queue.)"""

    replica_id: str | None = None


class EngineDeadError(EngineUnavailableError):
    """The engine thread failed; every open and future request errors out."""


class EngineWedgedError(EngineUnavailableError):
    """The engine thread has been inside one step or command for too long (a watchdog's verdict)."""
