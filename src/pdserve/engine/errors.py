"""The engine's failures that travel: a replica raises them to the ingress, which unpickles them (Ray pickles an
exception by its class's module). They live here, apart from the torch-importing engine, so that unpickling one
imports no torch: it runs on Ray's core-worker thread holding the GIL, and the ingress's first import of torch there
(3-8 s on a loaded 2-core box) stalled every call of that ingress (a dead engine's request took 7-10 s to fail)."""


class EngineDeadError(RuntimeError):
    """The engine thread failed; every open and future request errors out."""


class EngineWedgedError(RuntimeError):
    """The engine thread has been inside one step or command for too long (a watchdog's verdict)."""
