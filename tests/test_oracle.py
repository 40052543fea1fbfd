"""The oracle's one exception, as tests that meet the output as text apply it (`ExpectedText`): a served text equals
the reference's when equal, or when it matches up to a near-tie of the reference — and never otherwise."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from oracle import NEAR_TIE, ExpectedText, Reference, continuation_text

PROMPT = [300, 317, 330, 341, 399]
TOKENS = [310, 325, 340, 355, 370, 385]  # whole words, none a byte token


@pytest.fixture(scope="module")
def tokenizer(tiny_models: dict[str, Path]):  # type: ignore[no-untyped-def]
    return AutoTokenizer.from_pretrained(tiny_models["llama"])


def _text(tokenizer: object, tokens: list[int]) -> str:
    return continuation_text(tokenizer, PROMPT, tokens)


def test_without_a_near_tie_only_the_same_text_is_equal(tokenizer) -> None:  # type: ignore[no-untyped-def]
    want = ExpectedText(tokenizer, PROMPT, Reference(TOKENS, [1.0] * len(TOKENS)))
    assert _text(tokenizer, TOKENS) == want and (_text(tokenizer, TOKENS) != want) is False
    for k in range(len(TOKENS)):  # one token changed anywhere: not equal, in every spelling of the comparison
        changed = _text(tokenizer, [*TOKENS[:k], TOKENS[k] + 60, *TOKENS[k + 1 :]])
        assert changed != want and (changed == want) is False and [changed] != [want] and want != changed
    assert want != 7 and str(want) == _text(tokenizer, TOKENS) and hash(want) == hash(str(want))


def test_a_near_tie_stops_the_comparison_at_its_token(tokenizer) -> None:  # type: ignore[no-untyped-def]
    gaps = [1.0, 1.0, 1.0, NEAR_TIE / 4, 1.0, 1.0]
    want = ExpectedText(tokenizer, PROMPT, Reference(TOKENS, gaps))
    flipped_at_tie = _text(tokenizer, [*TOKENS[:3], 400, 415, 430])
    assert flipped_at_tie == want and [flipped_at_tie] == [want] and (flipped_at_tie != want) is False
    before_tie = _text(tokenizer, [*TOKENS[:2], 400, *TOKENS[3:]])
    assert before_tie != want, "a difference before the near-tie still fails"
    at_gap_above = ExpectedText(tokenizer, PROMPT, Reference(TOKENS, [1.0, 1.0, 1.0, NEAR_TIE * 2, 1.0, 1.0]))
    assert flipped_at_tie != at_gap_above, "a gap of NEAR_TIE or more is no near-tie"
