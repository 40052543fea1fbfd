"""Incremental detokenization with stop strings.

Text is emitted only once it is final: never half a UTF-8 character (a decode ending in U+FFFD means a multi-byte
character is still split across tokens), and never a suffix that could still grow into a stop string (held back
until it cannot). A stop string ends the text just before it and never appears in the output, even when its
characters arrive in several tokens.
"""

from __future__ import annotations

from typing import Any

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turns a growing token sequence into text deltas, cut before the first stop string."""

    def __init__(self, tokenizer: Any, stop: list[str], skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self.text = ""  # decoded so far, held-back text included; cut before the stop string once one matched
        self.num_emitted = 0  # characters of self.text already returned
        self.is_stopped = False
        # Tokens [prefix_offset, read_offset) are decoded again as context for the new ones, so that tokenizers
        # which drop a word's leading space at the start of a decode keep it; read_offset: tokens already in text.
        self._prefix_offset = 0
        self._read_offset = 0

    def add(self, token_ids: list[int]) -> str:
        """Feed new tokens; return the text that became final (often empty). After a stop string, returns ""."""
        if self.is_stopped:
            return ""
        self.token_ids.extend(token_ids)
        self.text += self._decode_new(is_last=False)
        return self._emit_final(is_last=False)

    def flush(self) -> str:
        """At the end of generation: the rest of the text, held-back characters included. A trailing incomplete
        character decodes as U+FFFD, as a one-shot decode of the same tokens would."""
        if self.is_stopped:
            return ""
        self.text += self._decode_new(is_last=True)
        return self._emit_final(is_last=True)

    def _decode_new(self, is_last: bool) -> str:
        prefix = self._decode(self.token_ids[self._prefix_offset : self._read_offset])
        full = self._decode(self.token_ids[self._prefix_offset :])
        if not is_last and (full.endswith(_REPLACEMENT) or len(full) <= len(prefix)):
            return ""  # an incomplete character (or nothing visible yet): wait for more tokens
        self._prefix_offset, self._read_offset = self._read_offset, len(self.token_ids)
        return full[len(prefix) :]

    def _decode(self, token_ids: list[int]) -> str:
        return str(self.tokenizer.decode(token_ids, skip_special_tokens=self.skip_special_tokens))

    def _emit_final(self, is_last: bool) -> str:
        stop_at = self._find_stop()
        if stop_at is not None:
            self.text, self.is_stopped = self.text[:stop_at], True
            return self._emit(len(self.text))
        return self._emit(len(self.text) if is_last else len(self.text) - self._holdback())

    def _find_stop(self) -> int | None:
        # Emitted text never holds the start of a stop string (it was held back), so search only the rest.
        hits = [i for i in (self.text.find(s, self.num_emitted) for s in self.stop) if i >= 0]
        return min(hits, default=None)

    def _holdback(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of some stop string."""
        longest = 0
        for stop in self.stop:
            for n in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:n]):
                    longest = n
                    break
        return longest

    def _emit(self, end: int) -> str:
        end = max(end, self.num_emitted)
        delta = self.text[self.num_emitted : end]
        self.num_emitted = end
        return delta
