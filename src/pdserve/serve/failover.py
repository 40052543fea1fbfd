"""What the ingress does when a replica fails a request (docs/DEPLOY.md, "Faults"): the decisions, as pure functions.

- Before the client has any token, a failed handoff (a decode replica that died, left the pool or refused the
  commit; both prefill attempts failed and the local fallback too) is retried once from scratch elsewhere — for any
  request: nothing was shown, so nothing can contradict the retry.
- After tokens were streamed, a greedy or seeded request migrates: prompt + the streamed tokens are prefilled for
  another decode replica, which continues exactly where the stream stopped (`continuation`). Other requests end with
  the error: a fresh sample would not continue theirs.
- The client's own errors (invalid input) and capacity refusals are never retried.
- A colocated replica whose engine died (EngineUnavailableError names it) is avoided by this ingress's `generate`
  calls — the retry, the migration and new requests — until Serve replaces it (`BrokenReplicas`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator, Set
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

from ray.exceptions import RayActorError, RayTaskError

from pdserve.api.backend import CapacityError
from pdserve.engine import EngineRequest, EngineUnavailableError, InvalidRequestError, RequestOutput
from pdserve.router import RouteDecision, RouteMode


@dataclass
class FailoverCounters:
    prefill_retries: int = 0  # prefills retried on another replica after the first one failed
    local_fallbacks: int = 0  # prompts prefilled on their decode replica after every prefill attempt failed
    handoff_retries: int = 0  # requests sent again, elsewhere, after failing before their first token
    migrations: int = 0  # streams moved to another replica after theirs failed


counters = FailoverCounters()  # per ingress process (each ingress replica counts its own)


class ReplicaCancelled(RuntimeError):
    """A call's task was cancelled on its replica, not by us: a server fault (retried, migrated or a 500)."""


@contextmanager
def foreign_cancel_as_fault(what: str) -> Iterator[None]:
    """Around awaiting a replica's call: a CancelledError while this task is not being cancelled came from the
    replica's side (Ray Serve raises a cancelled remote task as a plain CancelledError at the caller), and becomes
    ReplicaCancelled; taken for the client leaving, it ended a 200 stream short without an error event, or hung a
    stream waiting for outputs the relay would never pass on (found in review)."""
    try:
        yield
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is None or task.cancelling() > 0:
            raise
        raise ReplicaCancelled(f"{what} was cancelled on its replica") from None


def raise_if_cancelling() -> None:
    """Where a loop that only its task's cancel may end starts a round: Python 3.11's `asyncio.wait_for` returns the
    result when a cancel lands as the awaited call completes, swallowing the cancel (CPython gh-86296, fixed in
    3.12); the task's `cancelling()` still counts it. Without this check such a loop ran on, and `asyncio.run` (or a
    replica's shutdown) waited for it for ever (a CI run's router test hung 600 s)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling() > 0:
        raise asyncio.CancelledError


def is_server_fault(error: BaseException) -> bool:
    """A replica's or the cluster's fault, worth another replica; not the client's input, not a capacity refusal."""
    return isinstance(error, Exception) and not isinstance(error, InvalidRequestError | CapacityError)


def can_migrate(request: EngineRequest, error: BaseException) -> bool:
    """A server fault on a request whose continuation is reproducible (greedy, or seeded)."""
    is_reproducible = request.sampling.is_greedy or request.sampling.seed is not None
    return is_reproducible and is_server_fault(error)


@dataclass
class Failover:
    """One request's failovers: a server fault before its first token is retried once elsewhere; after it, a
    greedy or seeded stream continues elsewhere (`continuation`) up to `max_migrations` times."""

    max_migrations: int = 1
    num_retries: int = 0
    num_migrations: int = 0

    def action(self, request: EngineRequest, streamed: list[int], error: BaseException) -> str | None:
        """What to do about `error` (counted), or None: it ends the request."""
        if not streamed and self.num_retries < 1 and is_server_fault(error):
            self.num_retries += 1
            counters.handoff_retries += 1
            return "retrying it elsewhere"
        if streamed and self.num_migrations < self.max_migrations and can_migrate(request, error):
            self.num_migrations += 1
            counters.migrations += 1
            return "migrating it"
        return None


@dataclass
class BrokenReplicas:
    """Replicas whose engine failed a call (EngineUnavailableError, raised by a replica that names itself), for
    `ttl_s`: the calls Serve routes avoid them meanwhile (routing.py). A failed replica answers every call at once,
    so it looks the least loaded: power-of-two choices sent it most new requests and their retries too, each one a
    503 until Serve's health check replaced it. Serve's replacement has a new id; the TTL must outlast Serve's
    verdict (`for_health_checks`), else the dead replica took requests again before it was replaced."""

    ttl_s: float = 60.0
    _until: dict[str, float] = field(default_factory=dict)

    @classmethod
    def for_health_checks(cls, period_s: float, timeout_s: float) -> BrokenReplicas:
        """Remembered as long as Serve may take to replace a replica that fails its health checks: it does after
        3 failures in a row (Ray's REPLICA_HEALTH_CHECK_UNHEALTHY_THRESHOLD), each up to a period and a timeout
        apart, then starts the replacement — a margin for that."""
        return cls(ttl_s=3 * (period_s + timeout_s) + 30.0)

    def mark(self, error: BaseException) -> None:
        """Remember the replica `error` names, if it is an engine's failure naming one. (Ray raises it as an instance
        of both RayTaskError and its cause's class, whose class attribute `replica_id`, None, hides the cause's.)"""
        cause = error.cause if isinstance(error, RayTaskError) else error
        replica_id = cause.replica_id if isinstance(cause, EngineUnavailableError) else None
        if replica_id is not None:
            self._until[replica_id] = time.monotonic() + self.ttl_s

    def current(self) -> tuple[str, ...]:
        if not self._until:  # every request asks: nothing to do while no replica failed
            return ()
        now = time.monotonic()
        for replica_id in [r for r, until in self._until.items() if until <= now]:
            del self._until[replica_id]
        return tuple(self._until)


def continuation(request: EngineRequest, streamed: list[int], attempt: int) -> EngineRequest:
    """The rest of `request` after `streamed` tokens: they join the prompt, the limits shrink by their count, and
    they stay output to the sampler (seeded draws continue the same random sequence, penalties count them). Prompt
    logprobs came with the first token: a continuation asks for none (they would cost a logit per prompt position
    and keep the prompt from the prefix cache)."""
    params = request.sampling
    sampling = replace(
        params,
        max_tokens=params.max_tokens - len(streamed),
        min_tokens=max(0, params.min_tokens - len(streamed)),
        num_prior_output_tokens=params.num_prior_output_tokens + len(streamed),
        prompt_logprobs=params.prompt_logprobs if not streamed else None,
    )
    prompt = (*request.prompt_token_ids, *streamed)
    return replace(request, request_id=f"{request.request_id}.m{attempt}", prompt_token_ids=prompt, sampling=sampling)


def as_original(out: RequestOutput, request: EngineRequest) -> RequestOutput:
    """A continuation's output as the original request's (its id and prompt size)."""
    return replace(out, request_id=request.request_id, num_prompt_tokens=len(request.prompt_token_ids))


def without(
    route: RouteDecision | None, failed: str | None, request_id: str, failed_prefills: frozenset[str] = frozenset()
) -> RouteDecision | None:
    """The route for a retry or continuation: the next decode replica that did not fail (None — Serve picks — when
    no other is known), and the same prefill replica unless it failed on its own (`failed_prefills`: died, or gave
    no answer in time) or there was none (a local route): then the cheapest one the router knew of that did not
    fail; with none left after failures the decode replica prefills the prompt itself, with none known Serve
    picks. (A retry went back to the prefill replica that had just failed: a wedged one cost the prefill timeout
    twice; found in review.)"""
    if route is None:
        return None
    ranking = tuple(r for r in route.decode_ranking if r != failed)
    if not ranking:
        return None
    mode, prefill = RouteMode.DISAGGREGATED, route.prefill_replica_id
    if prefill is None or prefill in failed_prefills:
        prefill = cheapest_prefill(route, failed_prefills)
        if prefill is None and failed_prefills:  # every prefill replica it knew of failed
            mode = RouteMode.LOCAL
    return replace(
        route, request_id=request_id, mode=mode, decode_replica_id=ranking[0], decode_ranking=ranking,
        prefill_replica_id=prefill,
    )  # fmt: skip


def is_own_fault(error: BaseException) -> bool:
    """Whether a replica's call failed for a reason of that replica's own: its actor died or is unreachable, or the
    call gave no answer in time. Not an error its method raised (a failed KV transfer: the other side may have
    died), which Ray raises as an instance of its cause's class too."""
    return isinstance(error, RayActorError | TimeoutError) and not isinstance(error, RayTaskError)


def cheapest_prefill(route: RouteDecision | None, excluded: Set[str | None]) -> str | None:
    """The cheapest prefill replica the router knew of for `route`, other than `excluded`; None when there is none
    (Serve picks, or the decode replica prefills)."""
    if route is None:
        return None
    others = [c for c in route.prefill_candidates if c.replica_id not in excluded]
    return min(others, key=lambda c: c.total_s).replica_id if others else None
