"""The load view: what the router knows about each replica's work and room.

In-flight counts are the router's own (it sees every request it routes, at once), plus what a replica's last report
showed beyond them (other ingress replicas' requests, requests Serve routed); free KV blocks come from the replicas'
periodic reports, minus what the router has sent since the last one.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ReplicaLoad:
    replica_id: str
    role: str  # "prefill" | "decode"
    node_id: str
    num_blocks: int  # KV pool size
    num_free_blocks: int  # last report minus blocks the router routed there since
    num_prefill_tokens: int = 0  # prompt tokens routed here and not yet prefilled (router's count)
    num_decodes: int = 0  # requests decoding here, routed by this router and not finished
    num_reported_running: int = 0  # from the last report (includes other ingresses' requests)
    num_reported_waiting: int = 0
    # What the last report showed beyond this router's own counts at the time: other ingress replicas' requests
    # (each ingress has a router of its own), requests Serve routed. Never negative: the router's counts run ahead.
    num_others_prefill_tokens: int = 0
    num_others_decodes: int = 0
    reported_at: float = 0.0

    @property
    def queued_prefill_tokens(self) -> int:
        """Prompt tokens waiting to be computed here, this router's and others'."""
        return self.num_prefill_tokens + self.num_others_prefill_tokens

    @property
    def decodes(self) -> int:
        """Requests decoding (or waiting to) here, this router's and others'."""
        return self.num_decodes + self.num_others_decodes


@dataclass(frozen=True)
class ReplicaReport:
    """A replica's periodic answer to the router: its identity, its stats, and its KV events since the cursor."""

    replica_id: str
    role: str
    node_id: str
    num_blocks: int
    num_free_blocks: int
    num_running: int
    num_waiting: int
    queued_prefill_tokens: int = 0  # prompt tokens accepted and not yet computed
