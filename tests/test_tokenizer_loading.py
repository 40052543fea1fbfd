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
