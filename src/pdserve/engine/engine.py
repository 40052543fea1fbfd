"""One replica's inference engine: the three entry points disaggregation needs, and the step loop.

- colocated: `add_request(req)`, then `step()` until it finishes;
- prefill only: `add_request(req, prefill_only=True)`; its last output carries the first token and the blocks
  holding the prompt's KV (`kv_block_ids`), kept until `release(request_id)`;
- decode from outside KV: `reserve(req)` returns blocks to write the prompt's KV into, `commit(request_id,
  first_token_id)` starts decoding it.
`abort(request_id)` frees whatever a request holds, at any stage. Not thread-safe: one loop drives an engine.
"""

from __future__ import annotations

import itertools
import logging
import time
from functools import partial

import torch

from pdserve.config import EngineConfig
from pdserve.engine.block_manager import BlockManager
from pdserve.engine.model import CausalLM
from pdserve.engine.model_runner import ModelRunner, Sampled
from pdserve.engine.request import (
    EngineRequest,
    EngineStats,
    FinishReason,
    KVReservation,
    LayerSink,
    LoadCounters,
    RequestOutput,
    TokenLogprob,
)
from pdserve.engine.reservations import OpenReservation, Reservations
from pdserve.engine.scheduler import Scheduler, SchedulerOutput
from pdserve.engine.sequence import Sequence, SequenceStatus
from pdserve.engine.weights import (
    CheckpointReader,
    checkpoint_dtype,
    eos_token_ids,
    load_hf_config,
    resolve_dtype,
)
from pdserve.kvcache import BlockPool, KVCache, KVEventBatch, KVLayout

logger = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        device = torch.device(config.model.device)
        hf_config = load_hf_config(config.model.path)
        dtype = resolve_dtype(config.model.dtype, device, checkpoint_dtype(hf_config))
        self.model = CausalLM(hf_config, dtype, device)
        self.model.load(CheckpointReader(config.model.path, dtype, device), hf_config.tie_word_embeddings)
        self.eos_token_ids = eos_token_ids(config.model.path, hf_config)
        self.layout = self._kv_layout(dtype)
        self.max_model_len = self._max_model_len(hf_config)
        self.kv = KVCache(self.layout, device, shared_path=config.cache.shared_path)
        self.pool = BlockPool(self.layout.num_blocks, config.cache.enable_prefix_caching)
        self.blocks = BlockManager(self.pool, self.layout.block_size)
        self.scheduler = Scheduler(config.scheduler, self.blocks)
        self.runner = ModelRunner(self.model, self.kv, self.layout.block_size, self.eos_token_ids)
        self._seqs: dict[str, Sequence] = {}
        self._arrivals = itertools.count()
        self.num_preemptions = 0  # total, for stats and tests
        self.last_step_ran = True  # whether the last step scheduled anything (step)
        self.reservations = Reservations(self.kv, self.layout.block_size, config.cache.fence_grace_s)
        self.num_reaped_leases = self.num_reaped_held = self.num_fenced_aborts = self.num_aborts = 0  # since start
        self.load = LoadCounters()
        logger.info(
            "engine ready: %s %s, %d KV blocks of %d tokens",
            (hf_config.architectures or ["?"])[0],
            dtype,
            self.layout.num_blocks,
            self.layout.block_size,
        )

    # ---- entry points ----------------------------------------------------------------------------------------

    def add_request(
        self, request: EngineRequest, prefill_only: bool = False, layer_sink: LayerSink | None = None
    ) -> None:
        """Queue a request. ValueError (nothing allocated) on an invalid request or a duplicate id.
        A prefill-only request may pass a `layer_sink`: during the step that completes its prompt, it is told after
        each layer (on the engine thread) that this layer's KV of all the prompt's blocks is written — so a
        transfer can send layer i while layer i+1 computes. On a GPU the layer's kernels are then queued, not done:
        the sink records a CUDA event on the current stream for the transfer to wait on (`LayerProgress` does)."""
        self._validate(request)
        if layer_sink is not None and not prefill_only:
            raise ValueError("a layer sink needs a prefill-only request")
        seq = Sequence(request, next(self._arrivals), is_prefill_only=prefill_only)
        seq.layer_sink = layer_sink
        self._seqs[request.request_id] = seq
        self.scheduler.add(seq)
        self.load.requests += 1
        self.load.prompt_tokens += seq.num_prompt_tokens

    def reserve(self, request: EngineRequest, lease_s: float = 30.0) -> KVReservation | None:
        """Hold blocks for `request`'s prompt, reusing cached prefix blocks; None when the pool lacks room.
        The caller writes the KV of every block past `num_cached_tokens` within `lease_s` (renewable), then calls
        `commit`; a reservation neither committed nor aborted by then is revoked by `reap`."""
        self._validate(request)
        if not lease_s > 0:
            raise ValueError("a reservation's lease must be a positive number of seconds")
        seq = Sequence(request, next(self._arrivals))
        num_prompt = seq.num_prompt_tokens
        cached = self.blocks.match_prefix(seq, max_tokens=num_prompt)
        if not self.blocks.admit(seq, cached, num_prompt):
            self.load.reserves_refused += 1
            return None
        seq.num_cached_tokens = seq.num_computed_tokens = len(cached) * self.layout.block_size
        seq.status = SequenceStatus.HELD
        self._seqs[request.request_id] = seq
        held = self.reservations.grant(seq, lease_s, time.monotonic())
        self.load.requests += 1
        self.load.prompt_tokens += num_prompt
        return KVReservation(request.request_id, tuple(seq.block_ids), seq.num_cached_tokens, held.epoch, lease_s)

    def renew(self, request_id: str, lease_s: float) -> bool:
        """Extend an open reservation's lease to `lease_s` from now; False if it is not open (any more)."""
        return self.reservations.renew(request_id, lease_s, time.monotonic())

    def commit(
        self,
        request_id: str,
        first_token_id: int,
        first_logprob: TokenLogprob | None = None,
        may_be_written: bool = False,
        is_writer_stopped: bool = True,
    ) -> RequestOutput | None:
        """Start decoding a reserved request whose prompt KV is now in its blocks, continuing after
        `first_token_id`. Returns a final output if that token already ends the request (here: this engine's
        context may be shorter than the prefill side's), else None; outputs never repeat the first token, which the
        caller has.
        `may_be_written`: a writer other than the one that completed the KV may still land a layer (a prefill
        attempt abandoned for a retry: it writes the same prompt KV, but a block freed when the request ends could
        already belong to another). The written blocks are then held past the request's end as an abort's would
        be: until the grace period ends (`is_writer_stopped`), else the lease's end. Writers copy whole blocks, so
        in a last block the prompt only partly fills, a late layer would overwrite the rows this request's own
        decode writes next (with whatever the prefill side held there): that block is left to the pin alone and
        its prompt tokens are computed again here, into a fresh block.
        Raises ValueError if there is no such reservation, or if a block past the cached prefix does not carry
        the reservation's epoch (its KV never fully arrived): the reservation stays, for the caller to abort."""
        reservation = self.reservations.open.get(request_id)
        if reservation is None:
            raise ValueError(f"request {request_id!r} has no open reservation")
        if not self.reservations.is_complete(reservation):
            raise ValueError(f"request {request_id!r}: KV transfer incomplete (its epoch is not on every block)")
        self.reservations.revoke(request_id)  # from here on no writer may touch its blocks
        if may_be_written and reservation.written_block_ids:
            pinned = list(reservation.written_block_ids)
            self.blocks.pool.touch(pinned)
            self.reservations.pin(pinned, time.monotonic() if is_writer_stopped else reservation.expires_at)
        seq = reservation.seq
        seq.num_computed_tokens = seq.num_prompt_tokens
        if may_be_written and seq.num_prompt_tokens % self.layout.block_size and reservation.written_block_ids:
            self.blocks.pool.free([seq.block_ids.pop()])  # the pin's reference keeps it from everyone else
            seq.num_computed_tokens = len(seq.block_ids) * self.layout.block_size
        self.blocks.register_computed(seq)
        self._append_token(seq, first_token_id, first_logprob)
        if seq.finish_reason is not None:
            return self._finish(seq, num_new=0)
        self.scheduler.add_running(seq)
        return None

    def release(self, request_id: str) -> None:
        """Free the blocks a finished prefill-only request holds (they stay in the prefix cache)."""
        seq = self._seqs.get(request_id)
        if seq is None or seq.status is not SequenceStatus.HELD or request_id in self.reservations.open:
            raise ValueError(f"request {request_id!r} holds no prefill result")
        self._free(seq)

    def abort(self, request_id: str, may_be_written: bool = False, is_writer_stopped: bool = False) -> bool:
        """Stop a request at any stage and free everything it holds; False if it is unknown or already done.
        `may_be_written`: an open reservation's blocks may still receive a write: the permits are revoked at once
        and the blocks freed only once no write can land — after the grace period when the writer is known to
        have stopped (`is_writer_stopped`: a layer already past its check may still land), else at the lease's
        end (the writer's state is unknown)."""
        seq = self._seqs.get(request_id)
        if seq is None:
            return False
        self.num_aborts += 1
        if seq.status in (SequenceStatus.RUNNING, SequenceStatus.WAITING) and not seq.is_prefill_only:
            self.load.finished += 1
        self.scheduler.remove(seq)
        seq.finish_reason = FinishReason.ABORT
        reservation = self.reservations.revoke(request_id)
        if reservation is not None and may_be_written:
            self.num_fenced_aborts += 1
            self._quarantine(reservation, time.monotonic() if is_writer_stopped else reservation.expires_at)
        else:
            self._free(seq)
        return True

    def reap(self) -> None:
        """The backstop for callers that vanished: revoke reservations past their lease, release prefill-only
        results held past `held_ttl_s`, and free quarantined blocks whose writers can no longer land."""
        now = time.monotonic()
        for request_id in self.reservations.expired(now):
            logger.warning("reservation %s expired uncommitted; its blocks are fenced, then freed", request_id)
            self.num_reaped_leases += 1
            reservation = self.reservations.revoke(request_id)
            assert reservation is not None
            self._quarantine(reservation, now)
        ttl_s = self.config.cache.held_ttl_s
        for seq in [s for s in self._seqs.values() if s.is_prefill_only and s.status is SequenceStatus.HELD]:
            if now - seq.held_at > ttl_s:
                logger.warning("prefill result %s held for %.0f s, never released; releasing", seq.request_id, ttl_s)
                self.num_reaped_held += 1
                self._free(seq)
        for block_ids in self.reservations.release_due(now):
            self.blocks.pool.free(block_ids)

    def step(self) -> list[RequestOutput]:
        """Schedule, run the model once, and report every request that produced a token or finished."""
        batch = self.scheduler.schedule()
        self.num_preemptions += len(batch.preempted)
        # False when nothing could run: the waiting prompts need blocks that reservations (KV still arriving), held
        # prefill results (a push still sending) or fenced blocks hold; another step changes nothing until a
        # command or `reap` frees some (AsyncEngine then waits instead of spinning).
        self.last_step_ran = bool(batch.chunks or batch.preempted)
        if not batch.chunks:
            return []
        sinks = [(c.seq.layer_sink, c.seq) for c in batch.chunks if c.seq.layer_sink is not None and c.is_last]
        start = time.perf_counter()
        sampled = self.runner.run(batch, partial(_notify, sinks) if sinks else None)
        prompt_tokens = batch.num_prompt_tokens
        if self.config.emulated_step is not None:  # CPU demonstrations: the step lasts as long as a modeled device's
            modeled = self.config.emulated_step.seconds(prompt_tokens, len(batch.chunks))
            time.sleep(max(0.0, start + modeled - time.perf_counter()))
        self.load.count_step(prompt_tokens, len(batch.chunks), time.perf_counter() - start)
        return self._postprocess(batch, sampled)

    def has_unfinished(self) -> bool:
        return bool(self.scheduler.running or self.scheduler.waiting)

    def has_prompt_work(self) -> bool:
        """Whether the next step may compute a prompt chunk (not only single-token decodes): it may take far longer."""
        eligible = self.scheduler.running[: self.config.scheduler.max_num_seqs]
        prompts = any(not s.block_ids for s in self.scheduler.waiting)  # not a committed reservation's seat
        return prompts or any(s.num_tokens - s.num_computed_tokens > 1 for s in eligible)

    def decode_batch(self) -> int:
        """The sequences the next step decodes when it decodes only (0 when it may compute a prompt chunk)."""
        if self.has_prompt_work():
            return 0
        return min(len(self.scheduler.running) + len(self.scheduler.waiting), self.config.scheduler.max_num_seqs)

    def stats(self) -> EngineStats:
        pool = self.pool.stats()
        held = sum(s.status is SequenceStatus.HELD for s in self._seqs.values())
        return EngineStats(
            num_blocks=pool.num_blocks,
            num_used_blocks=pool.num_used_blocks,
            num_cached_blocks=pool.num_cached_blocks,
            num_free_blocks=pool.num_free_blocks,
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_seated_waiting=sum(1 for s in self.scheduler.waiting if s.block_ids),
            num_held=held,
            num_preemptions=self.num_preemptions,
            num_reserved_blocks=self.reservations.num_reserved_blocks,
            num_fenced_blocks=self.reservations.num_fenced_blocks,
            num_reaped_leases=self.num_reaped_leases,
            num_reaped_held=self.num_reaped_held,
            num_fenced_aborts=self.num_fenced_aborts,
            num_aborts=self.num_aborts,
            queued_prefill_tokens=self._queued_prefill_tokens(),
            load=self.load.copy(),
        )

    def _queued_prefill_tokens(self) -> int:
        waiting = sum(s.num_tokens - s.num_computed_tokens for s in self.scheduler.waiting if not s.block_ids)
        return waiting + sum(
            s.num_tokens - s.num_computed_tokens
            for s in self.scheduler.running
            if s.num_tokens - s.num_computed_tokens > 1
        )

    def kv_events_since(self, seq: int, incarnation: str | None = None) -> KVEventBatch:
        return self.pool.events_since(seq, incarnation)

    # ---- internals -------------------------------------------------------------------------------------------

    def _postprocess(self, batch: SchedulerOutput, sampled: dict[str, Sampled]) -> list[RequestOutput]:
        outputs = []
        num_sampling = 0
        for chunk in batch.chunks:
            is_last = chunk.is_last  # read before num_computed_tokens moves
            seq = chunk.seq
            seq.num_computed_tokens += chunk.num_new_tokens
            self.blocks.register_computed(seq)
            if not is_last:
                continue
            num_sampling += 1
            self.load.generated_tokens += 1
            token = sampled[seq.request_id]  # keyed: the runner's row order is not the scheduler's
            self._append_token(seq, token.token_id, token.logprob)
            outputs.append(self._output_after_token(seq))
        assert num_sampling == len(sampled), "a sample for a request that did not end its known tokens"
        return outputs

    def _output_after_token(self, seq: Sequence) -> RequestOutput:
        if seq.finish_reason is not None:
            return self._finish(seq, num_new=1)
        if seq.is_prefill_only:
            return self._hold(seq, 1)
        return self._output(seq, 1)

    def _append_token(self, seq: Sequence, token_id: int, logprob: TokenLogprob | None) -> None:
        seq.token_ids.append(token_id)
        if logprob is not None:
            seq.logprobs.append(logprob)
        params = seq.sampling
        is_stop = token_id in params.stop_token_ids or (not params.ignore_eos and token_id in self.eos_token_ids)
        if is_stop and seq.num_output_tokens >= params.min_tokens:
            seq.finish_reason = FinishReason.STOP
        elif seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            seq.finish_reason = FinishReason.LENGTH

    def _finish(self, seq: Sequence, num_new: int = 1) -> RequestOutput:
        """Final output of a request; a prefill-only one keeps its blocks for the caller to read and release."""
        if seq.is_prefill_only:
            return self._hold(seq, num_new)
        self.load.finished += 1
        self.scheduler.remove(seq)
        self._free(seq)
        return self._output(seq, num_new)

    def _hold(self, seq: Sequence, num_new: int) -> RequestOutput:
        """A prefill-only request's result: its blocks stay held for the caller to read and `release`."""
        self.scheduler.remove(seq)
        seq.status = SequenceStatus.HELD
        seq.held_at = time.monotonic()
        return self._output(seq, num_new, kv_block_ids=tuple(seq.block_ids))

    def _quarantine(self, reservation: OpenReservation, until: float) -> None:
        """Out of the engine now, its blocks freed only after `until` plus the grace (see reservations.py)."""
        seq = reservation.seq
        seq.status = SequenceStatus.FINISHED
        del self._seqs[seq.request_id]
        self.reservations.quarantine(reservation, until)

    def _output(self, seq: Sequence, num_new: int, kv_block_ids: tuple[int, ...] | None = None) -> RequestOutput:
        new_ids = seq.token_ids[seq.num_tokens - num_new :]
        logprobs = seq.logprobs[len(seq.logprobs) - num_new :] if seq.sampling.logprobs else None
        is_first = seq.num_output_tokens == num_new
        prompt_logprobs = seq.prompt_logprobs if is_first and seq.sampling.prompt_logprobs is not None else None
        return RequestOutput(
            seq.request_id,
            new_ids,
            logprobs,
            seq.finish_reason,
            seq.num_prompt_tokens,
            max(seq.num_cached_tokens, 0),
            kv_block_ids,
            seq.queue_s,
            prompt_logprobs,
        )

    def _free(self, seq: Sequence) -> None:
        self.blocks.free(seq)
        seq.status = SequenceStatus.FINISHED
        del self._seqs[seq.request_id]

    def _validate(self, request: EngineRequest) -> None:
        """InvalidRequestError for the client's input; a reused request id (ids are the server's) is a ValueError."""
        from pdserve.engine.request import InvalidRequestError

        if request.request_id in self._seqs:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        num_prompt = len(request.prompt_token_ids)
        if num_prompt == 0:
            raise InvalidRequestError("prompt is empty")
        if num_prompt >= self.max_model_len:
            raise InvalidRequestError(
                f"prompt has {num_prompt} tokens; this model's context is {self.max_model_len} tokens "
                "and at least one must be left for output"
            )
        vocab = self.model.shape.vocab_size
        if any(not 0 <= t < vocab for t in request.prompt_token_ids):
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})")
        request.sampling.validate()
        if any(t >= vocab for t in request.sampling.stop_token_ids):
            raise InvalidRequestError(f"stop_token_ids must be in [0, {vocab})")
        if any(t >= vocab for t, _ in request.sampling.logit_bias):  # else the sampler's index fails mid-step
            raise InvalidRequestError(f"logit_bias token ids must be in [0, {vocab})")

    def _kv_layout(self, dtype: torch.dtype) -> KVLayout:
        cache, shape = self.config.cache, self.model.shape
        one = KVLayout(shape.num_layers, 1, cache.block_size, shape.num_kv_heads, shape.head_dim, dtype)
        num_blocks = cache.num_blocks or cache.memory_bytes // one.bytes_per_block
        if num_blocks < 1:
            raise ValueError("the KV cache has room for no block; raise cache memory_bytes or num_blocks")
        return KVLayout(shape.num_layers, num_blocks, cache.block_size, shape.num_kv_heads, shape.head_dim, dtype)

    def _max_model_len(self, hf_config: object) -> int:
        limit = self.model.shape.max_position_embeddings
        window = getattr(hf_config, "sliding_window", None)
        layer_types = getattr(hf_config, "layer_types", None)  # Qwen2/3: only layers >= max_window_layers slide
        slides = layer_types is None or "sliding_attention" in layer_types
        if window and getattr(hf_config, "use_sliding_window", True) and slides:
            limit = min(limit, window)  # within the window, sliding-window attention equals full attention
        asked = self.config.model.max_model_len
        if asked is not None and asked > limit:
            raise ValueError(f"max_model_len {asked} exceeds the model's limit of {limit}")
        pool_tokens = self.layout.num_blocks * self.layout.block_size
        return min(asked or limit, pool_tokens)


def _notify(sinks: list[tuple[LayerSink, Sequence]], layer: int) -> None:
    for sink, seq in sinks:
        sink.layer_done(layer, seq.block_ids)
