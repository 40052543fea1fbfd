"""Many requests at once through real HTTP on a local Ray cluster (tiny Llama): mixed-length greedy requests are
token-exact in colocated, 1P1D, 1P1D with queue-aware local prefill (the decode replica prefills whatever it would
finish sooner than the prefill replica) and 2P2D modes (its engines prefill shortest-first, in 48-token steps, and move
KV over TCP), and a
storm of clients hanging up at random phases (queued, reserving, prefilling, pushing, decoding) leaves no block held
or reserved on any replica and nothing in flight in the router; greedy requests afterwards are still exact."""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from oracle import HTTP_MAX_TOKENS, random_prompts
from serving import Served, deploy, greedy_text, live_engine_replicas, reporting_replicas, shared_serve

pytestmark = [pytest.mark.slow, pytest.mark.serve_cluster]
MAX_TOKENS = HTTP_MAX_TOKENS  # what the `oracle` fixture (conftest.py) generates
MODES = ("colocated", "1p1d", "1p1d-queue-aware", "1p1d-lent", "2p2d")
CORES = sorted(os.sched_getaffinity(0))
NUM_STORM = 1000


@pytest.fixture(scope="module")
def apps(tiny_models: dict[str, Path]) -> Iterator[dict[str, Served]]:

    from pdserve.serve.config import ServeConfig

    common: dict[str, Any] = {
        "model": str(tiny_models["llama"]), "dtype": "float32", "served_model_name": "tiny", "num_kv_blocks": 400,
        "router": {"local_prefill_max_tokens": 0},
    }  # fmt: skip
    two = {"num_replicas": 2}
    configs = {
        "colocated": ServeConfig(**common, colocated=True),
        "1p1d": ServeConfig(**common),
        "1p1d-queue-aware": ServeConfig(
            **{**common, "router": {"local_prefill_max_tokens": 0, "local_prefill_queue_s": 0.0}}
        ),
        # P and D pinned to a core each, lending it while idle (engine/cores.py): steps change thread counts as the
        # other side comes and goes; and the push pipelined with the prompt's layers, which hang-ups cut short
        "1p1d-lent": ServeConfig(
            **{**common, "router": {"local_prefill_max_tokens": 0, "local_prefill_queue_s": 0.0}},
            kv_pipelined_push=True,
            prefill={"cpus": CORES[:1]},
            decode={"cpus": CORES[1:2] or CORES[:1]},
            ingress={"cpus": CORES[:1]},  # beside P (what streams every token stays off D's core)
            lend_idle_cores=len(CORES) > 1,
        ),
        # shortest_prefill_first in small steps: short prompts overtake long ones' remaining chunks, under the same
        # exactness and hang-up checks as arrival order elsewhere; KV over TCP (the cross-node transport: pooled
        # connections from two senders to two receivers), which no other test carried end to end under load
        "2p2d": ServeConfig(
            **common,
            prefill=two,
            decode=two,
            kv_transport="tcp",
            scheduling_policy="shortest_prefill_first",
            max_num_batched_tokens=48,
        ),
    }
    with shared_serve() as port:
        deploy({name: (config, f"/{name}") for name, config in configs.items()})
        engines = {"colocated": 1, "1p1d": 2, "1p1d-queue-aware": 2, "1p1d-lent": 2, "2p2d": 4}
        yield {
            name: Served(f"http://127.0.0.1:{port}/{name}/v1", num_engine_replicas=engines[name]) for name in configs
        }


async def _complete(client: openai.AsyncOpenAI, prompt: list[int]) -> str:
    return await greedy_text(client, "tiny", prompt, MAX_TOKENS)


async def _exact_wave(served: Served, prompts: list[list[int]]) -> list[str]:
    client = openai.AsyncOpenAI(base_url=served.base_url, api_key="unused", max_retries=0, timeout=300)
    try:
        return list(await asyncio.gather(*(_complete(client, p) for p in prompts)))
    finally:
        await client.close()


def _mixed_prompts(seed: int, n: int) -> list[list[int]]:
    """Lengths 1..100; the second half repeats prompts of the first or extends their prefixes, so prefix-cache
    hits leave anything from 1 token to the whole suffix to compute."""
    rng = random.Random(seed)
    first = random_prompts([rng.randint(1, 100) for _ in range(n // 2)], 512, seed=seed)
    tails = random_prompts([rng.randint(1, 20) for _ in range(n - n // 2)], 512, seed=seed + 1)
    second = [rng.choice(first) if rng.random() < 0.5 else rng.choice(first)[: rng.randint(1, 40)] + t for t in tails]
    return first + second


@pytest.mark.parametrize("mode", MODES)
def test_concurrent_mixed_lengths_are_exact(apps: dict[str, Served], oracle, mode: str) -> None:  # type: ignore[no-untyped-def]
    prompts = _mixed_prompts(seed=70, n=72)
    got = asyncio.run(_exact_wave(apps[mode], prompts[:36])) + asyncio.run(_exact_wave(apps[mode], prompts[36:]))
    wrong = [i for i, (p, text) in enumerate(zip(prompts, got, strict=True)) if text != oracle(p)]
    assert not wrong, f"{mode}: {len(wrong)} of {len(prompts)} responses differ from transformers: {wrong}"
    _assert_idle(apps[mode], mode, timeout_s=5)
    if mode == "1p1d-queue-aware":
        assert set(_route_modes(apps[mode])) == {"local", "disaggregated"}, _route_modes(apps[mode])
    if mode == "1p1d-lent" and len(CORES) > 1:  # cores were lent and handed back
        metrics = apps[mode].fresh_metrics()
        assert sum(metrics["pdserve_borrowed_core_steps_total"].values()) > 0, metrics


def _route_modes(served: Served) -> dict[str, float]:
    """The router's decisions so far by mode (local: the decode replica prefilled; disaggregated: through P)."""
    decisions = served.metrics().get("pdserve_router_decisions_total", {})
    modes: dict[str, float] = {}
    for labels, n in decisions.items():
        mode = dict(labels)["mode"]
        modes[mode] = modes.get(mode, 0) + n
    return modes


STORM_TOKENS = 64


Sent = tuple[list[list[int]], int, bool, str, bytes]  # a storm request: prompts, n, stream, outcome, bytes received


async def _hang_up(
    client: httpx.AsyncClient, url: str, prompts: list[list[int]], n: int, after_s: float, stream: bool
) -> tuple[str, bytes]:
    """Send a request (one prompt, or a batch of them; `n` choices each) and drop the connection after `after_s` (or
    at its first streamed byte when 0). Returns the outcome and the bytes received (a stream asks for its usage at the
    end)."""
    body = {"model": "tiny", "prompt": prompts[0] if len(prompts) == 1 else prompts, "n": n,
            "max_tokens": STORM_TOKENS, "temperature": 0, "stream": stream, "ignore_eos": True,
            **({"stream_options": {"include_usage": True}} if stream else {})}  # fmt: skip
    received = bytearray()

    async def run() -> str:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:  # a refused request exercises nothing: the storm counts it apart
                return f"status {response.status_code}: {(await response.aread())[:200]!r}"
            async for data in response.aiter_bytes():
                received.extend(data)
                if after_s == 0:
                    return "first-byte"
        return "finished"

    try:
        outcome = await asyncio.wait_for(run(), after_s if after_s > 0 else 60)
    except (TimeoutError, httpx.HTTPError):
        outcome = "hung-up"
    return outcome, bytes(received)


def _received(data: bytes, stream: bool) -> tuple[dict[int, str], int | None, list[str]]:
    """What a storm request received: each choice's text by index (a cut stream's whole events only), the usage's
    completion tokens (None: not received) and any error messages."""
    texts: dict[int, str] = {}
    if not stream:
        if not data:
            return texts, None, []
        body = json.loads(data)  # only a finished request's bytes are read whole
        if "error" in body:
            return texts, None, [str(body["error"])]
        for choice in body["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
        return texts, body["usage"]["completion_tokens"], []
    tokens, errors = None, []
    *events, _partial = data.split(b"\n\n")  # the last piece: an event cut short, or empty
    for event in events:
        payload = event.removeprefix(b"data: ")
        if payload == b"[DONE]" or not payload.strip():
            continue
        chunk = json.loads(payload)
        if "error" in chunk:
            errors.append(str(chunk["error"]))
            continue
        for choice in chunk["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
        tokens = chunk["usage"]["completion_tokens"] if chunk.get("usage") else tokens
    return texts, tokens, errors


async def _storm(served: Served, seed: int) -> tuple[dict[str, int], list[Sent]]:
    """NUM_STORM requests in waves of 100, each dropped at a random time; a fifth of them batches of 2 or 3 prompts
    (repeats and shared prefixes among them) and some with 2 choices each, so hang-ups also cut a batch between its
    first prompt's first token and the others' start, and a prompt's followers. The outcomes counted, and every
    request's (prompts, n, stream, outcome, bytes received)."""
    rng = random.Random(seed)
    prompts = _mixed_prompts(seed, 64)
    url = f"{served.base_url}/completions"
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
    outcomes: dict[str, int] = {}
    sent: list[Sent] = []
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        for _wave in range(NUM_STORM // 100):
            delays = [rng.choice([0.0, rng.uniform(0.001, 0.05), rng.uniform(0.05, 1.0)]) for _ in range(100)]
            # One in twenty stays to the end, beside the hang-ups: its whole response is checked (none finished
            # within the hang-up times, so the storm's survivors were never compared with the oracle)
            delays = [60.0 if rng.random() < 0.05 else d for d in delays]
            wave = [
                (rng.choices(prompts, k=1 if rng.random() < 0.8 else rng.randint(2, 3)),
                 2 if rng.random() < 0.15 else 1, rng.random() < 0.7)
                for _ in delays
            ]  # fmt: skip
            results = await asyncio.gather(
                *(_hang_up(client, url, p, n, d, s) for (p, n, s), d in zip(wave, delays, strict=True))
            )
            for (batch, n, stream), (outcome, data) in zip(wave, results, strict=True):
                outcomes[outcome] = outcomes.get(outcome, 0) + 1
                sent.append((batch, n, stream, outcome, data))
    return outcomes, sent


def _wrong_in_storm(oracle, sent: list[Sent]) -> list[str]:  # type: ignore[no-untyped-def]
    """The storm's responses that carried wrong tokens: a finished one must carry every choice (index prompt * n +
    choice), each the oracle's whole text for its prompt, with its usage's token count and no error event; one cut
    short, a beginning of each (the storm's survivors were never checked before: a late write could put wrong tokens
    into a 200 there; found in review)."""
    wrong = []
    for i, (prompts, n, stream, outcome, data) in enumerate(sent):
        texts, tokens, errors = _received(data, stream)
        wants = [oracle(prompt, STORM_TOKENS) for prompt in prompts for _ in range(n)]
        if errors:
            wrong.append(f"{i}: error {errors}")
        elif set(texts) - set(range(len(wants))):
            wrong.append(f"{i}: choices {sorted(texts)} for {len(prompts)} prompts x {n}")
        elif outcome == "finished" and (
            [texts.get(j) for j in range(len(wants))] != wants or tokens != STORM_TOKENS * len(wants)
        ):
            wrong.append(f"{i}: finished with {tokens} tokens {texts!r}, expected {[str(w) for w in wants]!r}")
        elif outcome != "finished" and not all(w.admits_prefix(texts.get(j, "")) for j, w in enumerate(wants)):
            wrong.append(f"{i}: cut short at {texts!r}, which does not begin {[str(w) for w in wants]!r}")
    return wrong


def _idle_state(served: Served, live: set[str] | None = None) -> dict[str, float]:
    """What is still held or running, summed over the replicas, from a snapshot asked for after this call; and which
    engine replicas it lacks: with `live` (the ids of the app's live engine replicas, after a test killed one), each
    of them and no other; else `served.num_engine_replicas` of them when set, at least one when not. A replica that
    is not reporting (its stats call failed or timed out) cannot pass for an idle one."""
    metrics = served.fresh_metrics(check_count=False)
    reporting = reporting_replicas(metrics)
    want = served.num_engine_replicas
    if live is not None:
        missing = len(live ^ reporting)
    elif want is not None:
        missing = abs(want - len(reporting))
    else:
        missing = 0 if reporting else 1
    state: dict[str, float] = {"engine replicas not reporting": missing}
    # Admission's share: prompt tokens admitted and not yet started (a request left holding one: 429s for ever after).
    names = ["pdserve_kv_blocks_used", "pdserve_kv_blocks_held", "pdserve_kv_blocks_reserved",
             "pdserve_kv_blocks_fenced", "pdserve_num_requests_running", "pdserve_num_requests_waiting",
             "pdserve_admission_queued_tokens"]  # fmt: skip
    roles = {dict(labels).get("role") for labels in metrics.get("pdserve_kv_blocks_total", {})}
    if roles & {"prefill", "decode"}:  # a disaggregated app's ingress routes (a colocated one has no router)
        names.append("pdserve_router_in_flight")
    for name in names:
        # A family no longer rendered (renamed, its collector gone) must not read as idle
        state[name] = sum(metrics[name].values()) if name in metrics else float("nan")
    return state


def _assert_idle(served: Served, label: str, timeout_s: float, app: str | None = None) -> float:
    """Wait until every replica is idle (the ingress refreshes replica stats every second); seconds it took. `app`
    (the Serve app's name), where a test killed a replica: every live engine replica of it must report, whatever
    their number while the killed one's replacement starts (`_idle_state`)."""

    def state() -> dict[str, float]:
        return _idle_state(served, live_engine_replicas(app) if app is not None else None)

    start = time.monotonic()
    now = state()
    while any(now.values()) and time.monotonic() - start < timeout_s:
        time.sleep(0.2)
        now = state()
    assert not any(now.values()), f"{label}: not idle {timeout_s} s after the last request: {now}"
    return time.monotonic() - start


def test_the_idle_check_needs_every_replica_reporting() -> None:
    """`_idle_state` on crafted snapshots: a replica missing from the stats (its call failed) is not idle, nor is an
    extra one (a dead replica's stats kept), nor none at all; after a kill, exactly the live replicas must report."""

    families = ["pdserve_kv_blocks_used", "pdserve_kv_blocks_held", "pdserve_kv_blocks_reserved",
                "pdserve_kv_blocks_fenced", "pdserve_num_requests_running", "pdserve_num_requests_waiting",
                "pdserve_admission_queued_tokens", "pdserve_router_in_flight"]  # fmt: skip
    left_out: set[str] = set()

    class Snapshot(Served):
        def fresh_metrics(self, timeout_s: float = 15.0, check_count: bool = True):  # type: ignore[no-untyped-def]
            reporting = [r for r in (self.api_key or "").split(",") if r]
            idle = {name: {(("replica", "a"),): 0.0} for name in families if name not in left_out}
            return {"pdserve_kv_blocks_total": {(("replica", r), ("role", "decode")): 100.0 for r in reporting},
                    **idle}  # fmt: skip

    def busy(reporting: str, want: int | None, live: set[str] | None = None) -> bool:
        return any(_idle_state(Snapshot("http://x/v1", api_key=reporting, num_engine_replicas=want), live).values())

    for name in families:  # a family no longer rendered is not an idle one
        left_out.add(name)
        assert busy("a,b", 2), name
        left_out.clear()

    assert not busy("a,b", 2) and not busy("a,b", None) and not busy("a", None) and busy("", None)
    assert busy("a", 2) and busy("a,b,c", 2)  # one not reporting; one too many
    # b was killed: the survivors a and c, and b's replacement d once it is up, must all report
    assert not busy("a,c", 3, live={"a", "c"}) and not busy("a,c,d", 3, live={"a", "c", "d"})
    assert busy("a", 3, live={"a", "c"}) and busy("a,c", 3, live={"a", "c", "d"}) and busy("a,b,c", 3, live={"a", "c"})


def test_the_storm_check_finds_wrong_cut_and_errored_responses() -> None:
    """`_wrong_in_storm` itself: whole and cut responses that match pass, batches and n included; a wrong text, a
    short count, a cut stream that does not begin the text, an error event after a 200, a missing or extra choice and
    a batch's choices in the wrong places do not."""

    class Want(str):
        def admits_prefix(self, partial: str) -> bool:
            return self.startswith(partial)

    def sse(*texts: str | tuple[int, str], tokens: int | None = None, error: bool = False, cut: bool = False) -> bytes:
        pieces = [t if isinstance(t, tuple) else (0, t) for t in texts]
        events: list[dict[str, Any]] = [{"choices": [{"index": j, "text": t}], "usage": None} for j, t in pieces]
        events += [{"choices": [], "usage": {"completion_tokens": tokens}}] if tokens is not None else []
        events += [{"error": {"message": "boom"}}] if error else []
        data = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
        return data + (b'data: {"choi' if cut else b"data: [DONE]\n\n")

    def whole(*texts: str, tokens: int) -> bytes:
        choices = [{"index": j, "text": t} for j, t in enumerate(texts)]
        return json.dumps({"choices": choices, "usage": {"completion_tokens": tokens}}).encode()

    oracle = lambda prompt, max_tokens: Want({1: "abcdef", 2: "uvwxyz"}[prompt[0]])  # noqa: E731
    good = [([[1]], 1, True, "finished", sse("ab", "cd", "ef", tokens=STORM_TOKENS)),
            ([[1]], 1, False, "finished", whole("abcdef", tokens=STORM_TOKENS)),
            ([[1]], 1, True, "hung-up", sse("ab", "c", cut=True)), ([[1]], 1, False, "hung-up", b""),
            ([[1], [2]], 2, False, "finished", whole("abcdef", "abcdef", "uvwxyz", "uvwxyz", tokens=4 * STORM_TOKENS)),
            ([[2], [1]], 1, True, "finished", sse((1, "abc"), (0, "uvwxyz"), (1, "def"), tokens=2 * STORM_TOKENS)),
            ([[2], [1]], 1, True, "hung-up", sse((1, "ab"), cut=True))]  # fmt: skip
    assert _wrong_in_storm(oracle, good) == []
    bad = [([[1]], 1, True, "finished", sse("ab", "cX", "ef", tokens=STORM_TOKENS)),
           ([[1]], 1, False, "finished", whole("abcdef", tokens=STORM_TOKENS - 1)),
           ([[1]], 1, True, "first-byte", sse("abd", cut=True)),
           ([[1]], 1, True, "finished", sse("ab", tokens=None, error=True)),
           ([[1], [2]], 1, False, "finished", whole("abcdef", tokens=2 * STORM_TOKENS)),  # a prompt's choice missing
           ([[1], [2]], 1, False, "finished", whole("uvwxyz", "abcdef", tokens=2 * STORM_TOKENS)),  # swapped
           ([[1]], 2, True, "hung-up", sse((2, "ab"), cut=True)),  # an index past the batch
           ([[1], [2]], 2, True, "hung-up", sse((1, "ab"), (2, "uvw"), (3, "ab"), cut=True))]  # fmt: skip
    assert [line.split(":")[0] for line in _wrong_in_storm(oracle, bad)] == [str(i) for i in range(len(bad))]


@pytest.mark.parametrize("mode", ["colocated", "1p1d", "1p1d-queue-aware", "1p1d-lent", "2p2d"])
def test_disconnect_storm_leaks_nothing(apps: dict[str, Served], oracle, mode: str) -> None:  # type: ignore[no-untyped-def]
    served = apps[mode]
    routed = _route_modes(served)
    aborted = served.settled_total("pdserve_requests_aborted_total")
    outcomes, sent = asyncio.run(_storm(served, seed=99))
    storm_end = time.monotonic()
    # Idle must show within 2 s of the storm, plus the wait for a replica snapshot taken after it (a refresh, 1 s).
    settle_s = _assert_idle(served, f"{mode} after {NUM_STORM} hang-ups", timeout_s=4.0)
    num_aborted = served.settled_total("pdserve_requests_aborted_total") - aborted
    print(f"{mode}: storm outcomes {outcomes}; {num_aborted:.0f} aborted in engines; idle {settle_s:.2f} s after")
    assert set(outcomes) <= {"hung-up", "first-byte", "finished"}, outcomes  # every request was accepted
    assert outcomes.get("finished", 0) >= NUM_STORM // 50, outcomes  # whole responses to compare
    assert outcomes.get("hung-up", 0) + outcomes.get("first-byte", 0) > NUM_STORM // 2
    # Hang-ups reached the engines (20-33% did at this storm's timings; the rest leave while queued or routed).
    assert num_aborted >= NUM_STORM // 10
    if mode in ("1p1d-queue-aware", "1p1d-lent"):  # hang-ups hit both paths: D's own prefill and the handoff
        during = {m: n - routed.get(m, 0) for m, n in _route_modes(served).items()}
        assert min(during.get("local", 0), during.get("disaggregated", 0)) > 50, during
    metrics = served.metrics()
    fenced = {
        (name, labels): value
        for name in (
            "pdserve_kv_fenced_writes_total",
            "pdserve_kv_fenced_aborts_total",
            "pdserve_kv_reaped_leases_total",
            "pdserve_kv_reaped_held_total",
        )
        for labels, value in metrics.get(name, {}).items()
    }
    assert sum(metrics.get("pdserve_kv_fenced_writes_total", {}).values()) == 0, fenced  # nothing wrote late
    wrong = _wrong_in_storm(oracle, sent)
    assert not wrong, f"{mode}: {len(wrong)} of {len(sent)} storm responses carried wrong tokens: {wrong[:5]}"
    prompts = _mixed_prompts(seed=5, n=16)
    got = asyncio.run(_exact_wave(served, prompts))
    assert got == [oracle(p) for p in prompts]
    assert time.monotonic() - storm_end < 120


@pytest.fixture(scope="module")
def greedy_reference(tiny_models: dict[str, Path]):  # type: ignore[no-untyped-def]
    """(tokenizer, prompt ids -> transformers' greedy token ids, STOP_MAX_TOKENS of them, EOS not stopping)."""
    from transformers import AutoTokenizer

    from oracle import load_reference_model, reference_greedy

    model = load_reference_model(tiny_models["llama"])
    return AutoTokenizer.from_pretrained(tiny_models["llama"]), lambda p: reference_greedy(model, p, 12).token_ids


def _stop_case(
    rng: random.Random, tokenizer: Any, prompts: list[list[int]], references: list[list[int]]
) -> tuple[dict, list[tuple]]:  # type: ignore[type-arg]
    """A random request with stop strings (mostly cut from its first prompt's expected text, so they hit),
    min_tokens, include_stop_str_in_output, n, logprobs and max_tokens from 1, over one prompt or a batch of them;
    and what each prompt's choices must answer, by the per-token oracle (test_detokenizer's): (text, finish reason,
    tokens taken)."""
    from test_detokenizer import oracle, stop_with_min_tokens, texts_after_each_token

    max_tokens = rng.choice([1, rng.randint(2, 12), 12])
    whole = oracle(tokenizer, prompts[0], references[0][:max_tokens])
    stop = []
    for _ in range(rng.choice([0, 1, 1, 2])):
        if whole and rng.random() < 0.8:
            start = rng.randrange(len(whole))
            stop.append(whole[start : start + rng.randint(1, 4)])
        else:
            stop.append(rng.choice(["e", "th", "zzq", "\n"]))
    body = {
        "model": "tiny", "prompt": prompts if len(prompts) > 1 else prompts[0], "max_tokens": max_tokens,
        "temperature": 0, "stop": stop, "min_tokens": rng.choice([0, 0, rng.randint(0, max_tokens)]),
        "include_stop_str_in_output": rng.random() < 0.3, "n": rng.choice([1, 1, 2]), "stream": rng.random() < 0.6,
        "ignore_eos": True,
    }  # fmt: skip
    if rng.random() < 0.5:
        body["logprobs"] = 0
    if body["stream"]:
        body["stream_options"] = {"include_usage": True}
    wants = []
    for prompt, reference in zip(prompts, references, strict=True):
        output = reference[:max_tokens]
        texts = texts_after_each_token(tokenizer, prompt, output)
        text, stopped, num_tokens = stop_with_min_tokens(
            texts, oracle(tokenizer, prompt, output), stop, body["min_tokens"], body["include_stop_str_in_output"]
        )
        wants.append((text, "stop" if stopped else "length", num_tokens if stopped else max_tokens))
    return body, wants


async def _answer(client: httpx.AsyncClient, url: str, body: dict) -> tuple[list, int, int]:  # type: ignore[type-arg]
    """Each choice's (text, finish reason, logprob tokens or None) by index, and usage's completion and prompt
    tokens."""
    texts: dict[int, str] = {}
    finishes: dict[int, str] = {}
    tokens: dict[int, list[str] | None] = {}
    if not body["stream"]:
        response = await client.post(url, json=body)
        assert response.status_code == 200, response.text
        for c in response.json()["choices"]:
            texts[c["index"]], finishes[c["index"]] = c["text"], c["finish_reason"]
            tokens[c["index"]] = c["logprobs"]["tokens"] if c["logprobs"] else None
        usage = response.json()["usage"]
    else:
        usage = None
        async with client.stream("POST", url, json=body) as response:
            assert response.status_code == 200, await response.aread()
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: ") :])
                usage = chunk.get("usage") or usage
                for c in chunk["choices"]:
                    i = c["index"]
                    texts[i] = texts.get(i, "") + c["text"]
                    finishes[i] = c["finish_reason"] or finishes.get(i)
                    if c["logprobs"]:
                        tokens[i] = (tokens.get(i) or []) + c["logprobs"]["tokens"]
        assert usage is not None
    choices = [(texts[i], finishes[i], tokens.get(i)) for i in sorted(texts)]
    return choices, usage["completion_tokens"], usage["prompt_tokens"]


@pytest.mark.parametrize("mode", MODES)
def test_concurrent_stop_strings_min_tokens_and_n_are_exact(
    apps: dict[str, Served], greedy_reference, mode: str
) -> None:  # type: ignore[no-untyped-def]
    """48 requests at once with random stop strings, min_tokens, include_stop_str_in_output, n (1 or 2), logprobs,
    streamed or whole, max_tokens from 1, a third of them batches of 2 to 4 prompts (repeats and shared prefixes
    among them): every choice's text, finish reason, logprob tokens and the usage are the per-token oracle's over
    transformers' greedy tokens, at index prompt * n + choice, in every mode (the engines batch them, prefix hits
    and all; a lagging consumer gets multi-token deltas); then nothing is held on any replica."""
    tokenizer, reference = greedy_reference
    rng = random.Random(f"stop-{mode}")
    prompts = _mixed_prompts(seed=81, n=48)
    batches = [[p] if rng.random() < 0.67 else [p, *rng.choices(prompts, k=rng.randint(1, 3))] for p in prompts]
    cases = [_stop_case(rng, tokenizer, batch, [reference(p) for p in batch]) for batch in batches]

    async def wave() -> list[tuple[list, int, int]]:  # type: ignore[type-arg]
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:
            url = f"{apps[mode].base_url}/completions"
            return list(await asyncio.gather(*(_answer(client, url, body) for body, _ in cases)))

    answers = asyncio.run(wave())
    wrong = []
    for i, ((body, wants), (choices, completion_tokens, prompt_tokens)) in enumerate(zip(cases, answers, strict=True)):
        n = body["n"]
        want_texts = [(text, finish) for text, finish, _ in wants for _ in range(n)]  # index prompt * n + choice
        want_tokens = [num if "logprobs" in body else None for _, _, num in wants for _ in range(n)]
        got = ([(t, f) for t, f, _ in choices], [len(x) if x is not None else None for _, _, x in choices])
        usage = (completion_tokens, prompt_tokens)
        batch = body["prompt"] if isinstance(body["prompt"][0], list) else [body["prompt"]]
        if got != (want_texts, want_tokens) or usage != (n * sum(num for _, _, num in wants), sum(map(len, batch))):
            wrong.append((i, body, wants, choices, usage))
    assert not wrong, f"{mode}: {len(wrong)} of {len(cases)} differ from the oracle, first: {wrong[0]}"
    _assert_idle(apps[mode], mode, timeout_s=5)


def test_pinned_pools_run_on_their_cores(apps: dict[str, Served]) -> None:
    """`cpus` pins every thread of a pool's replicas, the ingress's too (its `cpus` used to be ignored)."""
    import psutil

    want = {"Ingress": set(CORES[:1]), "PrefillServer": set(CORES[:1]), "DecodeServer": set(CORES[1:2] or CORES[:1])}
    seen: dict[str, set[int]] = {}
    for p in psutil.process_iter(["cmdline"]):
        for role in want:
            if any(f"ServeReplica:1p1d-lent:{role}" in arg for arg in p.info["cmdline"] or []):
                lendable = set(CORES[:2]) if role == "DecodeServer" else set()  # D's threads may run where it borrows
                assert set(p.cpu_affinity()) in (want[role], want[role] | lendable), (role, p.cpu_affinity())
                seen[role] = set(p.cpu_affinity())
    assert seen.keys() == want.keys(), seen


@pytest.fixture(scope="module")
def sampled_alone(tiny_models: dict[str, Path]):  # type: ignore[no-untyped-def]
    """(tokenizer, request -> the tokens it samples alone on one engine: a large pool, no prefix cache)."""
    from transformers import AutoTokenizer

    from pdserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
    from pdserve.engine import LLMEngine

    engine = LLMEngine(
        EngineConfig(
            ModelConfig(str(tiny_models["llama"]), dtype="float32"),
            CacheConfig(block_size=16, num_blocks=64, enable_prefix_caching=False),
            SchedulerConfig(max_num_batched_tokens=512, max_num_seqs=4),
        )
    )

    def alone(request: Any) -> list[int]:
        engine.add_request(request)
        tokens: list[int] = []
        while engine.has_unfinished():
            for out in engine.step():
                tokens += out.new_token_ids
        return tokens

    return AutoTokenizer.from_pretrained(tiny_models["llama"]), alone


@pytest.mark.parametrize("mode", MODES)
def test_concurrent_seeded_sampling_is_what_each_request_samples_alone(
    apps: dict[str, Served], sampled_alone, mode: str
) -> None:  # type: ignore[no-untyped-def]
    """40 seeded sampled requests at once through HTTP (temperature, top-k/top-p/min-p, the three penalties): each
    text is what its request samples alone on one engine — the seed fixes every draw whatever the batch, the
    replica or the split (the first token sampled on P, the rest on D). Every cluster test ran greedy (found in
    review)."""
    from oracle import continuation_text
    from pdserve.engine import EngineRequest, SamplingParams

    tokenizer, alone = sampled_alone
    rng = random.Random(f"sampled-{mode}")
    cases = []
    for i, prompt in enumerate(_mixed_prompts(seed=83, n=40)):
        fields = {
            "temperature": rng.choice([0.6, 1.0, 1.5]), "top_p": rng.choice([1.0, 0.9]), "top_k": rng.choice([-1, 20]),
            "min_p": rng.choice([0.0, 0.05]), "presence_penalty": rng.choice([0.0, 0.5]),
            "frequency_penalty": rng.choice([0.0, -0.3]), "repetition_penalty": rng.choice([1.0, 1.2]),
            "seed": rng.randrange(2**31), "max_tokens": rng.choice([1, 5, 16]),
        }  # fmt: skip
        params = SamplingParams(**{**fields, "top_k": max(fields["top_k"], 0)}, ignore_eos=True)
        tokens = alone(EngineRequest(f"alone-{mode}-{i}", tuple(prompt), params))
        body = {"model": "tiny", "prompt": prompt, "ignore_eos": True, **fields}
        cases.append((body, continuation_text(tokenizer, prompt, tokens), len(tokens)))

    async def wave() -> list[dict[str, Any]]:
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=100)) as client:
            url = f"{apps[mode].base_url}/completions"
            replies = await asyncio.gather(*(client.post(url, json=body) for body, _, _ in cases))
            return [r.raise_for_status().json() for r in replies]

    got = asyncio.run(wave())
    wrong = [
        (i, body, want, reply["choices"][0]["text"])
        for i, ((body, want, n), reply) in enumerate(zip(cases, got, strict=True))
        if (reply["choices"][0]["text"], reply["usage"]["completion_tokens"]) != (want, n)
    ]
    assert not wrong, f"{mode}: {len(wrong)} of {len(cases)} differ from sampling alone, first: {wrong[0]}"
    _assert_idle(apps[mode], mode, timeout_s=5)
