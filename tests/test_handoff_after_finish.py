"""A stream that already ended (its finished output delivered) must not be "migrated" when its decode replica dies
before Serve's end-of-stream reaches the ingress (without output channels: the decode call carries the stream). The
handoff used to yield a second request's worth of tokens after the finished output (a stop-token finish continued
past the stop token), reserving, prefilling and decoding on the surviving replicas; the consumers that pull past the
finish (ChoiceStreams' pumps for n > 1) met it. Found in review."""

from __future__ import annotations

import asyncio
import logging
from contextlib import aclosing
from pathlib import Path
from typing import Any

import pytest

import test_handoff_faults as thf
from oracle import greedy
from pdserve.engine import EngineRequest, FinishReason
from pdserve.serve import handoff
from pdserve.serve.config import ServeConfig
from test_handoff_faults import Cluster, Handle, _settle, serve_config  # noqa: F401  (the rig's fixture)

_ARMED: list[bool] = []


class _DiesAfterItsLastOutput(thf.StreamCall):
    """A decode stream whose replica is SIGKILLed right after it sent the finished output, before the stream's end
    (Ray's end-of-stream is a message of its own: a kill between the two is a real window)."""

    def __init__(self, cluster: Cluster, replica: Any, method: str, agen: Any) -> None:
        self._cluster, self._method = cluster, method
        super().__init__(cluster, replica, method, agen)

    async def _pump(self, agen: Any) -> None:
        try:
            async for item in agen:
                self.items.put_nowait(("item", item))
                if self._method == "decode" and getattr(item, "finish_reason", None) is not None and _ARMED:
                    _ARMED.clear()
                    self._cluster.kill(self.replica)  # cancels this task: its next await raises
                    await asyncio.sleep(0)
            self.items.put_nowait(("end", None))
        except asyncio.CancelledError:
            await agen.aclose()
            raise
        except Exception as e:
            self.items.put_nowait(("error", e))


async def _run(config: ServeConfig, model_path: str) -> tuple[list[int], list[tuple[list[int], Any]], int]:
    cluster = Cluster(config, model_path)
    cluster.add("prefill")
    cluster.add("decode")
    cluster.add("decode")
    prefill, decode = Handle(cluster, "prefill"), Handle(cluster, "decode")
    prompt = tuple(range(40, 61))
    try:
        whole: list[int] = []
        outs = handoff.disaggregated_generate(EngineRequest("ref", prompt, greedy(12)), prefill, decode, None, 1.0)
        async with aclosing(outs):
            async for out in outs:
                whole += out.new_token_ids
        stop = whole[4]
        assert stop not in whole[:4]
        # The same request, now ending at its 5th token (a stop token), on a replica that dies right after.
        request = EngineRequest("r", prompt, greedy(12, stop_token_ids=(stop,)))
        _ARMED.append(True)
        got: list[tuple[list[int], Any]] = []
        outs = handoff.disaggregated_generate(request, prefill, decode, None, 1.0)
        try:
            async with aclosing(outs):
                async for out in outs:  # as a ChoiceStreams pump does: it pulls until the stream ends
                    got.append((out.new_token_ids, out.finish_reason))
        except Exception as e:
            got.append(([], e))
        await asyncio.sleep(0.3)
        await _settle(0, cluster, None)
        return whole[:5], got, len(cluster.killed)
    finally:
        cluster.close()


def test_no_output_follows_a_finished_one_when_the_replica_dies_at_the_end(
    serve_config: ServeConfig,  # noqa: F811  (the imported fixture)
    tiny_models: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(thf, "StreamCall", _DiesAfterItsLastOutput)  # Cluster.call_on looks it up in its module
    want, got, num_killed = asyncio.run(_run(serve_config, str(tiny_models["llama"])))
    assert num_killed == 1 and not _ARMED, "the replica died right after the finished output"
    tokens = [t for ids, _ in got for t in ids]
    finished_at = next(i for i, (_, reason) in enumerate(got) if reason is not None)
    assert isinstance(got[finished_at][1], FinishReason), got  # a finish, not an error after the tokens
    assert tokens[: len(want)] == want
    assert finished_at == len(got) - 1, f"outputs after the finished one: {got[finished_at + 1 :]}"
    assert tokens == want


def test_an_abort_cancelled_on_the_replica_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    """`_abort` runs detached and never raises: a call cancelled on the replica's side (Serve raises a plain
    CancelledError at the caller) escaped its `except Exception`, unlogged, the task ending cancelled."""

    async def cancelled_on_the_replica() -> None:
        await asyncio.sleep(0)
        raise asyncio.CancelledError

    decode: Any = type("Decode", (), {})()
    decode.abort = type("Method", (), {"remote": staticmethod(lambda *a, **k: cancelled_on_the_replica())})()

    async def main() -> asyncio.Task[None]:
        task = asyncio.ensure_future(handoff._abort(decode, "r", {"target_replica_id": "d1"}, may_be_written=False))
        await asyncio.wait({task})
        return task

    with caplog.at_level(logging.WARNING, logger=handoff.logger.name):
        task = asyncio.run(main())
    assert not task.cancelled() and task.exception() is None
    assert any("abort of r on decode replica" in r.getMessage() for r in caplog.records)
