"""End to end on a real local Ray cluster: HTTP + the official openai client, 1 prefill + 1 decode, and the
colocated baseline, against transformers' generate() on SmolLM2-135M-Instruct (float32)."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import psutil
import pytest
from transformers import AutoTokenizer

from oracle import continuation_text, load_reference_model, random_prompts, reference_greedy
from pdserve.serve.replicas import PERIODIC_CALLS, QuietPeriodicCalls, quiet_periodic_calls
from serving import Served, deploy, shared_serve

pytestmark = [pytest.mark.slow, pytest.mark.serve_cluster]
MAX_TOKENS = 24
SYSTEM = "You are a helpful assistant who answers briefly and precisely. " * 12  # long shared prefix: several KV blocks


@pytest.fixture(scope="module")
def apps(smollm2_dir: Path) -> Iterator[tuple[Served, Served]]:
    """The disaggregated app at /, the colocated one at /colocated, both float32 on one Ray cluster."""

    from pdserve.serve.config import ServeConfig

    common = {"model": str(smollm2_dir), "dtype": "float32", "served_model_name": "smollm2", "num_kv_blocks": 512}
    with shared_serve() as port:
        # local_prefill_max_tokens=0: always through the prefill replica (local mode has its own tests)
        disagg = ServeConfig(**common, router={"local_prefill_max_tokens": 0})
        deploy({"disagg": (disagg, "/"), "colocated": (ServeConfig(**common, colocated=True), "/colocated")})
        yield (
            Served(f"http://127.0.0.1:{port}/v1", num_engine_replicas=2),
            Served(f"http://127.0.0.1:{port}/colocated/v1", num_engine_replicas=1),
        )


@pytest.fixture(scope="module")
def reference(smollm2_dir: Path):  # type: ignore[no-untyped-def]
    return load_reference_model(smollm2_dir)


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir: Path):  # type: ignore[no-untyped-def]
    return AutoTokenizer.from_pretrained(smollm2_dir)


def client(served: Served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.base_url, api_key="unused", max_retries=0, timeout=120)


def complete_ids(served: Served, prompt: list[int], max_tokens: int = MAX_TOKENS, **extra: object) -> str:
    out = client(served).completions.create(
        model="smollm2",
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0,
        extra_body={"ignore_eos": True, **extra},
    )
    assert out.usage is not None and out.usage.completion_tokens == max_tokens
    return out.choices[0].text


def complete_all(served: Served, prompts: list[list[int]], max_tokens: int) -> list[str]:
    """Every prompt at once (greedy, `ignore_eos`) through the async client; the texts in prompt order."""

    async def run_all() -> list[str]:
        aclient = openai.AsyncOpenAI(base_url=served.base_url, api_key="unused", max_retries=0, timeout=300)
        async with aclient:
            outs = await asyncio.gather(
                *[
                    aclient.completions.create(
                        model="smollm2", prompt=p, max_tokens=max_tokens, temperature=0, extra_body={"ignore_eos": True}
                    )
                    for p in prompts
                ]
            )
        return [o.choices[0].text for o in outs]

    return asyncio.run(run_all())


def ref_text(reference, tokenizer, prompt: list[int], max_tokens: int = MAX_TOKENS) -> str:  # type: ignore[no-untyped-def]
    return continuation_text(tokenizer, prompt, reference_greedy(reference, prompt, max_tokens).token_ids)


def test_completions_match_transformers_in_both_modes(apps, reference, tokenizer) -> None:  # type: ignore[no-untyped-def]
    disagg, colocated = apps
    for prompt in random_prompts([1, 17, 100, 300], 49152, seed=31, low=100):
        want = ref_text(reference, tokenizer, prompt)
        assert complete_ids(disagg, prompt) == want
        assert complete_ids(colocated, prompt) == want


def test_chat_matches_transformers_and_streams_the_same_text(apps, reference, tokenizer) -> None:  # type: ignore[no-untyped-def]
    disagg, _ = apps
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    ref = reference.generate(__import__("torch").tensor([list(ids)]), max_new_tokens=32, do_sample=False)
    want = tokenizer.decode(ref[0, len(ids) :], skip_special_tokens=True)
    chat = client(disagg).chat.completions.create(model="smollm2", messages=messages, max_tokens=32, temperature=0)
    assert chat.choices[0].message.content == want and "Paris" in want
    stream = client(disagg).chat.completions.create(
        model="smollm2",
        messages=messages,
        max_tokens=32,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == chat.usage.completion_tokens
    # vLLM's /tokenize and /detokenize through Serve: the ids the chat was served with, the text back
    tokenized = httpx.post(f"{disagg.root}/tokenize", json={"model": "smollm2", "messages": messages}, timeout=30)
    assert tokenized.status_code == 200 and tokenized.json()["tokens"] == list(ids)
    assert chat.usage.prompt_tokens == tokenized.json()["count"]
    back = httpx.post(f"{disagg.root}/detokenize", json={"tokens": list(ids)}, timeout=30).json()["prompt"]
    assert back == tokenizer.decode(ids) and "What is the capital of France?" in back


def test_sixteen_concurrent_requests_are_all_exact(apps, reference, tokenizer) -> None:  # type: ignore[no-untyped-def]
    disagg, _ = apps
    prompts = random_prompts([20 + 13 * i for i in range(16)], 49152, seed=32, low=100)
    wants = [ref_text(reference, tokenizer, p, 16) for p in prompts]

    assert complete_all(disagg, prompts, 16) == wants
    assert disagg.wait_blocks_used(0) == 0


def test_delta_transfer_moves_fewer_blocks_and_stays_exact(apps, reference, tokenizer) -> None:  # type: ignore[no-untyped-def]
    disagg, _ = apps
    shared = tokenizer(SYSTEM)["input_ids"]
    assert len(shared) >= 64
    first, second = [shared + s for s in random_prompts([10, 12], 49152, seed=33, low=100)]

    def blocks_sent() -> float:
        return disagg.settled_total("pdserve_kv_transfer_blocks_total")

    before = blocks_sent()
    assert complete_ids(disagg, first) == ref_text(reference, tokenizer, first)
    sent_first = blocks_sent() - before
    assert complete_ids(disagg, second) == ref_text(reference, tokenizer, second)
    sent_second = blocks_sent() - before - sent_first
    assert sent_first == -(-len(first) // 16)  # nothing cached on the decode replica yet
    # The decode replica already holds the shared prefix's full blocks: only the rest moves.
    assert sent_second == -(-len(second) // 16) - len(shared) // 16 < sent_first


@pytest.fixture  # one test each: the app is deleted right after it, not left idle to the end
def gloo_app(apps, smollm2_dir: Path) -> Iterator[Served]:  # type: ignore[no-untyped-def]
    """A third app on the same cluster whose KV moves over the P2P transport's CPU backend (gloo: NCCL's protocol,
    communicator pairs and all), pushed layer by layer while the prompt computes."""
    from ray import serve

    from pdserve.serve.app import build_app
    from pdserve.serve.config import ServeConfig

    config = ServeConfig(
        model=str(smollm2_dir),
        dtype="float32",
        served_model_name="smollm2",
        num_kv_blocks=512,
        kv_transport="gloo",
        kv_pipelined_push=True,
        router={"local_prefill_max_tokens": 0},
    )
    serve.run(build_app(config), name="gloo", route_prefix="/gloo")
    yield Served(apps[0].base_url.removesuffix("/v1") + "/gloo/v1", num_engine_replicas=2)
    serve.delete("gloo")


def test_kv_over_gloo_pairs_layer_pipelined_is_exact(gloo_app, reference, tokenizer) -> None:  # type: ignore[no-untyped-def]
    shared = tokenizer(SYSTEM)["input_ids"]
    prompts = [shared + p for p in random_prompts([5, 40], 49152, seed=35, low=100)]
    prompts += random_prompts([1, 150], 49152, seed=36, low=100)
    for prompt in prompts:  # the second one hits the decode replica's cached prefix: a delta transfer
        assert complete_ids(gloo_app, prompt) == ref_text(reference, tokenizer, prompt)
    sent = gloo_app.settled_total("pdserve_kv_transfer_blocks_total")
    blocks = [-(-len(p) // 16) for p in prompts]
    assert sent == sum(blocks) - len(shared) // 16
    assert gloo_app.wait_blocks_used(0) == 0


@pytest.fixture
def queue_aware_app(apps, smollm2_dir: Path) -> Iterator[Served]:  # type: ignore[no-untyped-def]
    """1P1D whose decode replica also prefills whenever it would be sooner than the prefill replica (queue-aware
    conditional disaggregation at a 0 s threshold; no prompt is short enough for the plain local rule)."""
    from ray import serve

    from pdserve.serve.app import build_app
    from pdserve.serve.config import ServeConfig

    config = ServeConfig(
        model=str(smollm2_dir),
        dtype="float32",
        served_model_name="smollm2",
        num_kv_blocks=512,
        router={"local_prefill_max_tokens": 0, "local_prefill_queue_s": 0.0},
    )
    serve.run(build_app(config), name="queue-aware", route_prefix="/queue-aware")
    yield Served(apps[0].base_url.removesuffix("/v1") + "/queue-aware/v1", num_engine_replicas=2)
    serve.delete("queue-aware")


def test_queue_aware_local_prefill_shares_a_burst_and_stays_exact(queue_aware_app, reference, tokenizer) -> None:  # type: ignore[no-untyped-def]
    prompts = random_prompts([150 + 7 * i for i in range(8)], 49152, seed=37, low=100)
    wants = [ref_text(reference, tokenizer, p, 12) for p in prompts]

    assert complete_all(queue_aware_app, prompts, 12) == wants
    # The first prompt finds both queues empty and goes local (no transfer); the next ones find D's queue longer.
    decisions = queue_aware_app.metrics()["pdserve_router_decisions_total"]
    modes = {dict(labels)["mode"]: n for labels, n in decisions.items()}
    assert modes.get("local", 0) >= 1 and modes.get("disaggregated", 0) >= 1
    assert queue_aware_app.wait_blocks_used(0) == 0


def test_client_disconnect_and_aborted_burst_free_every_block(apps) -> None:  # type: ignore[no-untyped-def]
    disagg, colocated = apps
    prompt = random_prompts([200], 49152, seed=34, low=100)[0]
    for served in (disagg, colocated):
        idle = served.wait_blocks_used(0)
        aborted = served.settled_total("pdserve_requests_aborted_total")
        with httpx.stream(
            "POST",
            f"{served.base_url}/completions",
            timeout=60,
            json={
                "model": "smollm2",
                "prompt": prompt,
                "max_tokens": 500,
                "stream": True,
                "ignore_eos": True,
            },
        ) as response:
            assert response.status_code == 200, response.read()
            for i, _ in enumerate(response.iter_lines()):
                if i > 5:
                    break  # hang up mid-stream
        assert served.wait_blocks_used(idle) == idle
        # freed by the abort, not by finishing: 500 tokens outlast the wait
        assert served.settled_total("pdserve_requests_aborted_total") >= aborted + 1

    statuses: list[int] = []
    aborted = disagg.settled_total("pdserve_requests_aborted_total")

    def one(i: int) -> None:
        # odd i leave after a few lines of a stream too long to have ended by then; even i read 40 tokens to the end
        max_tokens = 400 if i % 2 else 40
        body = {"model": "smollm2", "prompt": prompt[: 50 + i], "max_tokens": max_tokens, "stream": True,
                "ignore_eos": True}  # fmt: skip
        try:
            with httpx.stream("POST", f"{disagg.base_url}/completions", json=body, timeout=120) as response:
                statuses.append(response.status_code)
                for j, _ in enumerate(response.iter_lines()):
                    if i % 2 and j > i % 7:
                        break
        except httpx.HTTPError:
            pass

    threads = [threading.Thread(target=one, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert statuses == [200] * 50  # every request was accepted: the aborts hit real work
    assert disagg.wait_blocks_used(0, timeout_s=20) == 0
    assert disagg.settled_total("pdserve_requests_aborted_total") >= aborted + 25  # each leaver was aborted


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ("{not json", 400, None),
        ({"model": "smollm2", "prompt": "hi", "max_tokens": "many"}, 400, "max_tokens"),
        ({"model": "smollm2", "prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
        ({"model": "smollm2", "prompt": "hi", "temperature": -0.5}, 400, "temperature"),
        ({"model": "smollm2", "prompt": [5] * 9000}, 400, None),
        ({"model": "nope", "prompt": "hi"}, 404, None),
    ],
)
def test_bad_input_gets_openai_errors_and_changes_nothing(apps, body, status, param) -> None:  # type: ignore[no-untyped-def]
    disagg, _ = apps
    used = disagg.wait_blocks_used(0)
    kwargs = {"content": body} if isinstance(body, str) else {"json": body}
    response = httpx.post(
        f"{disagg.base_url}/completions", timeout=30, headers={"content-type": "application/json"}, **kwargs
    )  # type: ignore[arg-type]
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and "Traceback" not in response.text
    if param:
        assert error["param"] == param
    assert disagg.blocks_used() == used


KEY_A, KEY_B = "sk-e2e-tenant-a-1", "sk-e2e-tenant-b-2"


@pytest.fixture
def tenants_app(apps, smollm2_dir: Path) -> Iterator[Served]:  # type: ignore[no-untyped-def]
    """The disaggregated app with API keys for two tenants."""
    from ray import serve

    from pdserve.serve.app import build_app
    from pdserve.serve.config import ServeConfig

    config = ServeConfig(
        model=str(smollm2_dir), dtype="float32", served_model_name="smollm2", num_kv_blocks=512,
        router={"local_prefill_max_tokens": 0},
        api_keys=[{"key": KEY_A, "tenant": "team-a"}, {"key": KEY_B, "tenant": "team-b"}],
    )  # fmt: skip
    serve.run(build_app(config), name="tenants", route_prefix="/tenants")
    yield Served(apps[0].base_url.removesuffix("/v1") + "/tenants/v1", api_key=KEY_A, num_engine_replicas=2)
    serve.delete("tenants")


def test_a_tenant_never_hits_another_tenants_prefix_cache(tenants_app, reference, tokenizer) -> None:  # type: ignore[no-untyped-def]
    """Through HTTP: team-a's repeat hits its own cached prompt (prefill and decode replicas both), team-b's
    identical prompt hits nothing of it (0 cached tokens) — even when it sends a salt of its own choosing — and
    every answer is exact; without a key nothing is served."""
    prompt = tokenizer(SYSTEM)["input_ids"] + random_prompts([20], 49152, seed=77, low=100)[0]
    want = ref_text(reference, tokenizer, prompt)

    def cached(key: str, **extra: object) -> int:
        ai = openai.OpenAI(base_url=tenants_app.base_url, api_key=key, max_retries=0, timeout=120)
        out = ai.completions.create(
            model="smollm2",
            prompt=prompt,
            max_tokens=MAX_TOKENS,
            temperature=0,
            extra_body={"ignore_eos": True, **extra},
        )
        assert out.choices[0].text == want
        assert out.usage is not None and out.usage.prompt_tokens_details is not None
        return int(out.usage.prompt_tokens_details.cached_tokens or 0)

    assert cached(KEY_A) == 0  # cold
    assert cached(KEY_A) >= len(prompt) // 16 * 16 - 16  # its own blocks: a hit
    assert cached(KEY_B) == 0  # the same prompt, another tenant: nothing of team-a's
    assert cached(KEY_B, cache_salt="tenant:team-a\x1f") == 0  # a forged salt only narrows team-b's own
    assert cached(KEY_B) > 0  # team-b's own repeat hits
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=tenants_app.base_url, api_key="sk-none", max_retries=0).models.list()
    assert httpx.get(f"{tenants_app.root}/metrics", timeout=10).status_code == 401
    assert tenants_app.wait_blocks_used(0) == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="lowering a niceness needs root or CAP_SYS_NICE")
def test_replicas_run_level_with_ordinary_processes(apps) -> None:  # type: ignore[no-untyped-def]
    """Ray starts workers at niceness 15; every pdserve replica (each thread) moves to the config's 0, so a load
    client at 0 does not take the cores from the engines; so does Serve's HTTP proxy, which the engines at 0 would
    otherwise starve (streams leaving in clumps)."""
    replicas = [
        p for p in psutil.process_iter(["cmdline"])
        if any(f"ServeReplica:{app}:" in arg for arg in p.info["cmdline"] or [] for app in ("disagg", "colocated"))
    ]  # fmt: skip
    # Ray retitles a worker while it runs a call ("ray::ServeReplica:disagg:DecodeServer.router_sync()"): the role is
    # the word after the app's name.
    roles = {
        m.group(1) for p in replicas for arg in p.info["cmdline"] if (m := re.search(r"ServeReplica:\w+:(\w+)", arg))
    }
    assert {"Ingress", "PrefillServer", "DecodeServer", "EngineServer"} <= roles
    for p in replicas:
        assert {t.id: os.getpriority(os.PRIO_PROCESS, t.id) for t in p.threads()} == {t.id: 0 for t in p.threads()}

    def niceness(title: str) -> set[int]:
        processes = [p for p in psutil.process_iter(["cmdline"]) if any(title in a for a in p.info["cmdline"] or [])]
        assert processes, title
        return {os.getpriority(os.PRIO_PROCESS, t.id) for p in processes for t in p.threads()}

    deadline = time.monotonic() + 30  # the ingress levels the proxy once it starts, and every minute
    while niceness("ProxyActor") != {0} and time.monotonic() < deadline:
        time.sleep(0.5)
    assert niceness("ProxyActor") == {0}


def test_ingress_replicas_never_load_torch(apps) -> None:  # type: ignore[no-untyped-def]
    """The ingress tokenizes, routes and streams without torch (its tokenizer's class comes from an engine replica:
    api/intake.py): no ingress replica maps libtorch, after serving every test above; the engine replicas do."""

    def torch_mapped(role: str) -> dict[int, bool]:
        processes = [
            p for p in psutil.process_iter(["cmdline"])
            if any(re.search(rf"ServeReplica:(disagg|colocated):{role}\b", arg) for arg in p.info["cmdline"] or [])
        ]  # fmt: skip
        assert processes, role
        return {p.pid: any("libtorch" in m.path for m in p.memory_maps()) for p in processes}

    assert not any(torch_mapped("Ingress").values())
    assert all(torch_mapped("EngineServer").values()) and all(torch_mapped("DecodeServer").values())


def test_engine_replicas_log_no_line_per_periodic_call(apps) -> None:  # type: ignore[no-untyped-def]
    """Serve's access log printed a line for every call, the ingress's timed ones included (`stats` each second,
    `router_sync`, lease renewals): 4 lines a second on an idle 1P1D console. After every test above, each engine
    replica's log holds its per-request calls and none of those."""
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"
    for role, request_call in (("DecodeServer", "decode"), ("PrefillServer", "prefill"), ("EngineServer", "generate")):
        files = list(logs.glob(f"replica_*_{role}_*.log"))
        assert files, role
        text = "\n".join(f.read_text(errors="replace") for f in files)
        assert f"CALL {request_call} OK" in text, role
        for call in PERIODIC_CALLS:
            assert f"CALL {call} OK" not in text, (role, call)


@pytest.mark.parametrize(
    ("method", "route", "status", "kept"),
    [("CALL", "stats", "OK", False), ("CALL", "router_sync", "OK", False), ("CALL", "renew", "OK", False),
     ("CALL", "stats", "ERROR", True), ("CALL", "router_sync", "CANCELLED", True), ("CALL", "decode", "OK", True),
     ("GET", "stats", "200", True)],
)  # fmt: skip
def test_quiet_periodic_calls_keeps_failures_and_other_calls(method: str, route: str, status: str, kept: bool) -> None:
    from ray.serve._private.logging_utils import access_log_msg

    serve_logger = logging.getLogger("ray.serve")
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    before, level = list(serve_logger.filters), serve_logger.level
    serve_logger.addHandler(handler)
    serve_logger.setLevel(logging.INFO)
    try:
        quiet_periodic_calls()
        quiet_periodic_calls()  # once per process
        assert sum(isinstance(f, QuietPeriodicCalls) for f in serve_logger.filters) == 1
        line = access_log_msg(method=method, route=route, status=status, latency_ms=0.4)
        serve_logger.info(line, extra={"serve_access_log": True})
        serve_logger.info(f"{route} is not an access-log line")  # any other record passes
        assert seen == ([line] if kept else []) + [f"{route} is not an access-log line"]
    finally:
        serve_logger.removeHandler(handler)
        serve_logger.filters[:] = before
        serve_logger.setLevel(level)


def test_n_choices_top_logprobs_and_echo_match_transformers(apps, reference, tokenizer) -> None:  # type: ignore[no-untyped-def]
    """Through the official client, in both modes: n=3 greedy choices are identical and exact; top_logprobs=5 and
    an echoed prompt's logprobs (what evaluation harnesses score with) equal transformers' log-softmax to 1e-4."""
    import torch

    prompt = random_prompts([40], 49152, seed=35, low=100)[0]
    generated = reference_greedy(reference, prompt, 6).token_ids
    with torch.inference_mode():
        whole = reference(torch.tensor([prompt + generated])).logits[0].float().log_softmax(-1)
    ref = whole[: len(prompt)]
    # Each generated token's logprob where it was sampled: the first on the prefill replica in the disaggregated
    # mode, the rest on the decode replica, after the KV transfer (only the first was compared; found in review).
    want_generated = whole[len(prompt) - 1 : -1].gather(1, torch.tensor(generated).unsqueeze(1)).squeeze(1).tolist()
    for served in apps:
        c = client(served)
        out = c.completions.create(model="smollm2", prompt=prompt, max_tokens=6, temperature=0, n=3, logprobs=5)
        assert [ch.index for ch in out.choices] == [0, 1, 2]
        assert len({ch.text for ch in out.choices}) == 1 and out.choices[0].text == ref_text(
            reference, tokenizer, prompt, 6
        )
        assert out.usage is not None and out.usage.completion_tokens == 18
        first = out.choices[0].logprobs
        assert first is not None and first.top_logprobs is not None and first.token_logprobs is not None
        assert max(abs(g - w) for g, w in zip(first.token_logprobs, want_generated, strict=True)) < 1e-4
        want_top = ref[-1].topk(5)
        got_top = first.top_logprobs[0]  # the first generated token's alternatives (and itself)
        for token_id, value in zip(want_top.indices.tolist(), want_top.values.tolist(), strict=True):
            assert abs(got_top[tokenizer.decode([token_id])] - value) < 1e-4
        scored = c.completions.create(model="smollm2", prompt=prompt, max_tokens=0, echo=True, logprobs=1)
        lp = scored.choices[0].logprobs
        assert lp is not None and scored.choices[0].text == tokenizer.decode(prompt)
        assert lp.token_logprobs is not None and lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(prompt)
        want = ref[:-1].gather(1, torch.tensor(prompt[1:]).unsqueeze(1)).squeeze(1).tolist()
        assert max(abs(g - w) for g, w in zip(lp.token_logprobs[1:], want, strict=True)) < 1e-4
        assert scored.usage is not None and scored.usage.completion_tokens == 0
        # the prompt is cached now: scoring it again must not skip the cached part
        again = c.completions.create(model="smollm2", prompt=prompt, max_tokens=0, echo=True, logprobs=0)
        assert again.choices[0].logprobs is not None and again.choices[0].logprobs.token_logprobs is not None
        assert again.choices[0].logprobs.token_logprobs[1:] == pytest.approx(lp.token_logprobs[1:], abs=1e-5)
        body = {"model": "smollm2", "prompt": prompt, "max_tokens": 400, "n": 3, "stream": True, "temperature": 0.8}
        aborted = served.settled_total("pdserve_requests_aborted_total")
        with httpx.stream("POST", f"{served.base_url}/completions", json=body, timeout=60) as response:
            assert response.status_code == 200, response.read()
            for i, _ in enumerate(response.iter_lines()):  # leave mid-stream: all three requests are aborted
                if i == 6:
                    break
        # choice 0 at least (the others start after its first token) ended by the abort: 400 tokens outlast this
        assert served.settled_total("pdserve_requests_aborted_total") >= aborted + 1
    for served in apps:
        assert served.wait_blocks_used(0) == 0
