"""The engine's failures that travel: a replica raises them to the ingress, which unpickles them (Ray pickles an
exception by its class's module). They live here, apart from the torch-importing engine, so that unpickling one
imports no torch: it runs on Ray's core-worker thread holding the GIL, and the ingress's first import of torch there
(3-8 s on a loaded 2-core box) stalled every call of that ingress (a dead engine's request took 7-10 s to fail)."""


class EngineUnavailableError(RuntimeError):
    """A replica's engine cannot serve: every call to that replica fails until Serve replaces it (its health check
    fails too). `replica_id` names the replica, set where a replica raises it: the ingress then routes around that
    replica meanwhile (a failed replica answers at once, so it looks the least loaded: power-of-two choices sent
    it most requests, and their retries too)."""

    replica_id: str | None = None


class EngineDeadError(EngineUnavailableError):
    """The engine thread failed; every open and future request errors out."""


class EngineWedgedError(EngineUnavailableError):
    """The engine thread has been inside one step or command for too long (a watchdog's verdict)."""
