"""The ingress loads the model's tokenizer through the class `AutoTokenizer` picks, which an engine replica names
(api/intake.py: `tokenizer_class`, `load_tokenizer`), so that transformers' Auto machinery and torch stay out of the
ingress process: the same tokenizer as `AutoTokenizer`'s on every family the tests serve, and an ingress module
that imports no torch (tests/test_serve_e2e.py checks the live ingress replicas too)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from transformers import AutoTokenizer

from pdserve.api.intake import load_tokenizer, tokenizer_class

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["Hello, world!", "  leading spaces and\ttabs\n\nnewlines", "héllo wörld ½ 😀 日本語", "", "a" * 300]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}]


def test_the_named_class_loads_the_tokenizer_auto_tokenizer_loads(
    tiny_models: dict[str, Path], smollm2_dir: Path
) -> None:
    for path in [*tiny_models.values(), smollm2_dir]:
        auto = AutoTokenizer.from_pretrained(path)
        name = tokenizer_class(path)
        for ours in (load_tokenizer(path, name), load_tokenizer(path, None), load_tokenizer(path, "NoSuchTokenizer")):
            assert type(ours) is type(auto), path
            for text in TEXTS:
                ids = auto.encode(text)
                assert ours.encode(text) == ids, (path, text)
                assert ours.decode(ids) == auto.decode(ids), (path, text)
                assert ours.decode(ids, skip_special_tokens=True) == auto.decode(ids, skip_special_tokens=True)
            assert ours.all_special_ids == auto.all_special_ids and ours.eos_token_id == auto.eos_token_id, path
            assert ours.bos_token_id == auto.bos_token_id and len(ours) == len(auto), path
            assert ours.chat_template == auto.chat_template, path
            if auto.chat_template is not None:
                render = {"add_generation_prompt": True, "tokenize": False}
                assert ours.apply_chat_template(MESSAGES, **render) == auto.apply_chat_template(MESSAGES, **render)


def test_the_ingress_imports_no_torch(tiny_models: dict[str, Path]) -> None:
    """The ingress's module and its tokenizer, loaded and used as the ingress does, in a fresh interpreter."""
    path = tiny_models["llama"]
    script = (
        "import sys\n"
        "import pdserve.serve.ingress\n"
        "from pdserve.api.intake import load_tokenizer\n"
        f"tokenizer = load_tokenizer({str(path)!r}, {tokenizer_class(path)!r})\n"
        "tokenizer.decode(tokenizer.encode('hello world'))\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[]", done.stdout[-2000:]


def test_what_a_replica_sends_the_ingress_unpickles_there_without_torch() -> None:
    """Ray unpickles a replica's reply or error in the ingress on its core-worker thread, holding the GIL, importing
    the class's module: a class from a torch-importing module (EngineDeadError did) made the ingress import torch
    there, stalling every call of that ingress for 3-8 s (a dead engine's request took 7-10 s to fail). Every public
    exception pdserve defines, and the messages, unpickle in a fresh ingress with no torch imported."""
    import pickle

    # every module a replica or the ingress runs, so every class they define
    import pdserve.serve.app
    import pdserve.serve.replicas  # noqa: F401

    def subclasses(cls: type) -> set[type]:
        return {s for c in cls.__subclasses__() for s in (c, *subclasses(c))}

    errors = {c for c in subclasses(BaseException) if c.__module__.startswith("pdserve.") and c.__name__[0] != "_"}
    modules = sorted({c.__module__ for c in errors} | {"pdserve.serve.messages", "pdserve.serve.channels"})
    samples: list[BaseException] = []
    for error in sorted(errors, key=lambda c: f"{c.__module__}.{c.__qualname__}"):
        try:
            samples.append(error("boom"))
        except TypeError:  # another constructor: its module is checked below all the same
            continue
    assert {"EngineDeadError", "EngineWedgedError", "MisroutedCallError"} <= {type(e).__name__ for e in samples}
    script = (
        "import pickle, sys\n"
        "import pdserve.serve.ingress\n"
        "torch = lambda: sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))[:3]\n"
        f"for name in {modules!r}:\n"
        "    __import__(name)\n"
        "    if torch(): sys.exit(f'importing {name} imported {torch()}')\n"
        f"errors = pickle.loads({pickle.dumps(samples)!r})\n"
        "print(len(errors), torch())\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, (done.stderr or done.stdout)[-3000:]
    assert done.stdout.split() == [str(len(samples)), "[]"], done.stdout[-2000:]


def test_a_tokenizer_json_that_truncates_or_pads_is_neither_and_shared_across_threads(
    smollm2_dir: Path, tmp_path: Path
) -> None:
    """tokenizer.json may enable truncation and padding: transformers turns them off on the first encode, writing
    to the Rust tokenizer — "Already borrowed" if the event loop's detokenizer reads it at that moment. They are off
    at load, before any thread shares it; a prompt past the old truncation length keeps every token."""
    import json
    import shutil
    import threading

    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "config.json"):
        if (smollm2_dir / name).exists():
            shutil.copy(smollm2_dir / name, tmp_path / name)
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    spec["truncation"] = {"direction": "Right", "max_length": 8, "strategy": "LongestFirst", "stride": 0}
    spec["padding"] = {"strategy": {"Fixed": 64}, "direction": "Right", "pad_to_multiple_of": None, "pad_id": 0,
                       "pad_type_id": 0, "pad_token": "<|endoftext|>"}  # fmt: skip
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    tokenizer = load_tokenizer(tmp_path, tokenizer_class(smollm2_dir))
    backend = tokenizer.backend_tokenizer
    assert backend.truncation is None and backend.padding is None
    reference = AutoTokenizer.from_pretrained(smollm2_dir)
    errors: list[BaseException] = []

    def decode_meanwhile() -> None:
        try:
            for _ in range(2000):
                tokenizer.decode(list(range(100, 140)))
        except BaseException as e:
            errors.append(e)

    reader = threading.Thread(target=decode_meanwhile)
    reader.start()
    try:
        for text in ["hello world " * 50, *TEXTS]:
            assert tokenizer(text, add_special_tokens=True)["input_ids"] == reference(text)["input_ids"]
    finally:
        reader.join()
    assert not errors
