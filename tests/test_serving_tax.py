"""A seconds-long smoke run of load_tests/serving_tax.py with a tiny model: every system it compares answers in full
and lands in the table, and the queue-aware local prefill it measures really prefills on D, so the benchmark that
reports the serving tax cannot rot unnoticed."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_smoke_run_prints_a_row_per_system(tmp_path: Path) -> None:
    num_requests, output_len = 3, 6
    report = tmp_path / "tax.json"
    command = [
        sys.executable, "load_tests/serving_tax.py", "--tiny", "--num-requests", str(num_requests), "--prompt-len",
        "24", "--output-len", str(output_len), "--pin", "--local-prefill-queue-s", "0", "--seed", "1",
        "--json", str(report),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    table = done.stdout.split("| system | output tok/s |")[-1].splitlines()[2:]  # the final table, after the rule
    table = table[: table.index("")]
    rows = {cells[1].strip(): float(cells[2]) for line in table if (cells := line.split("|"))[1:]}
    names = list(rows)
    assert len(names) == 4 and names[:2] == ["engine alone (AsyncEngine, in process)", "pdserve colocated, HTTP"]
    assert names[2].startswith("pdserve 1P1D, HTTP, P on [")  # the cores depend on the machine
    assert names[3] == names[2] + ", queue-aware local prefill (0.0 s)"
    assert all(tokens_per_s > 0 for tokens_per_s in rows.values())

    full = json.loads(report.read_text())
    systems = {row["system"]: row for row in full["systems"]}
    assert list(systems) == names, "the JSON holds other rows than the table"
    assert list(full["same_round_ratios"]) == [names[0]] and list(full["same_round_ratios"][names[0]]) == names[1:]
    for name, row in systems.items():  # a stream cut short, or one answering a single token, would still show tok/s
        assert row["output_tokens_per_request"] == [output_len] * num_requests, (name, row)
        assert row["output_tokens"] == num_requests * output_len, (name, row)
        assert {"rest", "idle", "steal"} <= row["cpu_s"].keys() and min(row["cpu_s"].values()) >= 0, (name, row)
        assert all(cpu >= 0 for cpu in row["rest_by_process_cpu_s"].values()), (name, row["rest_by_process_cpu_s"])
    for name in names[1:]:  # Ray's daemons run beside every served system and are not a tracked role
        assert {"raylet", "gcs_server"} & systems[name]["rest_by_process_cpu_s"].keys(), systems[name]
    assert "| system | the rest by process" in done.stdout
    # The engines' steps, every system's (none is a peer). After each stream's first token (a prompt step's, on P
    # for 1P1D) come output_len - 1 decode-only steps at most per request, and at least output_len - 1 in all.
    assert "| system | engine busy ms/token |" in done.stdout
    for name, row in systems.items():
        steps = row["engine_steps"]
        assert steps["busy_s"] > steps["decode_step_s"] > 0, (name, steps)
        assert output_len - 1 <= steps["decode_steps"] <= num_requests * (output_len - 1), (name, steps)
        assert 1 <= steps["steps"] - steps["decode_steps"] <= num_requests * 24, (name, steps)  # 24-token prompts
    decisions = {name: row["router_decisions"] for name, row in systems.items()}
    assert decisions[names[0]] is None  # no ingress, no router
    for name in names[2:]:  # every measured request routed once (the warm-ups are not counted)
        assert sum(decisions[name].values()) == num_requests, (name, decisions[name])
    assert decisions[names[2]].get("local", 0) == 0, decisions[names[2]]  # local_prefill_max_tokens 0: all via P
    assert decisions[names[3]].get("local", 0) >= 1, f"the queue-aware system never prefilled on D: {decisions}"


def test_same_round_ratios_pair_each_round_with_itself() -> None:
    sys.path.insert(0, str(ROOT / "load_tests"))
    from serving_tax import paired_ratios, paired_table

    per_round = {"engine": [100.0, 200.0, 300.0], "colocated": [250.0, 120.0, 330.0], "vllm": [200.0, 100.0, 300.0]}
    ratios = paired_ratios(per_round, "engine")
    assert ratios.keys() == {"colocated", "vllm"}
    assert ratios["colocated"] == pytest.approx([2.5, 0.6, 1.1]) and ratios["vllm"] == pytest.approx([2.0, 0.5, 1.0])
    lines = paired_table(per_round, ["engine", "vllm"]).splitlines()
    assert lines[0].count("same round") == 2 and len(lines) == 2 + 3
    # Median of the same-round ratios (1.10), not the ratio of the medians (250 / 200 = 1.25).
    assert lines[3] == "| colocated | 1.10 (0.60-2.50) | 1.20 (1.10-1.25) |"
    assert lines[2] == "| engine | — | 1.00 (0.50-2.00) |" and lines[4] == "| vllm | 1.00 (0.50-2.00) | — |"


class FakeProcess:
    def __init__(self, cmdline: list[str], name: str = "?") -> None:
        self._cmdline, self._name = cmdline, name

    def cmdline(self) -> list[str]:
        return self._cmdline

    def name(self) -> str:
        return self._name


def test_the_rest_is_named_by_process_and_excludes_the_tracked_ones() -> None:
    sys.path.insert(0, str(ROOT / "load_tests"))
    from serving_tax import process_label, rest_by_process

    assert process_label(FakeProcess(["ray::ServeController.run_control_loop", "x"])) == "ray::ServeController"  # type: ignore[arg-type]
    agent = ["/venv/bin/python3.11", "-u", "/venv/ray/dashboard/agent.py", "--node-ip-address=1"]
    assert process_label(FakeProcess(agent)) == "agent.py"  # type: ignore[arg-type]
    assert process_label(FakeProcess(["/venv/ray/core/src/ray/raylet/raylet", "--x"])) == "raylet"  # type: ignore[arg-type]
    assert process_label(FakeProcess([], "kworker/0:1")) == "kworker/0:1"  # type: ignore[arg-type]

    before = {1: ("raylet", 10.0), 2: ("ray::IDLE", 5.0), 3: ("engine", 100.0), 4: ("gone", 7.0)}
    after = {1: ("raylet", 10.5), 2: ("ray::ServeReplica", 6.0), 3: ("engine", 130.0), 5: ("haproxy", 0.25)}
    rest = rest_by_process(before, after, tracked={3})
    # pid 2 became an actor (retitled): its delta under the new title; pid 4 ended: nothing; pid 3 is tracked.
    assert rest == {"ray::ServeReplica": 1.0, "raylet": 0.5, "haproxy": 0.25}
    assert list(rest) == ["ray::ServeReplica", "raylet", "haproxy"]


def test_warm_ups_stay_out_of_the_measured_prompts_and_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The HTTP warm-up sends its own prompt (it sent the first 16 tokens of a measured one: a prefix-cache hit the
    engine alone never got), and the engine alone's CPU per token counts the measured requests only (its warm-up
    of --output-len tokens ran inside the CPU window)."""
    import asyncio
    import time
    import types

    import pdserve.engine.async_engine as async_engine
    from pdserve.engine.request import LoadCounters

    sys.path.insert(0, str(ROOT / "load_tests"))
    import serving_tax

    sent: list[list[int]] = []

    async def one_http(client: object, url: str, model: str, prompt: list[int], max_tokens: int) -> object:
        sent.append(list(prompt))
        return serving_tax.Sample(0.0, 0.0, max_tokens)

    monkeypatch.setattr(serving_tax, "one_http", one_http)
    prompts = [list(range(1000 + 64 * i, 1064 + 64 * i)) for i in range(3)]
    asyncio.run(serving_tax.http_load("http://127.0.0.1:9/v1", "m", prompts, 8))
    assert sent[0] == serving_tax.WARMUP_PROMPT and sorted(sent[1:]) == prompts

    class Out:
        new_token_ids = (7,)

    class BusyEngine:  # 5 ms of CPU per token, warm-up included; a decode step per token
        def __init__(self, factory: object, threads: object) -> None:
            self.load = LoadCounters()

        async def generate(self, request):  # type: ignore[no-untyped-def]
            for _ in range(request.sampling.max_tokens):
                start = time.process_time()
                while time.process_time() - start < 0.005:
                    pass
                self.load.count_step(0, 1, 0.005)
                yield Out()
                await asyncio.sleep(0)

        async def stats(self) -> object:
            return types.SimpleNamespace(load=self.load.copy())

        def shutdown(self) -> None: ...

    monkeypatch.setattr(async_engine, "AsyncEngine", BusyEngine)
    result = serving_tax.engine_alone("unused", "float32", prompts, 32, None)
    tokens = sum(s.num_tokens for s in result.samples)
    assert tokens == 3 * 32
    assert result.cpu_s["engine"] / tokens < 0.0056, result.cpu_s  # 5 ms + the loop's; a 32-token warm-up: 6.7 ms
    assert result.steps == {"busy_s": pytest.approx(0.005 * tokens), "steps": tokens, "decode_steps": tokens,
                            "decode_step_s": pytest.approx(0.005 * tokens)}  # fmt: skip


def test_the_machines_cpu_is_the_cores_this_process_may_use(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under a cpuset (a container given 2 of a host's 64 cores) the machine's busy, idle and steal are those of the
    cores the benchmark's processes can run on: summing the host's every core counted 62 cores' idle time as the
    engines' waiting, and other tenants' work as the rest."""
    import collections
    import os

    import psutil

    sys.path.insert(0, str(ROOT / "load_tests"))
    import serving_tax

    Times = collections.namedtuple("Times", "user nice system idle iowait steal guest guest_nice")
    host = [Times(10.0 * (i + 1), 0.0, 1.0, 100.0, 2.0, 0.5, 0.0, 0.0) for i in range(4)]
    monkeypatch.setattr(psutil, "cpu_times", lambda percpu=False: host if percpu else None)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {1, 3})
    busy, idle, steal = serving_tax.machine_cpu()
    assert (busy, idle, steal) == pytest.approx((20.0 + 1 + 40.0 + 1, 2 * 102.0, 2 * 0.5))


def _stream(*events: object, done: bool = True) -> bytes:
    lines = [f"data: {json.dumps(e)}\n\n" for e in events] + (["data: [DONE]\n\n"] if done else [])
    return "".join(lines).encode()


def _text(text: str) -> dict[str, object]:
    return {"id": "c", "object": "text_completion", "created": 0, "model": "m", "usage": None,
            "choices": [{"index": 0, "text": text, "finish_reason": None, "logprobs": None}]}  # fmt: skip


def _usage(tokens: int) -> dict[str, object]:
    usage = {"prompt_tokens": 2, "completion_tokens": tokens, "total_tokens": 2 + tokens}
    return {"id": "c", "object": "text_completion", "created": 0, "model": "m", "choices": [], "usage": usage}


FULL = _stream(_text("a"), _text(""), _text("bc"), _usage(3))  # a held-back token (no text), then two in one chunk


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (FULL, None),
        (_stream(_text("a"), _text("bc"), _usage(3), done=False), "no [DONE]"),  # the raw client's check
        (_stream(_text("a"), _usage(2)), "2 of 3 tokens"),
        (_stream(_usage(3)), "no text"),
    ],
)
def test_both_load_clients_read_a_stream_alike_and_refuse_a_short_one(body: bytes, error: str | None) -> None:
    """The raw client (the default) and the openai client count tokens from the usage, time the first and last
    chunks with text, and fail a stream cut short (it would count as a fast one)."""
    import asyncio

    import httpx
    import openai

    sys.path.insert(0, str(ROOT / "load_tests"))
    import serving_tax

    transport = httpx.MockTransport(lambda request: httpx.Response(200, content=body))

    async def read(kind: str) -> object:
        async with httpx.AsyncClient(transport=transport) as http:
            if kind == "raw":
                return await serving_tax.one_http(http, "http://x/v1", "m", [1, 2], 3)
            sdk = openai.AsyncOpenAI(base_url="http://x/v1", api_key="k", http_client=http, max_retries=0)
            return await serving_tax.one_openai(sdk, "m", [1, 2], 3)

    for kind in ("raw", "openai"):
        if error is None:
            sample = asyncio.run(read(kind))
            assert sample.num_tokens == 3 and sample.ttft_s >= 0 and sample.tpot_s >= 0, kind
        elif kind == "raw" or error != "no [DONE]":  # the openai client stops at its own end of stream
            with pytest.raises(RuntimeError, match=re.escape(error)):
                asyncio.run(read(kind))

    def refuse(request: httpx.Request) -> httpx.Response:
        return httpx.Response(429, json={"error": {"message": "busy"}})

    async def refused() -> object:
        async with httpx.AsyncClient(transport=httpx.MockTransport(refuse)) as http:
            return await serving_tax.one_http(http, "http://x/v1", "m", [1, 2], 3)

    with pytest.raises(RuntimeError, match="HTTP 429"):
        asyncio.run(refused())


def test_each_load_client_sends_its_own_prompts_in_an_order_alternating_by_round(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """With two clients, the second measurement of a server would hit the prefix cache the first filled if they
    sent the same prompts (it read 245 tok/s against 137); so each client gets its own, pdserve's and the peers'
    alike, and the clients swap places every round (the first measurement after a deploy may pay for it)."""
    sys.path.insert(0, str(ROOT / "load_tests"))
    import serving_tax

    sent: list[tuple[str, str, list[list[int]]]] = []  # (system, client, prompts)

    def result(name: str, prompts: list[list[int]]) -> object:
        samples = [serving_tax.Sample(0.1, 0.01, 4) for _ in prompts]
        return serving_tax.Result(name, samples, 1.0, {"engine": 0.1, "client": 0.1, "rest": 0.0})

    def measured(name, url, model, prompts, max_tokens, app, client="raw"):  # type: ignore[no-untyped-def]
        sent.append((name, client, prompts))
        return result(name, prompts)

    def serve_systems(args, front, path, dtype, prompts):  # type: ignore[no-untyped-def]
        return [measured(f"pdserve{serving_tax.CLIENTS[c]}", "u", "m", p, 4, None, c) for c, p in prompts.items()]

    monkeypatch.setattr(serving_tax, "measured", measured)
    monkeypatch.setattr(serving_tax, "serve_systems", serve_systems)
    monkeypatch.setattr(serving_tax, "engine_alone", lambda path, dtype, prompts, n, t: result("engine", prompts))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    argv = ["serving_tax.py", "--tiny", "--num-requests", "2", "--prompt-len", "8", "--output-len", "4",
            "--rounds", "2", "--client", "raw", "--client", "openai", "--peer", "v=http://h:9/v1"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    serving_tax.main()

    assert [client for _, client, _ in sent] == ["raw", "openai"] * 2 + ["openai", "raw"] * 2
    for round_ in (sent[:4], sent[4:]):
        by_client = {client: prompts for _, client, prompts in round_}
        assert by_client["raw"] != by_client["openai"]
        for name, client, prompts in round_:  # pdserve and the peer: the same prompts for the same client
            assert prompts == by_client[client], name
    assert not {tuple(p) for _, _, ps in sent[:4] for p in ps} & {tuple(p) for _, _, ps in sent[4:] for p in ps}
