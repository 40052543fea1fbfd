"""How output pieces become OpenAI bodies: one format per endpoint, for whole responses and for stream chunks."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from itertools import accumulate
from typing import Any, Protocol

from pydantic import BaseModel

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

# A token holding part of a character decodes to U+FFFD on its own; its true bytes are unknown here, so they are
# reported as null (which OpenAI's schema allows) rather than as the bytes of U+FFFD.
_REPLACEMENT = "\ufffd"


@dataclass(frozen=True)
class ResponseMeta:
    """What every body and chunk of one response repeats."""

    id: str  # also the backend's request id
    model: str
    created: int  # unix seconds

    @classmethod
    def new(cls, id_prefix: str, model: str) -> ResponseMeta:
        return cls(f"{id_prefix}-{uuid.uuid4().hex}", model, int(time.time()))


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
    """Each token's own text, as logprobs report it (a token holding part of a character reads as U+FFFD)."""
    return [str(t) for t in tokenizer.batch_decode([[t] for t in token_ids])]


class CompletionFormat:
    def __init__(self, meta: ResponseMeta, tokenizer: Any, with_logprobs: bool) -> None:
        self.meta, self.tokenizer, self.with_logprobs = meta, tokenizer, with_logprobs
        self._text_offset = 0  # where the next reported token starts, counted over token texts (as vLLM does)

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
        return CompletionResponse(id=m.id, created=m.created, model=m.model, choices=choices, usage=usage)

    def _choice(self, piece: Piece) -> CompletionChoice:
        return CompletionChoice(text=piece.text, logprobs=self._logprobs(piece), finish_reason=piece.finish_reason)

    def _logprobs(self, piece: Piece) -> CompletionLogprobs | None:
        if not self.with_logprobs:
            return None
        tokens = token_texts(self.tokenizer, piece.token_ids)
        offsets = list(accumulate((len(t) for t in tokens), initial=self._text_offset))
        self._text_offset = offsets.pop()
        return CompletionLogprobs(tokens=tokens, token_logprobs=piece.logprobs, text_offset=offsets)


class ChatFormat:
    def __init__(self, meta: ResponseMeta, tokenizer: Any, with_logprobs: bool) -> None:
        self.meta, self.tokenizer, self.with_logprobs = meta, tokenizer, with_logprobs

    def whole(self, piece: Piece, usage: Usage) -> ChatCompletionResponse:
        choice = ChatChoice(
            message=AssistantMessage(content=piece.text),
            logprobs=self._logprobs(piece),
            finish_reason=piece.finish_reason,
        )
        m = self.meta
        return ChatCompletionResponse(id=m.id, created=m.created, model=m.model, choices=[choice], usage=usage)

    def opening(self) -> list[BaseModel]:
        return [self._chunk([ChunkChoice(delta=DeltaMessage(role="assistant", content=""))])]

    def chunk(self, piece: Piece) -> ChatCompletionChunk:
        delta = DeltaMessage(content=piece.text or None)
        return self._chunk(
            [ChunkChoice(delta=delta, logprobs=self._logprobs(piece), finish_reason=piece.finish_reason)]
        )

    def usage_chunk(self, usage: Usage) -> ChatCompletionChunk:
        return self._chunk([], usage)

    def _chunk(self, choices: list[ChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
        m = self.meta
        return ChatCompletionChunk(id=m.id, created=m.created, model=m.model, choices=choices, usage=usage)

    def _logprobs(self, piece: Piece) -> ChatLogprobs | None:
        if not self.with_logprobs:
            return None
        tokens = token_texts(self.tokenizer, piece.token_ids)
        return ChatLogprobs(
            content=[
                ChatTokenLogprob(token=t, logprob=lp, bytes=None if _REPLACEMENT in t else list(t.encode()))
                for t, lp in zip(tokens, piece.logprobs, strict=True)
            ]
        )
