"""Pinned calls reach their replica or fail: the request router never offers another replica while the target is
a candidate (Serve then waits for a slot on it, at max_ongoing_requests too), and a replica refuses a call pinned
to another (the target vanished)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from pdserve.serve.replicas import MisroutedCallError, _EngineReplica
from pdserve.serve.routing import pin_tiers


def replica(unique_id: str) -> Any:
    return SimpleNamespace(replica_id=SimpleNamespace(unique_id=unique_id))


def test_the_target_is_the_only_choice_while_it_exists() -> None:
    a, b, c = replica("a"), replica("b"), replica("c")
    assert pin_tiers([a, b, c], "b") == [[b]]  # no fallback tier: a full target makes Serve wait, not spill


def test_a_vanished_target_lets_the_call_fail_elsewhere() -> None:
    a, b = replica("a"), replica("b")
    assert pin_tiers([a, b], "gone") == [[a, b]]
    assert pin_tiers([], "gone") == []


def test_a_replica_refuses_calls_pinned_to_another() -> None:
    shell = _EngineReplica.__new__(_EngineReplica)
    shell.replica_id = "mine"
    shell._check_pinned(None)
    shell._check_pinned("mine")
    with pytest.raises(MisroutedCallError, match="pinned to replica theirs reached mine"):
        shell._check_pinned("theirs")
