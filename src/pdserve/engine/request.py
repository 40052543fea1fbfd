"""What goes into the engine and what comes out of it."""

from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass
from typing import Protocol

MAX_TOP_LOGPROBS = 20
# A sampled token's log-probability under the raw model distribution, and the top alternatives when asked for:
# (logprob, ((token_id, logprob), ...) most likely first; empty when top_logprobs is 0)
TokenLogprob = tuple[float, tuple[tuple[int, float], ...]]


class InvalidRequestError(ValueError):
    """The request itself is invalid (the client's input): its message names the problem and is safe to show the
    client. Every other exception out of the engine is the server's fault."""


class FinishReason(str, enum.Enum):
    STOP = "stop"  # a stop token (EOS or stop_token_ids) was sampled
    LENGTH = "length"  # max_tokens reached, or the context is full
    ABORT = "abort"  # aborted by the caller


GREEDY_BELOW_TEMPERATURE = 1e-5  # vLLM's _SAMPLING_EPS
MIN_TEMPERATURE = 1e-2  # vLLM's _MAX_TEMP: a smaller positive temperature samples at this one


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    seed: int | None = None  # reproducible sampling: the same seed, the same tokens in every mode (float32; sampler.py)
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False  # keep going past EOS (benchmarks); stop_token_ids still stop
    min_tokens: int = 0  # stop tokens are masked until this many tokens were generated
    logprobs: bool = False  # return the log-probability of each chosen token (raw model distribution)
    top_logprobs: int = 0  # with logprobs: also the this many most likely tokens and their log-probabilities
    min_p: float = 0.0  # drop tokens whose probability is below min_p x the most likely one's (after temperature)
    # Each prompt token's log-probability given the tokens before it (all but the first), with this many top
    # alternatives; None: not asked. Such a prompt is computed whole: no prefix-cache hit skips a token.
    prompt_logprobs: int | None = None
    # OpenAI's and vLLM's logit adjustments, applied before temperature (greedy too), as vLLM applies them:
    # logit_bias adds to a token's logit; presence/frequency penalties subtract for each token already generated
    # (once / per occurrence); repetition_penalty (HF's) divides a positive logit of any token in the prompt or the
    # output by it and multiplies a negative one.
    logit_bias: tuple[tuple[int, float], ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    # Output tokens generated before this request, now the last ones of its prompt (a migrated stream's
    # continuation): seeded draws continue from this output index, and presence/frequency penalties count them as
    # output, so the continuation samples what the interrupted stream would have.
    num_prior_output_tokens: int = 0

    def __post_init__(self) -> None:
        # As vLLM: a positive temperature below 0.01 samples at 0.01 (dividing logits by 1e-38 overflowed every logit
        # to +-inf and the draw to NaN); only 0 is greedy.
        if 0 < self.temperature < MIN_TEMPERATURE:
            object.__setattr__(self, "temperature", MIN_TEMPERATURE)

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE

    @property
    def adjusts_logits(self) -> bool:
        """Whether logit_bias or a penalty changes this request's logits (it then needs its token history)."""
        return (
            bool(self.logit_bias)
            or bool(self.presence_penalty)
            or bool(self.frequency_penalty)
            or (self.repetition_penalty != 1.0)
        )

    def validate(self) -> None:
        """Raise InvalidRequestError naming the first invalid field."""
        if self.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise InvalidRequestError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not (0 < self.top_p <= 1):
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise InvalidRequestError(f"top_k must be -1, 0 (disabled) or positive, got {self.top_k}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise InvalidRequestError(f"min_tokens must be in [0, max_tokens], got {self.min_tokens}")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidRequestError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidRequestError(f"prompt_logprobs must be in [0, {MAX_TOP_LOGPROBS}]")
        if not (-2 <= self.presence_penalty <= 2 and -2 <= self.frequency_penalty <= 2):
            raise InvalidRequestError("presence_penalty and frequency_penalty must be in [-2, 2]")
        if not (self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty)):  # vLLM: any positive value
            raise InvalidRequestError(f"repetition_penalty must be positive and finite, got {self.repetition_penalty}")
        if any(t < 0 or not -100 <= b <= 100 for t, b in self.logit_bias):
            raise InvalidRequestError("logit_bias maps token ids to biases in [-100, 100]")
        if len({t for t, _ in self.logit_bias}) < len(self.logit_bias):  # the sampler would apply one of them
            raise InvalidRequestError("logit_bias names a token id twice")
        if not 0 <= self.min_p <= 1:
            raise InvalidRequestError(f"min_p must be in [0, 1], got {self.min_p}")
        if any(t < 0 for t in self.stop_token_ids):
            raise InvalidRequestError("stop_token_ids must be non-negative token ids")


@dataclass(frozen=True)
class EngineRequest:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams
    cache_salt: str | None = None  # tenants with different salts never share prefix-cache blocks
    traceparent: str | None = None  # W3C trace context of the request's parent span (the engine ignores it)


@dataclass(frozen=True)
class RequestOutput:
    """One request's progress in one engine step."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprob] | None  # parallel to new_token_ids when logprobs were asked for
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_cached_tokens: int  # prompt tokens served from the prefix cache at admission
    # Prefill-only requests: the blocks holding the prompt's KV, held until `release()`. None otherwise.
    kv_block_ids: tuple[int, ...] | None = None
    queue_s: float = 0.0  # seconds the request waited before its first step
    # With the first token, when asked for (SamplingParams.prompt_logprobs): prompt tokens 1.. (token 0 has none)
    prompt_logprobs: list[TokenLogprob] | None = None

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None or self.kv_block_ids is not None


@dataclass(frozen=True)
class KVReservation:
    """Blocks reserved for a prompt whose KV will be written from outside (the decode side of a handoff)."""

    request_id: str
    block_ids: tuple[int, ...]  # one per block of the prompt, in order; the first num_cached_tokens // block_size
    # are prefix-cache hits that already hold the right KV, the rest must be written before commit()
    num_cached_tokens: int
    epoch: int  # a writer stamps it on each block it completes (KVCache.block_epochs); commit() checks every one
    lease_s: float = 0.0  # a duration (never a wall-clock time): writes and commit must come within it, unless renewed


@dataclass(frozen=True)
class EngineStats:
    num_blocks: int
    num_used_blocks: int
    num_cached_blocks: int
    num_free_blocks: int
    num_running: int
    num_waiting: int
    num_held: int  # prefill-only results and reservations holding blocks
    num_preemptions: int  # since start: sequences preempted (recomputed later) for lack of blocks
    num_reserved_blocks: int = 0  # blocks of open reservations (KV being written from outside)
    num_fenced_blocks: int = 0  # blocks of revoked reservations, unusable until a stray write can no longer land
    num_reaped_leases: int = 0  # since start: reservations nobody committed or aborted before their lease ended
    num_reaped_held: int = 0  # since start: prefill-only results nobody released within held_ttl_s
    num_fenced_aborts: int = 0  # since start: reservations aborted while a writer might still write
    num_aborts: int = 0  # since start: requests aborted at any stage (client gone, failure)
    queued_prefill_tokens: int = 0  # prompt tokens accepted and not yet computed
    num_seated_waiting: int = 0  # of num_waiting, committed reservations waiting for a seat: they hold their blocks
    load: LoadCounters | None = None  # what the autoscaling planner measures (pdserve.planner.ReplicaSignals)


@dataclass
class LoadCounters:
    """Counters since the engine started, for the autoscaling planner: arrivals, computed tokens, busy time."""

    requests: int = 0  # requests accepted (queued, or reserved: a decode replica's arrivals)
    prompt_tokens: int = 0  # their prompt tokens, cached ones included
    prefill_tokens: int = 0  # prompt tokens computed by steps (cache hits excluded)
    generated_tokens: int = 0  # tokens sampled
    finished: int = 0  # requests that left the running batch (finished or aborted), prefill-only ones excepted
    steps: int = 0  # steps that ran the model
    step_s: float = 0.0  # seconds those steps took
    decode_steps: int = 0  # steps without a prompt chunk
    decode_step_s: float = 0.0
    decode_step_seqs: int = 0  # sum of those steps' batch sizes
    reserves_refused: int = 0  # KV reservations refused for lack of room

    def count_step(self, prompt_tokens: int, batch_size: int, seconds: float) -> None:
        """One model step of `batch_size` sequences that computed `prompt_tokens` prompt tokens in `seconds`."""
        self.steps += 1
        self.step_s += seconds
        self.prefill_tokens += prompt_tokens
        if prompt_tokens == 0:
            self.decode_steps += 1
            self.decode_step_s += seconds
            self.decode_step_seqs += batch_size

    def copy(self) -> LoadCounters:
        return dataclasses.replace(self)


class LayerSink(Protocol):
    """Receives, on the engine thread, each layer's completion during the step that finishes a prompt."""

    def layer_done(self, layer: int, block_ids: list[int]) -> None:
        """Layer `layer`'s K/V of every block in `block_ids` (the prompt's blocks, in order) is written (on a GPU:
        its kernels are queued on the current stream)."""
