"""Incremental detokenization against its oracle (api/detokenizer.py): the output's text is what decoding the prompt
and the output together adds to decoding the prompt alone, cut before the stop string that completes first, the same
whether the output arrives in one delta or in deltas of any size. Real tokenizers built in-process: the byte-level
BPE of the tiny models (GPT-2/SmolLM2 style) and a Llama-2-style SentencePiece one (Metaspace, byte fallback, a
decoder that strips a decode's leading space), with Llama-2's decoder and with the Metaspace decoder.

The stop-string and U+FFFD tests over HTTP and on one tokenizer are in test_api.py."""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Sequence
from typing import Any

import pytest

from pdserve.api import IncrementalDetokenizer
from pdserve.api.detokenizer import echo_overlap
from tiny_models import build_sentencepiece_tokenizer, build_tokenizer

KINDS = ("byte_level", "sentencepiece", "sentencepiece_metaspace")
NUM_RANDOM_CASES = 4000  # per tokenizer
WORDS = (
    "the", "capital", "of", "France", "is", "Paris", "héllo", "wörld", "naïve", "日本語", "🎉", "Grüße",
    "Köln", "café", "crème", "é", "ö", "😀", "€", ",", ".", "\n", "  ", "'s", "<s>", "[/INST]", "lazy", "dog",
)  # fmt: skip


@pytest.fixture(scope="module", params=KINDS)
def tokenizer(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    path = tmp_path_factory.mktemp(request.param)
    if request.param == "byte_level":
        return build_tokenizer(path)
    return build_sentencepiece_tokenizer(path, metaspace_decoder=request.param == "sentencepiece_metaspace")


@pytest.fixture(scope="module")
def sentencepiece(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return build_sentencepiece_tokenizer(tmp_path_factory.mktemp("sentencepiece"))


def decode(tokenizer: Any, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    return str(tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens))


def oracle(
    tokenizer: Any, prompt: list[int], output: list[int], skip_special_tokens: bool = True, echo_overlap: int = 0
) -> str:
    """What decoding prompt + output adds to decoding the prompt alone (less, after an echo, the `echo_overlap`
    characters at its end that the output's text starts with)."""
    head = decode(tokenizer, prompt, skip_special_tokens)
    head = head[: len(head) - echo_overlap]
    whole = decode(tokenizer, prompt + output, skip_special_tokens)
    common = next((i for i, (a, b) in enumerate(zip(head, whole, strict=False)) if a != b), min(len(head), len(whole)))
    return whole[common:]


def cut_at_stop(text: str, stop: Sequence[str], include: bool = False) -> tuple[str, bool]:
    """The text before the stop string that completes first (ties: the one starting first; `include`: with the stop
    string, vLLM's include_stop_str_in_output), and whether one did."""
    hits = [(text.find(s) + len(s), text.find(s)) for s in stop if s in text]
    if not hits:
        return text, False
    end, start = min(hits)
    return text[: end if include else start], True


def stop_with_min_tokens(
    texts: Sequence[str], whole: str, stop: Sequence[str], min_tokens: int, include: bool = False
) -> tuple[str, bool, int]:
    """The output's text, whether a stop string ended it, and the tokens it took, checking one token at a time as
    vLLM does: `texts[k]` is the text final after k tokens (texts[0] == ""), `whole` the text at the end. A stop
    string counts from the first token past `min_tokens` on, and only if it ends past the text of the first
    `min_tokens` tokens; of those completed by one token, the one ending first (then starting first) wins."""
    floor = len(texts[min(min_tokens, len(texts) - 1)])

    def cut(text: str) -> str | None:
        hits = []
        for s in stop:
            start = text.find(s)
            while start >= 0 and start + len(s) <= floor:
                start = text.find(s, start + 1)
            if start >= 0:
                hits.append((start + len(s), start))
        if not hits:
            return None
        end, start = min(hits)
        return text[: end if include else start]

    num_tokens = len(texts) - 1
    for k in range(min_tokens + 1, num_tokens + 1):
        if (text := cut(texts[k])) is not None:
            return text, True, k
    text = cut(whole)  # the end: an incomplete character decodes at last (as U+FFFD)
    return (whole, False, num_tokens) if text is None else (text, True, num_tokens)


def texts_after_each_token(
    tokenizer: Any, prompt: list[int], output: list[int], skip_special_tokens: bool = True, echo_overlap: int = 0
) -> list[str]:
    """The text a stop string is looked for in after each token (index k: after k tokens): the output's text if it
    ended there (the oracle above over the first k tokens), less a trailing incomplete character. As vLLM's
    detokenizer, a character counts at the token completing its bytes, even inside a byte-fallback run."""
    return [""] + [oracle(tokenizer, prompt, output[:k], skip_special_tokens, echo_overlap).rstrip("\ufffd")
                   for k in range(1, len(output) + 1)]  # fmt: skip


def detokenize(
    tokenizer: Any,
    prompt: list[int],
    output: list[int],
    sizes: Sequence[int] = (),
    stop: Sequence[str] = (),
    skip_special_tokens: bool = True,
    include_stop: bool = False,
    min_tokens: int = 0,
    echo_overlap: int = 0,
) -> tuple[list[str], IncrementalDetokenizer]:
    """Feed `output` in deltas of `sizes` tokens (1 each by default), then flush, as Generation does."""
    d = IncrementalDetokenizer(
        tokenizer, list(stop), skip_special_tokens, prompt, include_stop, min_tokens, echo_overlap
    )
    sizes = list(sizes) or [1] * len(output)
    starts = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    deltas = [d.add(output[a:b]) for a, b in itertools.pairwise(starts)]
    return [*deltas, "" if d.is_stopped else d.flush()], d


def ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def chat_prompt(tokenizer: Any, content: str) -> list[int]:
    messages = [{"role": "user", "content": content}]
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))


def has_byte_fallback(tokenizer: Any) -> bool:
    return bool(tokenizer.convert_tokens_to_ids("<0xF0>") != tokenizer.unk_token_id)


def byte_ids(tokenizer: Any, data: bytes) -> list[int]:
    """The byte-fallback tokens of `data` (SentencePiece tokenizers only)."""
    return [tokenizer.convert_tokens_to_ids(f"<0x{b:02X}>") for b in data]


# --- the first token's leading space: the prompt primes the window -------------------------------------------------


def test_sentencepiece_keeps_the_leading_space_of_the_first_token(sentencepiece: Any) -> None:
    prompt, output = sentencepiece("Say")["input_ids"], ids(sentencepiece, "the capital")
    assert sentencepiece.convert_ids_to_tokens(output)[0] == "▁the"
    want = oracle(sentencepiece, prompt, output)
    deltas, _ = detokenize(sentencepiece, prompt, output)
    assert want == " the capital" and "".join(deltas) == want and deltas[0] == " the"
    assert decode(sentencepiece, output) == "the capital"  # decoding the output alone would lose it


@pytest.mark.parametrize("kind", ["bos_only", "empty", "specials_after_text"])
def test_sentencepiece_prompt_without_visible_tail(sentencepiece: Any, kind: str) -> None:
    """Only what the whole decode shows counts: no visible prompt text, no leading space; visible text before any
    number of skipped special tokens, the space."""
    bos, eos = sentencepiece.bos_token_id, sentencepiece.eos_token_id
    prompt = {"bos_only": [bos], "empty": [], "specials_after_text": [bos, *ids(sentencepiece, "Say"), *[eos] * 8]}
    output = ids(sentencepiece, "the capital")
    want = oracle(sentencepiece, prompt[kind], output)
    assert want == (" the capital" if kind == "specials_after_text" else "the capital")
    assert "".join(detokenize(sentencepiece, prompt[kind], output)[0]) == want


def test_chat_prompts_ending_in_template_tokens(tokenizer: Any) -> None:
    """Llama-2's template ends with "[/INST]" and the answer's first token carries a space; the byte-level one ends
    with "<s>assistant\\n" (a special token, then a newline)."""
    prompt = chat_prompt(tokenizer, "hi")
    output = ids(tokenizer, " Sure, Paris.")
    want = oracle(tokenizer, prompt, output)
    assert want == " Sure, Paris."
    for sizes in ([], [len(output)], [2] * len(output)):
        assert "".join(detokenize(tokenizer, prompt, output, sizes)[0]) == want


# --- characters split across tokens ---------------------------------------------------------------------------------


def test_split_characters_arrive_whole(tokenizer: Any) -> None:
    prompt = tokenizer("Say")["input_ids"]
    output = ids(tokenizer, " naïve 日本語 🎉 héllo wörld 😀!")
    assert len(output) > 12  # 日本語, 🎉 and 😀 are several tokens each
    deltas, _ = detokenize(tokenizer, prompt, output)
    assert "".join(deltas) == oracle(tokenizer, prompt, output) == " naïve 日本語 🎉 héllo wörld 😀!"
    assert not any("\ufffd" in delta for delta in deltas)
    assert any("🎉" in delta for delta in deltas) and any("😀" in delta for delta in deltas)


def test_sentencepiece_splits_characters_over_byte_tokens(sentencepiece: Any) -> None:
    """🎉 is four byte tokens: nothing of it is emitted before the run of byte tokens ends."""
    prompt = sentencepiece("Say")["input_ids"]
    output = [*ids(sentencepiece, " "), *byte_ids(sentencepiece, "🎉".encode()), *ids(sentencepiece, " the")]
    want = oracle(sentencepiece, prompt, output)
    deltas, _ = detokenize(sentencepiece, prompt, output)
    assert want == " 🎉 the" and "".join(deltas) == want and deltas[:6] == [" ", "", "", "", "", "🎉 the"]


def test_an_incomplete_character_at_the_end_decodes_as_the_whole_decode_does(tokenizer: Any) -> None:
    prompt = tokenizer("Say")["input_ids"]
    if has_byte_fallback(tokenizer):
        output = [*ids(tokenizer, " ok"), *byte_ids(tokenizer, "🎉".encode()[:2])]
    else:
        output = ids(tokenizer, " ok 🎉")[:-1]
    deltas, _ = detokenize(tokenizer, prompt, output)
    want = oracle(tokenizer, prompt, output)
    assert want.endswith("\ufffd") and "".join(deltas) == want and "\ufffd" not in "".join(deltas[:-1])


def test_sentencepiece_invalid_byte_run_decodes_as_the_whole_decode_does(sentencepiece: Any) -> None:
    """A run of byte tokens that is not valid UTF-8 decodes to one U+FFFD per byte, even the bytes of a complete
    character before the invalid one: so € is not final until the run ends."""
    prompt = sentencepiece("Say")["input_ids"]
    valid, invalid = byte_ids(sentencepiece, "€".encode()), byte_ids(sentencepiece, b"\xff")
    output = [*valid, *invalid, *ids(sentencepiece, " x")]
    deltas, _ = detokenize(sentencepiece, prompt, output)
    assert "".join(deltas) == oracle(sentencepiece, prompt, output) == "\ufffd" * 4 + " x"
    assert "€" not in "".join(deltas)


def test_sentencepiece_prompt_ending_inside_a_character(sentencepiece: Any) -> None:
    """A prompt of token ids may stop inside a character: the output that completes it carries it."""
    emoji = byte_ids(sentencepiece, "🎉".encode())
    prompt, output = [*sentencepiece("Say")["input_ids"], *emoji[:2]], [*emoji[2:], *ids(sentencepiece, " hi")]
    assert "".join(detokenize(sentencepiece, prompt, output)[0]) == "🎉 hi" == oracle(sentencepiece, prompt, output)


def test_special_tokens_kept_when_not_skipped(tokenizer: Any) -> None:
    eos = tokenizer.eos_token_id
    prompt = [*tokenizer("Say")["input_ids"], eos]
    output = [*ids(tokenizer, " a"), eos, *ids(tokenizer, " b")]
    deltas, _ = detokenize(tokenizer, prompt, output, skip_special_tokens=False)
    want = oracle(tokenizer, prompt, output, skip_special_tokens=False)
    assert "".join(deltas) == want and tokenizer.eos_token in want


# --- stop strings ---------------------------------------------------------------------------------------------------


def test_the_stop_string_completed_first_wins_whatever_the_deltas(tokenizer: Any) -> None:
    """ "azy" completes before "lazy dog" although "lazy dog" starts earlier: the text ends before "azy", in one
    delta or in many."""
    prompt, output = tokenizer("Say")["input_ids"], ids(tokenizer, " the lazy dog sleeps")
    for sizes in ([], [len(output)], [3] * len(output)):
        deltas, d = detokenize(tokenizer, prompt, output, sizes, stop=["lazy dog", "azy"])
        assert "".join(deltas) == d.text == " the l" and d.is_stopped


# --- randomized differential test -----------------------------------------------------------------------------------


def random_text(rng: random.Random) -> str:
    return "".join(rng.choice(WORDS) + rng.choice(["", " ", " ", "\n"]) for _ in range(rng.randint(1, 6)))


def random_prompt(rng: random.Random, tokenizer: Any, vocab_size: int) -> list[int]:
    specials = [tokenizer.bos_token_id, tokenizer.eos_token_id]
    kind = rng.randrange(6)
    if kind == 0:
        return []
    if kind == 1:  # any tokens: byte runs cut anywhere, invalid UTF-8, special tokens
        return [rng.randrange(vocab_size) for _ in range(rng.randint(1, 12))]
    if kind == 2:  # a chat prompt: ends in the template's tokens
        return chat_prompt(tokenizer, random_text(rng))
    prompt = list(tokenizer(random_text(rng), add_special_tokens=rng.random() < 0.5)["input_ids"])
    if kind == 3:  # cut anywhere, even inside a character
        return prompt[: rng.randint(1, len(prompt))]
    if kind == 4:  # more special tokens at the end than the priming window holds
        return prompt + [rng.choice(specials) for _ in range(rng.randint(1, 8))]
    return prompt


def random_output(rng: random.Random, tokenizer: Any, vocab_size: int, byte_tokens: list[int]) -> list[int]:
    output: list[int] = []
    for _ in range(rng.randint(1, 5)):
        kind = rng.randrange(5)
        if kind <= 1:
            output += ids(tokenizer, random_text(rng))
        elif kind == 2:
            output += [rng.randrange(vocab_size) for _ in range(rng.randint(1, 4))]
        elif kind == 3 and byte_tokens:  # byte fallback: mostly valid characters, sometimes cut or invalid
            data = rng.choice(["é", "日本", "🎉", "€", "\n"]).encode()
            cut = rng.choice([len(data), len(data), rng.randint(0, len(data))])
            output += [byte_tokens[b] for b in data[:cut]] + [rng.choice(byte_tokens)] * (rng.random() < 0.2)
        else:
            output.append(rng.choice([tokenizer.bos_token_id, tokenizer.eos_token_id]))
    return output


def random_sizes(rng: random.Random, num_tokens: int) -> list[int]:
    """How a stream may group the tokens into deltas: one each, all at once, or 1..k at a time."""
    kind = rng.randrange(3)
    if kind == 0:
        return [1] * num_tokens
    if kind == 1:
        return [num_tokens]
    k, sizes = rng.randint(2, 5), []
    while sum(sizes) < num_tokens:
        sizes.append(rng.randint(1, k))
    return sizes


def random_stop(rng: random.Random, text: str) -> list[str]:
    """Often substrings of the text (nested and overlapping ones among them), sometimes strings that never occur."""
    stop = []
    for _ in range(rng.choice([0, 0, 0, 1, 2, 3])):
        if text and rng.random() < 0.8:
            start = rng.randrange(len(text))
            stop.append(text[start : start + rng.randint(1, 4)])
        else:
            stop.append(rng.choice(["zzz", "🎉🎉", "\n\n", "é!"]))
    return stop


def test_random_streams_equal_the_oracle(tokenizer: Any) -> None:
    started = time.monotonic()
    rng = random.Random(1729)
    vocab_size = len(tokenizer)
    byte_tokens = byte_ids(tokenizer, bytes(range(256))) if has_byte_fallback(tokenizer) else []
    for case in range(NUM_RANDOM_CASES):
        prompt = random_prompt(rng, tokenizer, vocab_size)
        output = random_output(rng, tokenizer, vocab_size, byte_tokens)
        skip = rng.random() < 0.8
        text = oracle(tokenizer, prompt, output, skip)
        stop = random_stop(rng, text)
        include = rng.random() < 0.3
        min_tokens = 0 if rng.random() < 0.6 else rng.randint(1, len(output) + 1)
        texts = texts_after_each_token(tokenizer, prompt, output, skip)
        want, is_stopped, num_tokens = stop_with_min_tokens(texts, text, stop, min_tokens, include)
        if min_tokens == 0 and all(text.startswith(t) for t in texts):
            # then the first stop string to complete in the whole text, whatever the tokens (unless a text some
            # token had is not the whole's: a byte run a later byte made invalid, which that stop would have ended)
            assert (want, is_stopped) == cut_at_stop(text, stop, include)
        sizes = random_sizes(rng, len(output))
        streamed, d = detokenize(tokenizer, prompt, output, sizes, stop, skip, include, min_tokens)
        whole, one = detokenize(tokenizer, prompt, output, [len(output)], stop, skip, include, min_tokens)
        context = (
            f"case {case}: prompt={prompt} output={output} stop={stop} skip={skip} {include=} {min_tokens=} "
            f"deltas={streamed}"
        )
        assert "".join(streamed) == "".join(whole) == d.text == want, context
        assert d.is_stopped == one.is_stopped == is_stopped, context
        assert d.num_tokens == one.num_tokens == num_tokens, context  # none past the stop string's last token
        if "\ufffd" not in want:
            assert not any("\ufffd" in delta for delta in streamed), context
    assert time.monotonic() - started < 20


# --- echo: the prompt's text, then the output's ----------------------------------------------------------------------


def prompt_cut_inside(tokenizer: Any, text: str, character: str) -> tuple[list[int], list[int]]:
    """`text`'s tokens cut after the first token that ends inside `character` (a prompt of token ids may stop there),
    and the rest."""
    if has_byte_fallback(tokenizer):  # the character as byte tokens (SentencePiece has no token for it)
        before, after = text.split(character)
        tokens = [*ids(tokenizer, before), *byte_ids(tokenizer, character.encode()), *ids(tokenizer, after)]
    else:
        tokens = ids(tokenizer, text)
    cut = next(k for k in range(1, len(tokens)) if decode(tokenizer, tokens[:k]).endswith("\ufffd"))
    assert character in decode(tokenizer, tokens[: cut + 4]) and character not in decode(tokenizer, tokens[:cut])
    return tokens[:cut], tokens[cut:]


def echoed(
    tokenizer: Any, prompt: list[int], output: list[int], sizes: Sequence[int] = (), skip: bool = True, **kwargs: Any
) -> tuple[str, list[str], IncrementalDetokenizer]:
    """An echoed completion as the app answers it: the echo (the prompt decoded whole, specials shown, less the
    overlap) and the output's deltas."""
    echo = decode(tokenizer, prompt, skip_special_tokens=False)
    overlap = echo_overlap(tokenizer, prompt, echo, skip)
    deltas, d = detokenize(tokenizer, prompt, output, sizes, skip_special_tokens=skip, echo_overlap=overlap, **kwargs)
    return echo[: len(echo) - overlap], deltas, d


def test_an_echoed_prompt_ending_inside_a_character_shows_it_once(tokenizer: Any) -> None:
    """Found in review: echo of token ids ending inside 🎉 read 'Party \ufffd🎉 time' (the echo decoded the prompt
    alone, the output carried the character it completed). Now the echo leaves the U+FFFD to the output; the output
    alone still carries the character; an output that does not complete it starts with the U+FFFD."""
    prompt, rest = prompt_cut_inside(tokenizer, "Party 🎉 time", "🎉")
    echo, deltas, _ = echoed(tokenizer, prompt, rest)
    assert (echo, "".join(deltas)) == ("Party ", "🎉 time")
    assert "".join(detokenize(tokenizer, prompt, rest)[0]) == "🎉 time"  # no echo: as before
    broken = ids(tokenizer, "x y")
    echo, deltas, _ = echoed(tokenizer, prompt, broken)
    assert echo + "".join(deltas) == decode(tokenizer, prompt + broken) and "".join(deltas).startswith("\ufffd")
    whole = decode(tokenizer, prompt)  # no output (a scored prompt): the echo is the whole decode
    assert whole.endswith("\ufffd") and echo_overlap(tokenizer, prompt, whole) > 0


def test_random_echoes_read_as_the_whole_decode(tokenizer: Any) -> None:
    """Differential, 1,500 random cases per tokenizer (prompts of token ids cut anywhere, byte runs, special tokens,
    stop strings, min_tokens, delta sizes): the echoed output equals its oracle streamed or whole, and echo + output
    is decode(prompt + output) whenever the echo shows what the output's decode does (no special tokens skipped in
    the prompt), no stop string cut the output, and the output left the echo's text as it was (bytes continuing a
    byte-fallback run that ended the prompt can make the whole decode show the run's characters as U+FFFD: no echo
    can foresee that; the output's text then is the oracle's, as without echo)."""
    rng = random.Random(4242)
    vocab_size = len(tokenizer)
    byte_tokens = byte_ids(tokenizer, bytes(range(256))) if has_byte_fallback(tokenizer) else []
    specials = set(tokenizer.all_special_ids)
    overlapping = checked = 0
    for case in range(1500):
        prompt = random_prompt(rng, tokenizer, vocab_size)
        if prompt and rng.random() < 0.5:  # often inside a character: a byte run or a byte-level token cut short
            data = rng.choice(["é", "日本", "🎉", "€"]).encode()
            part = data[: rng.randint(1, len(data) - 1)]
            prompt += [byte_tokens[b] for b in part] if byte_tokens else ids(tokenizer, data.decode())[:1]
        output = random_output(rng, tokenizer, vocab_size, byte_tokens)
        skip = rng.random() < 0.8
        echo = decode(tokenizer, prompt, skip_special_tokens=False)
        overlap = echo_overlap(tokenizer, prompt, echo, skip)
        overlapping += overlap > 0
        text = oracle(tokenizer, prompt, output, skip, overlap)
        stop = random_stop(rng, text)
        min_tokens = 0 if rng.random() < 0.6 else rng.randint(1, len(output) + 1)
        texts = texts_after_each_token(tokenizer, prompt, output, skip, overlap)
        want, is_stopped, _ = stop_with_min_tokens(texts, text, stop, min_tokens)
        sizes = random_sizes(rng, len(output))
        shown, streamed, d = echoed(tokenizer, prompt, output, sizes, skip, stop=stop, min_tokens=min_tokens)
        _, whole, _ = echoed(tokenizer, prompt, output, [len(output)], skip, stop=stop, min_tokens=min_tokens)
        context = f"case {case}: prompt={prompt} output={output} {stop=} {skip=} {min_tokens=} deltas={streamed}"
        assert "".join(streamed) == "".join(whole) == want and d.is_stopped == is_stopped, context
        whole_decode = decode(tokenizer, prompt + output, skip)
        if not is_stopped and not (skip and specials & set(prompt)) and whole_decode.startswith(shown):
            checked += 1
            assert shown + want == whole_decode, context
    assert overlapping > 300 and checked > 400  # the cases this is about came up often


def test_the_holdback_is_the_longest_text_suffix_that_is_a_proper_stop_prefix(sentencepiece: Any) -> None:
    """Differential, 3,000 random cases over a 3-letter alphabet (repeats and overlaps abound) and stop strings up to
    12 long: the holdback, which checks only the prefixes ending in the text's last character, equals every prefix
    tried."""
    rng = random.Random(0)
    for case in range(3000):
        stop = ["".join(rng.choices("abc", k=rng.randint(1, 12))) for _ in range(rng.randint(1, 4))]
        d = IncrementalDetokenizer(sentencepiece, stop, True, [], False, 0)
        d.text = "".join(rng.choices("abc", k=rng.randint(0, 15)))
        want = max(
            (n for s in stop for n in range(1, min(len(s) - 1, len(d.text)) + 1) if d.text.endswith(s[:n])), default=0
        )
        assert d._holdback() == want, (case, stop, d.text)


def test_a_delta_without_tokens_keeps_the_prompt_logprobs_of_the_first(sentencepiece: Any) -> None:
    """Generation.begin ran again for each delta until a token came: an empty first delta (a commit's ack) followed
    by the first token's delta erased the prompt logprobs, and echo + logprobs then failed (a 500; found in review)."""
    from pdserve.api.backend import GenerationDelta, GenerationRequest
    from pdserve.api.generation import Generation

    request = GenerationRequest("r", [5, 6, 7], 4, 0.0, 1.0, 0, None, [], True, 0, True, prompt_logprobs=0)
    generation = Generation(request, sentencepiece, [])
    prompt = [(-1.0, ()), (-2.0, ())]
    generation.absorb(GenerationDelta([], None, None, 3, 2, prompt))
    generation.absorb(GenerationDelta([8], [(-0.5, ())], "length", 3, 2))
    assert generation.whole().prompt_logprobs == prompt and generation.usage().prompt_tokens_details.cached_tokens == 2
