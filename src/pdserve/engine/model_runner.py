"""Turns a scheduled step into tensors, runs the model, samples the rows that end their known tokens."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from pdserve.engine.attention import AttentionMetadata, DecodeGroup, PrefillSpan, length_groups
from pdserve.engine.model import CausalLM
from pdserve.engine.request import TokenLogprob
from pdserve.engine.sampler import SampleResult, SampleRow, sample
from pdserve.engine.scheduler import ScheduledChunk, SchedulerOutput
from pdserve.kvcache import KVCache

# A decode group's fixed cost (two gathers, one SDPA, one scatter per layer) in gathered context tokens: below it,
# padding a short context to a longer one is cheaper than another call.
DECODE_GROUP_OVERHEAD_TOKENS = 256


@dataclass(frozen=True)
class Sampled:
    """The token sampled for one request in one step."""

    token_id: int
    logprob: TokenLogprob | None  # None unless the request asked for logprobs


def keyed_samples(chunks: list[ScheduledChunk], result: SampleResult) -> dict[str, Sampled]:
    """Row i of `result` belongs to `chunks[i]`: the one place where a sample meets its request."""
    assert len(chunks) == len(result.token_ids), "one sampled row per sampling chunk"
    out: dict[str, Sampled] = {}
    for i, chunk in enumerate(chunks):
        logprob = result.logprobs[i] if result.logprobs is not None and chunk.seq.sampling.logprobs else None
        assert chunk.seq.request_id not in out, f"two rows sampled for {chunk.seq.request_id!r}"
        out[chunk.seq.request_id] = Sampled(result.token_ids[i], logprob)
    return out


@dataclass(frozen=True)
class StepInputs:
    input_ids: torch.Tensor  # [T] long
    positions: torch.Tensor  # [T] long
    meta: AttentionMetadata
    sample_rows: torch.Tensor  # [S] long: rows whose logits are sampled
    sampled_chunks: list[ScheduledChunk]  # parallel to sample_rows
    chunks: list[ScheduledChunk]  # in the order of the rows (decodes first)


class ModelRunner:
    def __init__(self, model: CausalLM, kv: KVCache, block_size: int, eos_token_ids: tuple[int, ...]) -> None:
        self.model = model
        self.kv = kv
        self.block_size = block_size
        self.eos_token_ids = eos_token_ids

    @torch.inference_mode()
    def run(self, batch: SchedulerOutput, on_layer: Callable[[int], object] | None = None) -> dict[str, Sampled]:
        """Compute every scheduled chunk's KV; sample one token per chunk that is_last. Returns the samples keyed
        by request id: the rows are laid out in another order than the scheduler's (decodes first), so a position
        in the batch never says whose token it is. `on_layer(i)` runs after layer i's KV is written."""
        inputs = self.prepare(batch)
        hidden = self.model.forward(inputs.input_ids, inputs.positions, self.kv, inputs.meta, on_layer)
        if not inputs.sampled_chunks:
            self._prompt_logprobs(hidden, inputs.chunks)
            return {}
        self._prompt_logprobs(hidden, inputs.chunks)
        logits = self.model.logits(hidden[inputs.sample_rows])
        result = sample(logits, [self._sample_row(c) for c in inputs.sampled_chunks])
        return keyed_samples(inputs.sampled_chunks, result)

    def prepare(self, batch: SchedulerOutput) -> StepInputs:
        decodes = [c for c in batch.chunks if c.num_new_tokens == 1]
        prefills = [c for c in batch.chunks if c.num_new_tokens > 1]
        chunks = decodes + prefills
        token_ids: list[int] = []
        positions: list[int] = []
        for c in chunks:
            start = c.seq.num_computed_tokens
            token_ids.extend(c.seq.token_ids[start : start + c.num_new_tokens])
            positions.extend(range(start, start + c.num_new_tokens))
        device = self.model.device
        pos = torch.tensor(positions, dtype=torch.long)
        block_tables = [torch.tensor(c.seq.block_ids, dtype=torch.long) for c in chunks]
        slot_mapping = torch.cat(
            [
                self._slots(table, pos_c)
                for table, pos_c in zip(block_tables, pos.split([c.num_new_tokens for c in chunks]), strict=True)
            ]
        )
        decode_block_ids, decode_mask, decode_lens = self._decode_context(decodes, block_tables[: len(decodes)])
        decode_groups: tuple[DecodeGroup, ...] = ()
        if decode_block_ids is not None and decode_mask is not None and decode_lens is not None:
            decode_groups = self._decode_groups(decode_block_ids, decode_mask, decode_lens)
        prefill_tables = block_tables[len(decodes) :]
        spans = self._prefill_spans(prefills, prefill_tables, len(decodes))
        kernel_spans = kernel_tables = None
        if prefills and self.model.prefill_kernel is not None:
            kernel_spans, kernel_tables = self._prefill_kernel_inputs(prefills, prefill_tables)
        meta = AttentionMetadata(
            slot_mapping=slot_mapping.to(device),
            num_decodes=len(decodes),
            decode_block_ids=None if decode_block_ids is None else decode_block_ids.to(device),
            decode_mask=None if decode_mask is None else decode_mask.to(device),
            decode_seq_lens=None if decode_lens is None else decode_lens.to(device),
            prefills=spans,
            prefill_spans=None if kernel_spans is None else kernel_spans.to(device),
            prefill_block_tables=None if kernel_tables is None else kernel_tables.to(device),
            decode_groups=decode_groups,
        )
        ends = torch.tensor([c.num_new_tokens for c in chunks]).cumsum(0) - 1
        is_last = torch.tensor([c.is_last for c in chunks], dtype=torch.bool)
        return StepInputs(
            input_ids=torch.tensor(token_ids, dtype=torch.long, device=device),
            positions=pos.to(device),
            meta=meta,
            sample_rows=ends[is_last].to(device),
            sampled_chunks=[c for c in chunks if c.is_last],
            chunks=chunks,
        )

    def _slots(self, block_table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return block_table[positions // self.block_size] * self.block_size + positions % self.block_size

    def _decode_context(
        self, decodes: list[ScheduledChunk], tables: list[torch.Tensor]
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Block ids `[B, max_blocks]` (0-padded) of each decode's context, itself included, the mask
        `[B, 1, 1, max_blocks * block_size]` of its real tokens, and their number `[B]`."""
        if not decodes:
            return None, None, None
        lengths = torch.tensor([c.seq.num_computed_tokens + 1 for c in decodes])
        num_blocks = -(-lengths // self.block_size)
        max_blocks = int(num_blocks.max())
        block_ids = torch.zeros(len(decodes), max_blocks, dtype=torch.long)
        for i, (table, n) in enumerate(zip(tables, num_blocks.tolist(), strict=True)):
            block_ids[i, :n] = table[:n]
        if self.model.decode_kernel is not None:  # the kernel reads the lengths: no mask to build
            return block_ids, None, lengths
        mask = torch.arange(max_blocks * self.block_size).unsqueeze(0) < lengths.unsqueeze(1)
        return block_ids, mask[:, None, None, :], lengths

    def _decode_groups(
        self, block_ids: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[DecodeGroup, ...]:
        """The torch route's decode rows grouped by context length (`attention.length_groups`); () when one group,
        the whole batch, is cheapest."""
        num_blocks = (-(-lengths // self.block_size)).tolist()
        groups = length_groups(num_blocks, max(1, DECODE_GROUP_OVERHEAD_TOKENS // self.block_size))
        if len(groups) == 1:
            return ()
        device = self.model.device
        out = []
        for rows in groups:
            width = max(num_blocks[r] for r in rows)
            index = torch.tensor(rows, dtype=torch.long)
            out.append(
                DecodeGroup(
                    rows=index.to(device),
                    block_ids=block_ids[index, :width].to(device),
                    mask=mask[index, :, :, : width * self.block_size].to(device),
                )
            )
        return tuple(out)

    def _prefill_spans(
        self, prefills: list[ScheduledChunk], tables: list[torch.Tensor], start: int
    ) -> list[PrefillSpan]:
        spans = []
        device = self.model.device
        for c, table in zip(prefills, tables, strict=True):
            context = c.seq.num_computed_tokens
            block_ids = mask = None
            if context and self.model.prefill_kernel is None:  # the kernel takes its tables from elsewhere
                total = context + c.num_new_tokens
                num_blocks = -(-total // self.block_size)
                block_ids = table[:num_blocks].to(device)
                query_pos = torch.arange(context, total).unsqueeze(1)
                mask = (torch.arange(num_blocks * self.block_size).unsqueeze(0) <= query_pos).to(device)
            spans.append(PrefillSpan(start, c.num_new_tokens, context, block_ids, mask))
            start += c.num_new_tokens
        return spans

    def _prefill_kernel_inputs(
        self, prefills: list[ScheduledChunk], tables: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The prefill kernel's spans `[S, 3]` (first row counted from the first prefill row, rows, tokens cached
        before) and block tables `[S, max_blocks]` (context and chunk, 0-padded)."""
        spans = torch.empty(len(prefills), 3, dtype=torch.long)
        row = 0
        for i, c in enumerate(prefills):
            spans[i, 0], spans[i, 1], spans[i, 2] = row, c.num_new_tokens, c.seq.num_computed_tokens
            row += c.num_new_tokens
        num_blocks = [-(-(c.seq.num_computed_tokens + c.num_new_tokens) // self.block_size) for c in prefills]
        block_tables = torch.zeros(len(prefills), max(num_blocks), dtype=torch.long)
        for i, (table, n) in enumerate(zip(tables, num_blocks, strict=True)):
            block_tables[i, :n] = table[:n]
        return spans, block_tables

    def _prompt_logprobs(self, hidden: torch.Tensor, chunks: list[ScheduledChunk]) -> None:
        """For sequences that asked for prompt logprobs: the logprob of each prompt token this step's rows predict
        (the row at position p predicts token p + 1), appended to the sequence once (a chunk recomputed after a
        preemption adds nothing twice)."""
        offset = 0
        for chunk in chunks:
            seq, start, n = chunk.seq, chunk.seq.num_computed_tokens, chunk.num_new_tokens
            k = seq.sampling.prompt_logprobs
            if k is None:
                offset += n
                continue
            # targets: prompt tokens start+1 .. start+n not reported yet (entry i is token i + 1)
            first = max(start + 1, len(seq.prompt_logprobs) + 1)
            last = min(start + n, seq.num_prompt_tokens - 1)  # the last row predicts an output token
            if first <= last:
                rows = hidden[offset + first - 1 - start : offset + last - start]
                targets = torch.tensor(seq.token_ids[first : last + 1], device=rows.device)
                for part_rows, part_targets in zip(rows.split(128), targets.split(128), strict=True):
                    logprobs = self.model.logits(part_rows).float().log_softmax(dim=-1)
                    chosen = logprobs.gather(1, part_targets.unsqueeze(1)).squeeze(1).tolist()
                    if k:
                        values, ids = logprobs.topk(k, dim=-1)
                        top = [
                            tuple(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)
                        ]
                    else:
                        top = [()] * len(chosen)
                    seq.prompt_logprobs.extend(zip(chosen, top, strict=True))
            offset += n

    def _sample_row(self, chunk: ScheduledChunk) -> SampleRow:
        seq = chunk.seq
        eos = () if seq.sampling.ignore_eos else self.eos_token_ids
        history = seq.token_ids if seq.sampling.adjusts_logits else ()
        return SampleRow(seq.sampling, seq.num_output_tokens, eos + seq.sampling.stop_token_ids, history)
