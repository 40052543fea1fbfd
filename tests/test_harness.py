"""The load harness (load_tests/harness.py): its goodput search on a fake server, and a seconds-long smoke run
against a real pdserve (tiny model, local Ray cluster, real HTTP)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "load_tests"))
import harness


def test_goodput_is_the_highest_rate_meeting_the_slos(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fake server meets both SLOs for 95% of requests up to 3 req/s and for none beyond: the bisection between
    0.5 and 8 converges on 3 from below within its steps, and each step is a recorded run."""

    async def fake_run(url: str, model: str, specs: list[harness.Spec], progress: bool) -> tuple[list, float]:
        rate = len(specs) / 100
        good = rate <= 3.0
        records = []
        for i, s in enumerate(specs):
            fast = good and i % 20 != 19  # 95% within the SLOs while the rate is sustainable
            records.append(harness.Record(s.kind, s.at_s, len(s.prompt), 200, 0.1 if fast else 9.0, 1.0, 10))
        return records, 100.0

    monkeypatch.setattr(harness, "run", fake_run)

    def fake_workload(args: argparse.Namespace, rate: float, seed: int = 0) -> list[harness.Spec]:
        return [harness.Spec(i / rate, [1], 4) for i in range(round(100 * rate))]

    monkeypatch.setattr(harness, "workload", fake_workload)
    args = argparse.Namespace(goodput="0.5,8", goodput_steps=8, seed=0, quiet=True, ttft_slo_s=2.0, tpot_slo_s=0.25)
    runs: list = []
    goodput, at_least = harness.goodput_search("u", "m", args, runs)
    assert goodput is not None and 2.5 < goodput <= 3.0 and not at_least
    assert len(runs) == 8 and [row["rate"] for row, _ in runs[:2]] == [0.5, 8.0]  # the bounds first


@pytest.mark.parametrize("sustainable", [0.0, 100.0])
def test_goodput_search_says_when_a_bound_decides_it(monkeypatch: pytest.MonkeyPatch, sustainable: float) -> None:
    """A server within the SLOs at every rate: the search runs `lo`, then `hi`, and reports "at least hi" (it used
    to bisect below `hi` and report the last midpoint); one that misses at `lo`: one run, no goodput, and a line
    that says so."""

    async def fake_run(url: str, model: str, specs: list[harness.Spec], progress: bool) -> tuple[list, float]:
        good = len(specs) / 100 <= sustainable
        return [harness.Record(s.kind, s.at_s, 1, 200, 0.1 if good else 9.0, 1.0, 10) for s in specs], 100.0

    monkeypatch.setattr(harness, "run", fake_run)
    monkeypatch.setattr(harness, "workload", lambda args, rate, seed=0: [harness.Spec(0.0, [1], 4)] * round(100 * rate))
    args = argparse.Namespace(goodput="0.5,8", goodput_steps=6, seed=0, quiet=True, ttft_slo_s=2.0, tpot_slo_s=0.25)
    runs: list = []
    goodput, at_least = harness.goodput_search("u", "m", args, runs)
    line = harness.goodput_line(goodput, at_least, args)
    if sustainable:
        assert (goodput, at_least) == (8.0, True) and [row["rate"] for row, _ in runs] == [0.5, 8.0]
        assert "≥ 8.00 req/s" in line and "raise the bounds" in line
    else:
        assert (goodput, at_least) == (None, False) and len(runs) == 1 and "lower the bounds" in line


def _sse(*events: object, done: bool = True) -> list[bytes]:
    lines = [f"data: {json.dumps(e) if not isinstance(e, str) else e}\n\n".encode() for e in events]
    return lines + ([b"data: [DONE]\n\n"] if done else [])


def _chunk(text: str, tokens: int) -> dict:
    return {"choices": [{"index": 0, "text": text}], "usage": {"completion_tokens": tokens}}


class _Cut(httpx.AsyncByteStream):
    """A stream that breaks after its lines, as a connection cut mid-answer."""

    def __init__(self, lines: list[bytes]) -> None:
        self.lines = lines

    async def __aiter__(self):  # type: ignore[no-untyped-def]
        for line in self.lines:
            yield line
        raise httpx.ReadError("connection reset by peer")


STREAMS = {
    "complete": (_sse(_chunk("a", 1), _chunk("b", 2), _chunk("c", 3)), None),
    "error event": (_sse(_chunk("a", 1), {"error": {"message": "engine died", "code": 500}}), "error event"),
    "no [DONE]": (_sse(_chunk("a", 1), _chunk("b", 2), _chunk("c", 3), done=False), "without [DONE]"),
    "short": (_sse(_chunk("a", 1), _chunk("b", 2)), "2 of 3 tokens"),
    "unreadable chunk": (_sse(_chunk("a", 1), "{not json"), "JSONDecodeError"),
    "cut": (_Cut(_sse(_chunk("a", 1), done=False)), "ReadError"),
}


@pytest.mark.parametrize("name", list(STREAMS))
def test_a_request_that_fails_after_its_200_misses_the_slos(name: str) -> None:
    """An error event, a cut stream, no [DONE], fewer tokens than asked for (ignore_eos), an unreadable chunk: the
    request answered 200 failed, and counts as missing both SLOs (it used to meet them: status 200 and no TPOT);
    the run goes on (an exception used to abort every request of the rate)."""
    lines, error = STREAMS[name]

    def answer(request: httpx.Request) -> httpx.Response:
        if isinstance(lines, _Cut):
            return httpx.Response(200, stream=lines)
        return httpx.Response(200, content=b"".join(lines))

    async def main() -> harness.Record:
        record = harness.Record("chat", 0.0, 1)
        async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
            await harness.send(client, "http://x/v1", "m", harness.Spec(0.0, [1, 2], 3), 0.0, record)
        return record

    record = asyncio.run(main())
    args = argparse.Namespace(ttft_slo_s=10.0, tpot_slo_s=10.0)
    assert record.status == 200
    if error is None:
        assert record.error is None and record.output_tokens == 3 and record.meets(10.0, 10.0)
    else:
        assert record.error is not None and error in record.error, record.error
        assert not record.meets(10.0, 10.0)
        row = harness.summary(1.0, [record], 1.0, args)
        assert row["slo_attainment"] == 0.0 and row["statuses"] == {"200 failed": 1} and row["ttft_s_p50"] is None


def test_an_empty_run_and_a_rated_trace_are_refused(tmp_path: Path) -> None:
    """No arrival at a low rate: an error, not a run at 0% within the SLOs; a trace (its own arrival times) with
    a rate search: refused."""
    args = argparse.Namespace(
        workload="chat", duration_s=1.0, vocab=500, system_prompt=32, conversations=2, max_prompt=4096,
        max_output=256, burst_every_s=20.0, burst_size=3, trace=None, long_share=None,
    )  # fmt: skip
    with pytest.raises(SystemExit, match="no request arrives"):
        harness.workload(args, rate=1e-6, seed=0)
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"t": 0.0, "prompt_len": 8, "output_len": 4}\n')
    for search in (["--goodput", "0.5,4"], ["--sweep", "1,2"]):
        with pytest.raises(SystemExit):
            harness.main(["--url", "http://x/v1", "--workload", "trace", "--trace", str(trace), *search])


def test_percentiles_are_nearest_rank() -> None:
    assert harness.pct([1.0, 10.0], 90) == 10.0 and harness.pct([1.0, 2.0, 3.0], 50) == 2.0
    assert harness.pct(list(map(float, range(1, 17))), 90) == 15.0 and harness.pct([5.0], 99) == 5.0
    assert harness.pct([], 50) is None


def test_workloads_are_seeded_and_shaped() -> None:
    args = argparse.Namespace(
        workload="mixed", duration_s=60.0, vocab=500, system_prompt=32, conversations=2, max_prompt=4096,
        max_output=256, burst_every_s=20.0, burst_size=3, trace=None, long_share=None,
    )  # fmt: skip
    specs = harness.workload(args, rate=2.0, seed=1)
    assert specs == harness.workload(args, rate=2.0, seed=1)
    assert [s.at_s for s in specs] == sorted(s.at_s for s in specs)
    assert sum(s.kind == "summarize" for s in specs) == 3 * 3 and all(
        2048 <= len(s.prompt) <= 4096 for s in specs if s.kind == "summarize"
    )
    args.workload = "multiturn"
    turns = harness.workload(args, rate=2.0, seed=1)
    assert all(s.prompt[:32] == turns[0].prompt[:32] for s in turns)  # one shared system prompt


def test_long_share_keeps_the_mixed_workloads_mix_at_every_rate() -> None:
    """With --long-share the bursts are a share of the rate (goodput needs one mix scaled), in whole bursts."""
    args = argparse.Namespace(
        workload="mixed", duration_s=4000.0, vocab=500, system_prompt=32, conversations=2, max_prompt=2048,
        max_output=64, burst_every_s=20.0, burst_size=2, trace=None, long_share=0.2,
    )  # fmt: skip
    for rate in (0.5, 2.0):
        specs = harness.workload(args, rate, seed=3)
        long = [s for s in specs if s.kind == "summarize"]
        assert len(specs) == pytest.approx(rate * args.duration_s, rel=0.1)
        assert len(long) / len(specs) == pytest.approx(0.2, abs=0.04) and len(long) % 2 == 0
        times = sorted(s.at_s for s in long)
        partner = [any(abs(abs(t - u) - 0.01) < 1e-9 for u in times) for t in times]
        assert all(partner)  # every long prompt arrives with its burst


def test_replot_reads_saved_runs_and_draws_them_side_by_side(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    records = [
        harness.Record("summarize", 1.0, 900, 200, 2.0, 3.0, 4, token_times_s=[3.0, 3.3, 3.6, 4.0]),
        harness.Record("chat", 0.5, 20, 200, 0.2, 4.5, 5, token_times_s=[0.7, 1.7, 2.7, 3.7, 5.0]),
    ]
    for name in ("co", "pd"):
        (tmp_path / name).mkdir()
        row = harness.summary(0.5, records, 10.0, argparse.Namespace(ttft_slo_s=1.0, tpot_slo_s=0.5))
        saved = {"args": {"ttft_slo_s": 1.0, "tpot_slo_s": 0.5}, "runs": [row],
                 "requests": [[harness.asdict(r) for r in records]]}  # fmt: skip
        (tmp_path / name / "results.json").write_text(json.dumps(saved))
    harness.main(["--replot", f"co={tmp_path / 'co'}", f"pd={tmp_path / 'pd'}", "--out", str(tmp_path / "cmp")])
    assert sorted(p.name for p in (tmp_path / "cmp").iterdir()) == [
        "goodput_vs_rate.png", "itl_over_time.png", "latency_cdf.png",
    ]  # fmt: skip


@pytest.mark.slow
def test_a_smoke_run_against_pdserve(tmp_path: Path) -> None:
    result = harness.main([
        "--serve", "colocated", "--tiny", "--rate", "4", "--duration-s", "2", "--quiet", "--nice", "0", "--seed", "0",
        "--max-prompt", "64", "--max-output", "8", "--vocab", "500", "--out", str(tmp_path),
    ])  # fmt: skip
    (row,) = result["runs"]
    assert row["requests"] >= 2 and row["statuses"] == {"200": row["requests"]}
    assert row["ttft_s_p50"] is not None and row["output_tokens_per_s"] > 0
    saved = json.loads((tmp_path / "results.json").read_text())
    records = saved["requests"][0]
    # Tokens in the first chunk with text have no gap; the tiny model's steps are so fast that a whole 8-token
    # answer can reach the client as one chunk, so a record may have no gap at all (test_sse_accounting pins them).
    assert all(r["output_tokens"] >= 4 and len(r["itl_s"]) <= r["output_tokens"] - 1 for r in records)
    assert (tmp_path / "summary.md").read_text().count("|") > 10


def test_burst_split_separates_chat_during_long_prefills() -> None:
    from harness import Record, burst_split

    burst = Record("summarize", sent_at_s=10.0, prompt_tokens=4000, status=200, ttft_s=2.0)  # prefills 10 -> 12
    during = Record("chat", 9.0, 20, 200, 0.5, 3.5, 4, token_times_s=[9.5, 10.5, 11.5, 12.5])  # 1 s gaps in it
    idle = Record("chat", 20.0, 20, 200, 0.1, 0.3, 3, token_times_s=[20.1, 20.2, 20.3])
    split = burst_split([burst, during, idle])
    assert split["burst_tpot_s_p99"] == pytest.approx(1.0) and split["idle_tpot_s_p99"] == pytest.approx(0.1)
    assert split["burst_itl_s_p99"] == pytest.approx(1.0) and split["idle_itl_s_p99"] == pytest.approx(0.1)
    assert burst_split([idle])["burst_tpot_s_p99"] is None


def test_burst_split_counts_tokens_not_chunks() -> None:
    """A 65-token stream at 20 ms a token, sent as its first token then 16 chunks of 4 (stream_interval 4, or a
    server merging steps under load): TPOT 20 ms and every ITL 20 ms, not 80 (found in review: it divided by the
    chunks). A record saved before the counts were kept reads as one token per chunk."""
    times = [0.1 + 0.08 * i for i in range(17)]
    r = harness.Record("chat", 0.0, 10, status=200, ttft_s=0.1, e2e_s=1.38, output_tokens=65,
                       token_times_s=times, token_counts=[1 + 4 * i for i in range(17)])  # fmt: skip
    split = harness.burst_split([r])
    assert split["idle_tpot_s_p99"] == pytest.approx(0.02) and split["idle_itl_s_p99"] == pytest.approx(0.02)
    old = harness.Record("chat", 0.0, 10, status=200, ttft_s=0.1, e2e_s=1.38, output_tokens=65, token_times_s=times)
    assert harness.burst_split([old])["idle_itl_s_p99"] == pytest.approx(0.08)  # its TPOT: from the usage, 0.02


def test_the_burst_split_reads_the_tables_tpot() -> None:
    """The split's TPOT was per token after the first chunk, the table's (vLLM's) per token after the first token:
    with 4 tokens in the first chunk (a server merging steps for a slow reader) they differed, 20.0 vs 19.05 ms
    under one name (found in review). The split groups the table's."""
    times = [0.1 + 0.08 * i for i in range(16)]  # 64 tokens: 4 in the first chunk, then 4 per 80 ms
    r = harness.Record("chat", 0.0, 10, status=200, ttft_s=0.1, e2e_s=times[-1], output_tokens=64,
                       token_times_s=times, token_counts=[4 * (i + 1) for i in range(16)])  # fmt: skip
    assert harness.burst_split([r])["idle_tpot_s_p99"] == pytest.approx(r.tpot_s) == pytest.approx(1.2 / 63)


def test_no_summarize_request_asks_for_more_than_the_context() -> None:
    """Prompt + output within --max-prompt: 1.5% of summarize requests asked for more, a 400 at any rate counted
    as an SLO miss (found in review)."""
    args = argparse.Namespace(
        workload="summarize", duration_s=600.0, vocab=500, system_prompt=32, conversations=2, max_prompt=8192,
        max_output=256, burst_every_s=20.0, burst_size=3, trace=None, long_share=None,
    )  # fmt: skip
    specs = harness.workload(args, rate=2.0, seed=1)
    assert len(specs) > 500 and all(len(s.prompt) + s.max_tokens <= 8192 for s in specs)
    assert max(len(s.prompt) for s in specs) > 8000


def test_a_goodput_search_needs_both_bounds_run(capsys: pytest.CaptureFixture[str]) -> None:
    """With one step only `lo` ran and was reported as the goodput (0 steps: "even lo missed" with nothing run)."""
    with pytest.raises(SystemExit):
        harness.main(["--url", "http://127.0.0.1:9/v1", "--goodput", "0.5,8", "--goodput-steps", "1"])
    assert "--goodput-steps must be at least 2" in capsys.readouterr().err


def test_a_workload_is_seeded_by_seed_and_rate() -> None:
    """Two rates drawing as many arrivals sent the same prompts (neighbouring goodput steps on one server: a warm
    prefix cache), every rate the same draws scaled (found in review). The same seed and rate still repeat."""
    args = argparse.Namespace(
        workload="chat", duration_s=60.0, vocab=500, system_prompt=0, conversations=1, max_prompt=256,
        max_output=16, trace=None, long_share=None,
    )  # fmt: skip
    a, b = harness.workload(args, 1.0625, seed=0), harness.workload(args, 1.078125, seed=0)
    assert not {tuple(s.prompt) for s in a} & {tuple(s.prompt) for s in b}
    assert harness.workload(args, 1.0625, seed=0) == a


def test_sse_accounting_counts_tokens_from_usage_and_spreads_a_chunk_over_its_gaps() -> None:
    """A chunk of k tokens gives k gaps; a chunk with no text (held-back UTF-8) adds none, its tokens ride on the
    next chunk with text; tokens in the first chunk have no gap; the count comes from usage, never from chunks."""
    import asyncio

    import httpx

    def chunk(text: str | None, completion_tokens: int) -> str:
        choices = [] if text is None else [{"index": 0, "text": text}]
        return "data: " + json.dumps({"choices": choices, "usage": {"completion_tokens": completion_tokens}}) + "\n\n"

    # first chunk: 2 tokens; held back (no text) at 3; then 4 (2 tokens: 3 and 4), 5; the usage-only tail says 5.
    body = [chunk("ab", 2), chunk("", 3), chunk("cd", 4), chunk("e", 5), chunk(None, 5), "data: [DONE]\n\n"]
    transport = httpx.MockTransport(lambda request: httpx.Response(200, content="".join(body).encode()))
    spec = harness.Spec(0.0, [1, 2, 3], 5, "chat")
    record = harness.Record("chat", 0.0, 3)

    async def go() -> None:
        async with httpx.AsyncClient(transport=transport) as client:
            await harness.send(client, "http://test/v1", "m", spec, 0.0, record)

    asyncio.run(go())
    assert record.status == 200 and record.output_tokens == 5 and record.ttft_s is not None
    assert len(record.itl_s) == 3 and len(record.token_times_s) == 3  # gaps for tokens 3, 4 (one chunk) and 5


def test_the_warm_up_goes_first_shares_no_prefix_and_a_failure_stops_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before the first measured run (a goodput search's first rate paid for the server's cold start), `--warmup`
    short requests go at once; their prompts share no prefix with the measured ones (no cache hit is carried into
    the measurement); a warm-up that fails ends the run with its status, before anything is measured."""
    bodies: list[dict] = []

    def answer(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        if len(bodies) > 2:
            return httpx.Response(503, json={"error": {"message": "overloaded"}})
        return httpx.Response(200, content=b"".join(_sse(*(_chunk("a", i) for i in range(1, 9)))))

    async def warm(n: int) -> None:
        async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
            await harness.warm_up(client, "http://x/v1", "m", n, 500)

    asyncio.run(warm(2))
    assert len(bodies) == 2 and all(b["max_tokens"] == 8 and len(b["prompt"]) == 32 for b in bodies)
    args = argparse.Namespace(
        workload="multiturn", duration_s=20.0, max_prompt=4096, max_output=64, vocab=500, system_prompt=64,
        conversations=4, long_share=None, burst_every_s=5.0, burst_size=2,
    )  # fmt: skip
    measured = [s.prompt for s in harness.workload(args, 2.0)]
    assert not any(b["prompt"][:16] == p[:16] for b in bodies for p in measured)
    with pytest.raises(SystemExit, match=r"warm-up request failed.*503"):
        asyncio.run(warm(1))

    order: list[str] = []

    async def fake_warm_up(url: str, model: str, n: int, vocab: int) -> None:
        order.append(f"warm-up x{n}")

    async def fake_run(url: str, model: str, specs: list[harness.Spec], progress: bool) -> tuple[list, float]:
        order.append("run")
        return [harness.Record(s.kind, s.at_s, 1, 200, 0.1, 1.0, 4) for s in specs], 10.0

    monkeypatch.setattr(harness, "_warm_up", fake_warm_up)
    monkeypatch.setattr(harness, "run", fake_run)
    sweep = ["--url", "http://x/v1", "--sweep", "1,2", "--duration-s", "5", "--quiet", "--nice", "0", "--model", "m"]
    harness.main(sweep)
    assert order == ["warm-up x2", "run", "run"]
    order.clear()
    no_warm_up = ["--url", "http://x/v1", "--rate", "2", "--duration-s", "5", "--quiet", "--nice", "0", "--warmup", "0"]
    harness.main([*no_warm_up, "--model", "m"])
    assert order == ["run"]
    order.clear()
    asked: list[str] = []

    def models(url: str, **kwargs: object) -> httpx.Response:  # no --model: the server's first listed model
        asked.append(url)
        listed = {"data": [{"id": "served"}, {"id": "other"}]}
        return httpx.Response(200, json=listed, request=httpx.Request("GET", url))

    monkeypatch.setattr(harness.httpx, "get", models)

    async def named_run(url: str, model: str, specs: list[harness.Spec], progress: bool) -> tuple[list, float]:
        order.append(model)
        return await fake_run(url, model, specs, progress)

    monkeypatch.setattr(harness, "run", named_run)
    harness.main(no_warm_up)
    assert order == ["served", "run"] and asked == ["http://x/v1/models"]


def test_a_client_that_falls_behind_its_schedule_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    """Open loop: each request goes at its scheduled time, unless the client's own loop is late. A send that holds
    the loop 0.4 s delays the ones due meanwhile: their lag is recorded and the summary says the server saw fewer
    arrivals than scheduled (it used to measure such a run as if the rate had been met)."""

    async def blocking_send(client, url, model, spec, start, record) -> None:  # type: ignore[no-untyped-def]
        if spec.at_s == 0.0:
            import time

            time.sleep(0.4)  # the client's loop is busy: nothing else is sent meanwhile
        record.status, record.ttft_s, record.e2e_s, record.output_tokens = 200, 0.01, 0.02, spec.max_tokens

    monkeypatch.setattr(harness, "send", blocking_send)
    specs = [harness.Spec(0.1 * i, [1], 2) for i in range(5)]
    records, wall = asyncio.run(harness.run("http://x/v1", "m", specs, progress=False))
    assert records[0].lag_s < 0.1 and records[1].lag_s > 0.2 and records[3].lag_s > 0.05
    args = argparse.Namespace(workload="chat", ttft_slo_s=1.0, tpot_slo_s=1.0)
    row = harness.summary(10.0, records, wall, args)
    assert row["client_lag_s_p99"] > harness.LAG_WARN_S
    assert "after their scheduled arrival" in harness.markdown([row], args, None)
    on_time = harness.summary(10.0, [harness.Record("chat", 0.0, 1, 200, 0.01, 0.02, 2)], 1.0, args)
    assert "scheduled arrival" not in harness.markdown([on_time], args, None)


def test_latency_cdfs_count_every_request_sent() -> None:
    """Over all requests sent: of 4 sent, 2 refused (no latency), the curve tops out at 0.5 — over the completed
    ones only it reached 1.0, and a mode refusing more looked better."""
    assert harness.cdf_points([0.2, 0.1], 4) == ([0.1, 0.2], [0.25, 0.5])
    assert harness.cdf_points([], 3) == ([], [])
