"""Incremental detokenization with stop strings.

Text is emitted only when it is final: never half a UTF-8 character (decoding ends in U+FFFD while a multi-byte
character is split across tokens), and never a suffix that could still grow into a stop string (held back until
it cannot). A stop string ends the text just before it and never appears in the output, even when its characters
arrive in several tokens.
"""

from __future__ import annotations

from typing import Any

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, stop: list[str], skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self.text = ""  # all decoded text so far (including held-back text)
        self.num_emitted = 0  # characters of self.text already returned
        self.is_stopped = False
        self._prefix_offset = 0  # decoding restarts here: a few tokens of context keep spacing right
        self._read_offset = 0  # tokens already turned into self.text

    def add(self, token_ids: list[int]) -> str:
        """Feed new tokens; return the text that became final (may be empty)."""
        if self.is_stopped:
            return ""
        self.token_ids.extend(token_ids)
        self.text += self._decode_new()
        stop_at = self._find_stop()
        if stop_at is not None:
            self.text = self.text[:stop_at]
            self.is_stopped = True
            return self._emit(len(self.text))
        return self._emit(len(self.text) - self._holdback())

    def flush(self) -> str:
        """The rest of the text, at the end of generation (a trailing partial character decodes as U+FFFD, as a
        one-shot decode of the same tokens would)."""
        if not self.is_stopped and self._read_offset < len(self.token_ids):
            prefix = self._decode(self.token_ids[self._prefix_offset : self._read_offset])
            self.text += self._decode(self.token_ids[self._prefix_offset :])[len(prefix) :]
            self._read_offset = len(self.token_ids)
            stop_at = self._find_stop()
            if stop_at is not None:
                self.text, self.is_stopped = self.text[:stop_at], True
        return self._emit(len(self.text))

    def _decode_new(self) -> str:
        prefix = self._decode(self.token_ids[self._prefix_offset : self._read_offset])
        full = self._decode(self.token_ids[self._prefix_offset :])
        if full.endswith(_REPLACEMENT) or len(full) <= len(prefix):
            return ""  # an incomplete character: wait for the next token
        self._prefix_offset, self._read_offset = self._read_offset, len(self.token_ids)
        return full[len(prefix) :]

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens))

    def _find_stop(self) -> int | None:
        window_start = max(0, self.num_emitted - max((len(s) for s in self.stop), default=0))
        hits = [i for i in (self.text.find(s, window_start) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _holdback(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of a stop string."""
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
