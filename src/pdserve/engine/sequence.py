"""A request's state inside the engine."""

from __future__ import annotations

import enum
import time

from pdserve.engine.request import EngineRequest, FinishReason, LayerSink, TokenLogprob
from pdserve.kvcache import BlockHash, hash_block_chain


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()  # queued, holds no blocks (but a committed reservation waiting for a seat: its own)
    RUNNING = enum.auto()  # scheduled step by step, holds blocks
    HELD = enum.auto()  # prefill-only result or KV reservation: holds blocks, not scheduled
    FINISHED = enum.auto()  # holds nothing


class Sequence:
    def __init__(self, request: EngineRequest, arrival: int, is_prefill_only: bool = False) -> None:
        self.request = request
        self.sampling = request.sampling
        self.arrival = arrival  # admission order; later arrivals are preempted first
        self.is_prefill_only = is_prefill_only
        self.status = SequenceStatus.WAITING
        self.token_ids = list(request.prompt_token_ids)  # prompt + output
        self.num_prompt_tokens = len(request.prompt_token_ids)
        self.num_computed_tokens = 0  # tokens whose KV is in this sequence's blocks
        self.num_cached_tokens = -1  # prefix-cache hit at first admission; -1 until admitted
        self.arrival_time = time.monotonic()
        self.queue_s = 0.0  # from arrival to first admission
        self.block_ids: list[int] = []
        self.num_registered_blocks = 0  # leading blocks already offered to the prefix cache
        self._block_hashes: list[BlockHash] = []
        self.logprobs: list[TokenLogprob] = []
        self.prompt_logprobs: list[TokenLogprob] = []  # of prompt tokens 1.. when asked for, filled as computed
        self.finish_reason: FinishReason | None = None
        self.layer_sink: LayerSink | None = None  # told when each layer of the prompt's KV is written
        self.held_at = 0.0  # time.monotonic() it became HELD (a prefill-only result): the reaper's clock
        self.last_step = 0  # the scheduler's step that last gave it a chunk: decodes past the budget take turns

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    def block_hashes(self, block_size: int) -> list[BlockHash]:
        """Hash chain over every full block of the known tokens (extended as tokens arrive)."""
        if len(self._block_hashes) < self.num_tokens // block_size:
            self._block_hashes = hash_block_chain(
                self.token_ids, block_size, self.request.cache_salt, self._block_hashes
            )
        return self._block_hashes
