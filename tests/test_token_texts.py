"""Logprob token texts spell the text the API returns (api/formats.py: `token_texts`): with SentencePiece
tokenizers (Llama-2's decoder, and the Metaspace decoder) a word-initial token keeps its leading space, which
decoding it alone dropped (" wor" was "wor": the tokens' `bytes` did not spell the content and every
`text_offset` after a space drifted by one); byte-level BPE is unchanged. Randomized: words, punctuation, runs of
spaces, non-ASCII (byte-fallback tokens), over a prompt ending anywhere."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from oracle import continuation_text
from pdserve.api.formats import token_bytes, token_texts
from tiny_models import build_sentencepiece_tokenizer, build_tokenizer

WORDS = ["hello", "world", "the", "quick", "brown", "fox", ",", ".", "  ", "ü", "日本", "½", "a", "I", "\n"]


def _tokenizer(kind: str, path: Path) -> Any:
    if kind == "byte-level":
        return build_tokenizer(path)
    return build_sentencepiece_tokenizer(path, metaspace_decoder=kind == "metaspace")


def _continuations(tokenizer: Any, kind: str) -> Iterator[tuple[str, int, list[int], list[int], str]]:
    """300 seeded texts cut at a random token: (text, cut, prompt ids, output ids, the output's text), except the
    cuts that split a character (its tokens read as U+FFFD alone) or leave no output."""
    rng = random.Random(kind)
    for _ in range(300):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(1, 12)))
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        cut = rng.randrange(1, len(ids) + 1) if len(ids) > 1 else 1
        prompt, output = ids[:cut], ids[cut:]
        want = continuation_text(tokenizer, prompt, output)
        if "\ufffd" not in want and output:
            yield text, cut, prompt, output, want


@pytest.mark.parametrize("kind", ["llama2", "metaspace", "byte-level"])
def test_token_texts_spell_the_continuation(tmp_path: Path, kind: str) -> None:
    tokenizer = _tokenizer(kind, tmp_path)
    checked = 0
    for text, cut, _, output, want in _continuations(tokenizer, kind):
        texts = token_texts(tokenizer, output)
        if any("\ufffd" in t for t in texts):
            continue  # byte-fallback pieces of one character: only their bytes join
        assert "".join(texts) == want, (kind, text, cut, texts, want)
        checked += 1
    assert checked > 100


@pytest.mark.parametrize("kind", ["llama2", "metaspace", "byte-level"])
def test_token_bytes_join_into_the_continuation(tmp_path: Path, kind: str) -> None:
    """OpenAI's `bytes`: a token holding part of a character (its text alone is U+FFFD) reports its vocabulary
    piece's raw bytes (byte-level BPE's alphabet, byte fallback's <0xNN>), so the tokens' bytes join into the text —
    they were null for exactly the tokens the field is for."""
    tokenizer = _tokenizer(kind, tmp_path)
    checked = split = 0
    for text, cut, prompt, output, want in _continuations(tokenizer, kind):
        if tokenizer.decode(prompt).endswith("\ufffd"):
            continue  # a character split across the cut: the output's text shows it whole, its bytes hold the tail
        texts = token_texts(tokenizer, output)
        found = token_bytes(tokenizer, output, texts)
        assert b"".join(bytes(b or b"?") for b in found) == want.encode(), (kind, text, cut, texts, found)
        checked += 1
        split += any("\ufffd" in t for t in texts)
    assert checked > 100 and split > 20
