"""Incremental detokenization with stop strings.

The oracle: the output's text is what decoding the whole sequence adds to decoding the prompt alone,
`decode(prompt + output)[len(common prefix of decode(prompt) and decode(prompt + output)):]`, with the request's
`skip_special_tokens` (and no clean-up of tokenization spaces). That is what vLLM answers (it too primes its
incremental detokenizer with the prompt's tail), and what a client continuing the prompt expects: a SentencePiece
tokenizer (Llama-2, Mistral) strips the leading space of a decode's first token, so `decode(output)` alone would
turn a completion of "Say" into "Hello" where the text reads "Say Hello"; here it is " Hello". When nothing visible
precedes the output (an empty prompt, or only special tokens being skipped), the space is stripped, as the whole
decode strips it. The common prefix (rather than `decode(prompt)`) matters only for a prompt of token ids that ends
inside a character: the output that completes it carries that character. Streaming and one-shot decoding give this
same text, whatever the deltas' sizes.

With `echo` (a completion repeating its prompt before the output) that rule would show such a character twice: the
echo `decode(prompt)` ends in U+FFFD, and the output begins with the character it completes. So there the U+FFFD
the prompt's text ends in (`echo_overlap`) are the output's: the echo goes out without them, the output's text starts
before them, and echo + output read as `decode(prompt + output)`, whether the output completes the character (which
it then carries) or not (it then starts with the U+FFFD).

How: tokens are decoded in a short window. Tokens [prefix_offset, read_offset) are decoded again as context for the
new ones, and the text the new ones add is theirs. The window starts primed with the prompt's last few visible tokens
(vLLM's idea), so the first output token is decoded in context and the prompt's own text is never emitted. The window
moves only past tokens that added visible text (so its context, once it has one, is never empty again), never stops
inside a character, and never inside a run of byte-fallback tokens (`<0xE2>`: the tokenizers decoder decodes a run
as a whole, and a run that is not valid UTF-8 becomes one U+FFFD per byte, so a run's text is final only once the
run ends). So text is emitted only once it is final: never half a character, never a U+FFFD that a later token
would replace. At the end, an incomplete character decodes as the one-shot decode does (U+FFFD).

Special tokens skipped with `skip_special_tokens` are dropped on arrival, exactly as the tokenizer drops them before
its decoder runs. `spaces_between_special_tokens` (vLLM's; the API accepts only its default, true) is what a fast
tokenizer's decode does already: it never adds spaces of its own around added tokens.

Stop strings: the text ends just before the stop string that completes first (the one ending earliest; of those, the
one starting earliest), which is where generation would stop if text arrived one character at a time, whatever the
deltas' sizes. A stop string never appears in the output, even when its characters arrive in several tokens: a
suffix that could still grow into one is held back until it cannot. As in vLLM, tokens are checked one at a time:
the output ends with the token whose text completes the stop string (`num_tokens`; a delta's later tokens are not
taken), and only a stop string ending in the text of a token past the first `min_tokens` counts. A token's text, for
this check, is what the output would read if it ended there: the held-back tokens' text decoded as the end would
decode it, less a trailing incomplete character. So a character whose bytes one token completes counts at that
token, even inside a byte-fallback run whose text is not final yet (vLLM's detokenizer emits it there too): ending
the output there makes it final.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

_REPLACEMENT = "\ufffd"
# Visible prompt tokens decoded as the first output tokens' context (vLLM's INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET):
# more than one, so that a prompt ending inside a character (token ids may) holds that character's first byte.
PRIMING_TOKENS = 5
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # what the tokenizers ByteFallback decoder turns into a byte


@dataclass(frozen=True)
class _Vocab:
    special_ids: frozenset[int]  # what decode(skip_special_tokens=True) drops
    byte_ids: frozenset[int]  # byte-fallback tokens


@lru_cache(maxsize=8)
def _vocab(tokenizer: Any) -> _Vocab:
    """Read once per tokenizer (a vocabulary scan: milliseconds)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # a fast tokenizer: its decode skips the added tokens marked special
        special_ids = frozenset(i for i, t in backend.get_added_tokens_decoder().items() if t.special)
    else:
        special_ids = frozenset(tokenizer.all_special_ids)
    byte_ids = frozenset(i for token, i in tokenizer.get_vocab().items() if _BYTE_TOKEN.fullmatch(token))
    return _Vocab(special_ids, byte_ids)


class IncrementalDetokenizer:
    """Turns a growing token sequence into text deltas, cut before the first stop string."""

    def __init__(
        self,
        tokenizer: Any,
        stop: list[str],
        skip_special_tokens: bool = True,
        prompt_token_ids: Sequence[int] = (),
        include_stop_str: bool = False,
        min_tokens: int = 0,
        echo_overlap: int = 0,
    ) -> None:
        self.tokenizer = tokenizer
        self.min_tokens = min_tokens  # no stop string counts before this many output tokens
        self.include_stop_str = include_stop_str  # vLLM's include_stop_str_in_output: keep the stop string
        self.stop = [s for s in stop if s]
        # For the holdback: by a stop string's character, the lengths (longest first) of its proper prefixes ending
        # in it — the only ones a text ending in that character can end with.
        self._prefix_ends = [_prefix_lengths_by_last_char(s) for s in self.stop]
        self.skip_special_tokens = skip_special_tokens
        vocab = _vocab(tokenizer)
        self._hidden_ids = vocab.special_ids if skip_special_tokens else frozenset()
        self._byte_ids = vocab.byte_ids
        self.text = ""  # decoded so far, held-back text included; cut before the stop string once one matched
        self.num_emitted = 0  # characters of self.text already returned
        self.num_tokens = 0  # output tokens taken (skipped special ones too); none after a stop string's last one
        self._stop_floor = 0  # a stop string counts only if it ends past this many characters (min_tokens' text)
        self._stop_text = ""  # the text if the output ended now, less a trailing incomplete character
        self.is_stopped = False
        self.stop_string: str | None = None  # the stop string that ended the output (vLLM's stop_reason)
        # The tokens the decoder sees: the prompt's tail, then the output, skipped special tokens left out.
        # Tokens [prefix_offset, read_offset) are decoded again as context for the new ones; read_offset: tokens
        # whose text is in self.text (or, for the prompt's tail, is not output).
        self._token_ids = self._prompt_tail(prompt_token_ids)
        self._prefix_offset = 0
        self._read_offset = len(self._token_ids)
        # Characters at the end of the prompt's text that the output's text starts with (`echo_overlap`); until the
        # window first moves past the prompt's tail (0 then).
        self._prompt_overlap = echo_overlap

    def trailing_replacements(self) -> int:
        """How many U+FFFD the prompt's text (its tail, as this detokenizer decodes it) ends in."""
        tail = self._decode(self._token_ids[: self._read_offset])
        return len(tail) - len(tail.rstrip(_REPLACEMENT))

    def add(self, token_ids: list[int]) -> str:
        """Feed new tokens; return the text that became final (often empty). With stop strings the tokens go in one
        at a time, and those after the one completing a stop string are not taken. After a stop string, returns ""."""
        if self.is_stopped:
            return ""
        if not self.stop:  # nothing to stop at: the delta at once
            self.num_tokens += len(token_ids)
            self._token_ids.extend(t for t in token_ids if t not in self._hidden_ids)
            self.text += self._decode_new(is_last=False)
            return self._emit_final(is_last=False)
        emitted = []
        for token_id in token_ids:
            self.num_tokens += 1
            if token_id not in self._hidden_ids:
                self._token_ids.append(token_id)
            self.text += self._decode_new(is_last=False)
            self._stop_text = (self.text + self._decode_held()).rstrip(_REPLACEMENT)
            if self.num_tokens <= self.min_tokens:
                self._stop_floor = len(self._stop_text)
            emitted.append(self._emit_final(is_last=False))
            if self.is_stopped:
                break
        return "".join(emitted)

    def flush(self) -> str:
        """At the end of generation: the rest of the text, held-back characters included. A trailing incomplete
        character decodes as U+FFFD, as a one-shot decode of the same tokens would."""
        if self.is_stopped:
            return ""
        self.text += self._decode_new(is_last=True)
        return self._emit_final(is_last=True)

    def _prompt_tail(self, prompt_token_ids: Sequence[int]) -> list[int]:
        """The last PRIMING_TOKENS visible prompt tokens, and further back to the start of a byte-fallback run the
        first of them is in (a run decodes as a whole)."""
        tail: list[int] = []
        for token_id in reversed(prompt_token_ids):
            if token_id in self._hidden_ids:
                continue
            if len(tail) >= PRIMING_TOKENS and not (token_id in self._byte_ids and tail[-1] in self._byte_ids):
                break
            tail.append(token_id)
        return tail[::-1]

    def _decode_new(self, is_last: bool) -> str:
        end = len(self._token_ids) if is_last else self._readable_end()
        if end <= self._read_offset and not (is_last and self._prompt_overlap):  # (an output with no visible token
            return ""  # still ends with the characters it took from the echo)
        prefix = self._decode(self._token_ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._token_ids[self._prefix_offset : end])
        if not is_last and full.endswith(_REPLACEMENT):
            return ""  # an incomplete character: wait for more tokens
        start = self._new_text_start(prefix, full)
        if len(full) <= start:
            return ""  # nothing visible yet: wait, so that the window moves only past tokens that added text
        self._prefix_offset, self._read_offset = self._read_offset, end
        self._prompt_overlap = 0
        return full[start:]

    def _decode_held(self) -> str:
        """The text the tokens not yet decoded into self.text would add if the output ended now (as `flush` would
        decode them)."""
        if self._read_offset >= len(self._token_ids):
            return ""
        prefix = self._decode(self._token_ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._token_ids[self._prefix_offset :])
        return full[self._new_text_start(prefix, full) :]

    def _new_text_start(self, prefix: str, full: str) -> int:
        """Where the new tokens' text starts in `full` (the window decoded), `prefix` being its context's text. The
        window's own text is final, so full extends prefix; only the prompt's tail may end in a character or a byte
        run that the output completes (or breaks): then the common part is the prompt's, less what an echo leaves
        to the output."""
        return _common_prefix_len(prefix[: len(prefix) - self._prompt_overlap], full)

    def _readable_end(self) -> int:
        """Where an open byte-fallback run at the end starts (its text may still change), else the end."""
        end = len(self._token_ids)
        while end > 0 and self._token_ids[end - 1] in self._byte_ids:
            end -= 1
        return end

    def _decode(self, token_ids: list[int]) -> str:
        text = self.tokenizer.decode(
            token_ids, skip_special_tokens=self.skip_special_tokens, clean_up_tokenization_spaces=False
        )
        return str(text)

    def _emit_final(self, is_last: bool) -> str:
        text = self.text if is_last else self._stop_text
        hit = self._find_stop(text)
        if hit is not None:  # the output ends here: `text` is its final text
            end, start, self.stop_string = hit
            self.text, self.is_stopped = text[: end if self.include_stop_str else start], True
            return self._emit(len(self.text))
        return self._emit(len(self.text) if is_last else len(self.text) - self._holdback())

    def _find_stop(self, text: str) -> tuple[int, int, str] | None:
        """(end, start, the string) of the stop string completed first in `text`, ending past `min_tokens`' text.
        Emitted text never holds the start of one that counts (it was held back), so only the rest is searched."""
        hits: list[tuple[int, int, str]] = []  # (end, start, stop)
        for stop in self.stop:
            start = text.find(stop, self.num_emitted)
            while start >= 0 and start + len(stop) <= self._stop_floor:  # within min_tokens' text: does not count
                start = text.find(stop, start + 1)
            if start >= 0:
                hits.append((start + len(stop), start, stop))
        return min(hits) if hits else None

    def _holdback(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of some stop string."""
        if not self.text:
            return 0
        longest, last = 0, self.text[-1]
        for stop, prefix_ends in zip(self.stop, self._prefix_ends, strict=True):
            for n in prefix_ends.get(last, ()):
                if n <= longest:
                    break
                if n <= len(self.text) and self.text.endswith(stop[:n]):
                    longest = n
                    break
        return longest

    def _emit(self, end: int) -> str:
        end = max(end, self.num_emitted)
        delta = self.text[self.num_emitted : end]
        self.num_emitted = end
        return delta


def _prefix_lengths_by_last_char(stop: str) -> dict[str, list[int]]:
    lengths: dict[str, list[int]] = {}
    for n in range(len(stop) - 1, 0, -1):
        lengths.setdefault(stop[n - 1], []).append(n)
    return lengths


def _common_prefix_len(a: str, b: str) -> int:
    if b.startswith(a):
        return len(a)
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def echo_overlap(tokenizer: Any, prompt_token_ids: Sequence[int], echo: str, skip_special_tokens: bool = True) -> int:
    """How many characters at the end of `echo` (the prompt's text, repeated before the output) are the output's:
    the U+FFFD that both the echo and the prompt's text as the output's detokenizer decodes it end in. The echo goes
    out without them; pass the count to that detokenizer as `echo_overlap`."""
    tail = IncrementalDetokenizer(tokenizer, [], skip_special_tokens, prompt_token_ids).trailing_replacements()
    return min(tail, len(echo) - len(echo.rstrip(_REPLACEMENT)))
