"""How output pieces become OpenAI bodies: one format per endpoint, for whole responses and for stream chunks."""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass
from functools import lru_cache
from itertools import accumulate
from typing import Any, Protocol

from pydantic import BaseModel

from pdserve.api.backend import TokenLogprob
from pdserve.api.generation import Piece
from pdserve.api.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatTokenLogprob,
    ChunkChoice,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    DeltaMessage,
    Usage,
)

# A token holding part of a character decodes to U+FFFD on its own: its `bytes` are its vocabulary piece's raw
# bytes (byte-level BPE, byte fallback), which join with its neighbours' into the character, as OpenAI's field is
# for; null where the vocabulary does not say (OpenAI's schema allows it), never the bytes of U+FFFD.
_REPLACEMENT = "\ufffd"
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte fallback


@dataclass(frozen=True)
class ResponseMeta:
    """What every body and chunk of one response repeats."""

    id: str  # also the backend's request id
    model: str
    created: int  # unix seconds
    fingerprint: str | None = None  # OpenAI's system_fingerprint: what served it (changes with the configuration)

    @classmethod
    def new(cls, id_prefix: str, model: str, fingerprint: str | None = None) -> ResponseMeta:
        return cls(f"{id_prefix}-{uuid.uuid4().hex}", model, int(time.time()), fingerprint)


class ResponseFormat(Protocol):
    meta: ResponseMeta
    with_logprobs: bool

    def whole(self, piece: Piece, usage: Usage) -> BaseModel: ...

    def opening(self) -> list[BaseModel]:
        """Chunks sent before any output."""
        ...

    def chunk(self, piece: Piece) -> BaseModel: ...

    def usage_chunk(self, usage: Usage) -> BaseModel: ...


def token_texts(tokenizer: Any, token_ids: list[int]) -> list[str]:
    """Each token's own text, as logprobs report it (a token holding part of a character reads as U+FFFD), so that
    the tokens spell the text: a SentencePiece decoder drops a decode's leading space, which a word-initial token
    ("▁wor") owns — it is put back from the token's piece, as vLLM does."""
    texts = [str(t) for t in tokenizer.batch_decode([[t] for t in token_ids])]
    mark = _space_mark(tokenizer)
    if mark is None:
        return texts
    pieces = tokenizer.convert_ids_to_tokens(token_ids)
    for i, (piece, text) in enumerate(zip(pieces, texts, strict=True)):
        if isinstance(piece, str) and piece.startswith(mark):
            missing = (len(piece) - len(piece.lstrip(mark))) - (len(text) - len(text.lstrip(" ")))
            texts[i] = " " * max(0, missing) + text
    return texts


@lru_cache(maxsize=8)
def _decoder_steps(tokenizer: Any) -> tuple[dict[str, Any], ...]:
    """The steps of a fast tokenizer's decoder (a Sequence's, or the one), read once per tokenizer: its JSON holds the
    whole vocabulary."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return ()
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    return tuple(decoder.get("decoders", []) if decoder.get("type") == "Sequence" else [decoder])


@lru_cache(maxsize=8)
def _space_mark(tokenizer: Any) -> str | None:
    """The word-boundary mark a SentencePiece-style decoder turns into a space ("▁": a Metaspace decoder, or
    Llama's Replace ▁ → " "), else None (byte-level BPE spells its spaces itself)."""
    for step in _decoder_steps(tokenizer):
        if step.get("type") == "Metaspace":
            return str(step.get("replacement", "▁"))
        if step.get("type") == "Replace" and step.get("content") == " " and step.get("pattern", {}).get("String"):
            return str(step["pattern"]["String"])
    return None


def token_names(tokenizer: Any, token_ids: list[int], as_ids: bool) -> list[str]:
    """How logprobs name tokens: by their text (`token_texts`), or as "token_id:<id>" (vLLM's
    `return_tokens_as_token_ids`, for clients that must tell apart tokens with the same text)."""
    return [f"token_id:{t}" for t in token_ids] if as_ids else token_texts(tokenizer, token_ids)


def top_texts(
    tokenizer: Any, logprobs: list[TokenLogprob], as_ids: bool = False
) -> list[tuple[float, list[tuple[str, float]]]]:
    """Each token's logprob with its alternatives named by their text (one batched decode for all of them), or by
    their ids (`token_names`)."""
    ids = [token_id for _, alternatives in logprobs for token_id, _ in alternatives]
    texts = iter(token_names(tokenizer, ids, as_ids))
    return [(lp, [(next(texts), alp) for _, alp in alternatives]) for lp, alternatives in logprobs]


def token_bytes(tokenizer: Any, token_ids: list[int], texts: list[str]) -> list[list[int] | None]:
    """Each token's UTF-8 bytes (OpenAI's `bytes`): its text's, or for a token holding part of a character (its text
    U+FFFD) its vocabulary piece's raw bytes, null where the vocabulary does not give them."""
    split = [i for i, text in enumerate(texts) if _REPLACEMENT in text]
    found: list[list[int] | None] = [list(text.encode()) for text in texts]
    if split:
        pieces = tokenizer.convert_ids_to_tokens([token_ids[i] for i in split])
        byte_of = _byte_level_alphabet(tokenizer)
        for i, piece in zip(split, pieces, strict=True):
            found[i] = _piece_bytes(piece, byte_of)
    return found


def _piece_bytes(piece: Any, byte_of: dict[str, int] | None) -> list[int] | None:
    if not isinstance(piece, str):
        return None
    if match := _BYTE_PIECE.fullmatch(piece):
        return [int(match[1], 16)]
    if byte_of is not None and piece and all(c in byte_of for c in piece):
        return [byte_of[c] for c in piece]
    return None


@lru_cache(maxsize=8)
def _byte_level_alphabet(tokenizer: Any) -> dict[str, int] | None:
    """A byte-level BPE vocabulary's character for each byte, inverted (GPT-2's map: printable Latin-1 bytes stand
    for themselves, the others for 256, 257, ... in order); None for a tokenizer without a ByteLevel decoder."""
    if not any(step.get("type") == "ByteLevel" for step in _decoder_steps(tokenizer)):
        return None
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + n): b for n, b in enumerate(others)}


@dataclass(frozen=True)
class Echo:
    """The prompt a completion repeats before its output (`echo`)."""

    text: str
    token_ids: list[int]


class CompletionFormat:
    def __init__(
        self,
        meta: ResponseMeta,
        tokenizer: Any,
        with_logprobs: bool,
        echo: Echo | None = None,
        prompt_token_ids: list[int] | None = None,
        tokens_as_ids: bool = False,
    ) -> None:
        """`prompt_token_ids`: return token ids (vLLM's `return_token_ids`): the prompt's with the choice's first
        body, each body's output ids. `tokens_as_ids`: logprobs name tokens by id (`token_names`)."""
        self.meta, self.tokenizer, self.with_logprobs = meta, tokenizer, with_logprobs
        self._text_offset = 0  # where the next reported token starts, counted over token texts (as vLLM does)
        self._echo = echo  # until the first choice goes out
        self._returns_ids = prompt_token_ids is not None
        self._prompt_token_ids = prompt_token_ids  # until the first choice goes out
        self._tokens_as_ids = tokens_as_ids

    def whole(self, piece: Piece, usage: Usage) -> CompletionResponse:
        return self._body([self._choice(piece)], usage)

    def opening(self) -> list[BaseModel]:
        return []

    def chunk(self, piece: Piece) -> CompletionResponse:
        return self._body([self._choice(piece)], None)

    def usage_chunk(self, usage: Usage) -> CompletionResponse:
        return self._body([], usage)

    def _body(self, choices: list[CompletionChoice], usage: Usage | None) -> CompletionResponse:
        m = self.meta
        return CompletionResponse(
            id=m.id, created=m.created, model=m.model, choices=choices, usage=usage, system_fingerprint=m.fingerprint
        )

    def _choice(self, piece: Piece) -> CompletionChoice:
        text, token_ids, logprobs = piece.text, piece.token_ids, list[TokenLogprob | None](piece.logprobs)
        if self._echo is not None:  # the first choice repeats the prompt: its first token has no logprob
            echo, self._echo = self._echo, None
            text, token_ids = echo.text + text, echo.token_ids + token_ids
            logprobs = [None, *(piece.prompt_logprobs or []), *logprobs]
        choice_logprobs = self._logprobs(token_ids, logprobs) if self.with_logprobs else None
        choice = CompletionChoice(
            text=text, logprobs=choice_logprobs, finish_reason=piece.finish_reason, stop_reason=piece.stop_reason
        )
        if self._returns_ids:  # the output's own ids (an echo's are the prompt's); the prompt's with the first body
            choice.token_ids, choice.prompt_token_ids = piece.token_ids, self._prompt_token_ids
            self._prompt_token_ids = None
        return choice

    def _logprobs(self, token_ids: list[int], logprobs: list[TokenLogprob | None]) -> CompletionLogprobs:
        tokens = token_names(self.tokenizer, token_ids, self._tokens_as_ids)
        offsets = list(accumulate((len(t) for t in tokens), initial=self._text_offset))
        self._text_offset = offsets.pop()
        known = [lp for lp in logprobs if lp is not None]
        # As vLLM and OpenAI: the top ones and the sampled one, which logprobs=0 still reports
        named = iter(top_texts(self.tokenizer, known, self._tokens_as_ids))
        top = [
            None if lp is None else {**dict(alternatives), token: value}
            for token, lp in zip(tokens, logprobs, strict=True)
            for value, alternatives in ([next(named)] if lp is not None else [(0.0, [])])
        ]
        return CompletionLogprobs(
            tokens=tokens,
            token_logprobs=[None if lp is None else lp[0] for lp in logprobs],
            top_logprobs=top,
            text_offset=offsets,
        )


class ChatFormat:
    def __init__(
        self,
        meta: ResponseMeta,
        tokenizer: Any,
        with_logprobs: bool,
        prompt_token_ids: list[int] | None = None,
        tokens_as_ids: bool = False,
    ) -> None:
        """`prompt_token_ids`, `tokens_as_ids`: as CompletionFormat's (the prompt's ids go in the whole body, or in
        a stream's opening chunk)."""
        self.meta, self.tokenizer, self.with_logprobs = meta, tokenizer, with_logprobs
        self._prompt_token_ids, self._tokens_as_ids = prompt_token_ids, tokens_as_ids

    def whole(self, piece: Piece, usage: Usage) -> ChatCompletionResponse:
        choice = ChatChoice(
            message=AssistantMessage(content=piece.text),
            logprobs=self._logprobs(piece),
            finish_reason=piece.finish_reason,
            stop_reason=piece.stop_reason,
            token_ids=self._output_ids(piece),
        )
        m = self.meta
        return ChatCompletionResponse(
            id=m.id, created=m.created, model=m.model, choices=[choice], usage=usage, system_fingerprint=m.fingerprint,
            prompt_token_ids=self._prompt_token_ids,
        )  # fmt: skip

    def opening(self) -> list[BaseModel]:
        opening = self._chunk([ChunkChoice(delta=DeltaMessage(role="assistant", content=""))])
        opening.prompt_token_ids = self._prompt_token_ids
        return [opening]

    def chunk(self, piece: Piece) -> ChatCompletionChunk:
        delta = DeltaMessage(content=piece.text or None)
        return self._chunk(
            [
                ChunkChoice(
                    delta=delta,
                    logprobs=self._logprobs(piece),
                    finish_reason=piece.finish_reason,
                    stop_reason=piece.stop_reason,
                    token_ids=self._output_ids(piece),
                )
            ]
        )

    def _output_ids(self, piece: Piece) -> list[int] | None:
        return piece.token_ids if self._prompt_token_ids is not None else None

    def usage_chunk(self, usage: Usage) -> ChatCompletionChunk:
        return self._chunk([], usage)

    def _chunk(self, choices: list[ChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
        m = self.meta
        return ChatCompletionChunk(
            id=m.id, created=m.created, model=m.model, choices=choices, usage=usage, system_fingerprint=m.fingerprint
        )

    def _logprobs(self, piece: Piece) -> ChatLogprobs | None:
        if not self.with_logprobs:
            return None
        alternative_ids = [token_id for _, alternatives in piece.logprobs for token_id, _ in alternatives]
        # One decode and one bytes lookup for the tokens and their alternatives, in that order; `bytes` are always
        # the token's own, whatever names it
        ids = piece.token_ids + alternative_ids
        texts = token_texts(self.tokenizer, ids)
        found = token_bytes(self.tokenizer, ids, texts)
        names = token_names(self.tokenizer, ids, as_ids=True) if self._tokens_as_ids else texts
        tokens, alternative_texts = names[: len(piece.token_ids)], names[len(piece.token_ids) :]
        named = list(zip(alternative_texts, found[len(tokens) :], strict=True))
        starts = list(accumulate((len(alternatives) for _, alternatives in piece.logprobs), initial=0))
        return ChatLogprobs(
            content=[
                ChatTokenLogprob(
                    token=t, logprob=lp, bytes=found[i],
                    top_logprobs=[
                        {"token": text, "logprob": alp, "bytes": bytes_}
                        for (text, bytes_), (_, alp) in zip(named[starts[i] : starts[i + 1]], alternatives, strict=True)
                    ],
                )
                for i, (t, (lp, alternatives)) in enumerate(zip(tokens, piece.logprobs, strict=True))
            ]
        )  # fmt: skip
