from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Serve kills an HTTP proxy not ready within 5 s; on a loaded 2-core box (Ray's workers run at niceness 15) the first
# one can take longer, and `serve.start` then fails with ActorDiedError instead of waiting for its replacement.
os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "30")
torch.set_num_threads(min(2, os.cpu_count() or 1))

FAMILIES = ("llama", "qwen2", "qwen3", "mistral")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests on the shared Ray cluster run last and together, so the cluster starts once and never idles
    between them (keeping the order of each group)."""
    items.sort(key=lambda item: item.get_closest_marker("serve_cluster") is not None)


@pytest.fixture(scope="session", autouse=True)
def _stop_the_shared_cluster() -> Iterator[None]:
    yield
    from serving import stop_shared

    stop_shared()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tiny_models import build_all

    return build_all(tmp_path_factory.mktemp("tiny_models"))


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from pdserve.hub import materialize_smollm2

    return materialize_smollm2("float32")


@pytest.fixture(scope="session")
def oracle(tiny_models: dict[str, Path]):  # type: ignore[no-untyped-def]
    """prompt ids (and max_tokens, HTTP_MAX_TOKENS unless given) -> the text of transformers' greedy continuation on
    the tiny Llama, as an `ExpectedText`: equal to a served text that matches it, or that matches it up to a
    near-tie (oracle.py)."""
    from transformers import AutoTokenizer

    from oracle import HTTP_MAX_TOKENS, ExpectedText, load_reference_model, reference_greedy

    path = tiny_models["llama"]
    model, tokenizer = load_reference_model(path), AutoTokenizer.from_pretrained(path)

    cache: dict[tuple[tuple[int, ...], int], ExpectedText] = {}

    def want(prompt: list[int], max_tokens: int = HTTP_MAX_TOKENS) -> ExpectedText:
        key = (tuple(prompt), max_tokens)
        if key not in cache:
            cache[key] = ExpectedText(tokenizer, prompt, reference_greedy(model, prompt, max_tokens))
        return cache[key]

    return want
