"""Attention over paged KV blocks, behind one function.

Each step's tokens are flattened into one `[num_tokens, ...]` batch: single-token rows (decodes) first, then
prefill chunks. On CPU in bf16 both go to native kernels (`native.py`, `csrc/paged_attention.cpp`) that read each
sequence's blocks where they lie: one call for the decodes, one for every prefill chunk of the step (causal, only the
lower triangle computed). Elsewhere, or without a compiler, the decodes are attended in batched SDPA calls over
their blocks gathered (padded and masked) to `[B, H_kv, L_max, D]` (whole blocks via index_select: 4x faster than a
per-slot gather), each KV head's query heads as its query rows, one call per group of similar context lengths
(`decode_groups`: one 2k-token context among 300-token ones would otherwise pad every row to 2k), and each prefill
chunk is one SDPA call, causal over its cached context plus itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# (q [B, H, D], k_cache, v_cache, block_ids [B, max_blocks], seq_lens [B], scale) -> [B, H, D]
DecodeKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]
# (q [T, H, D], k_cache, v_cache, block_tables [S, max_blocks], spans [S, 3], scale) -> [T, H, D]
PrefillKernel = DecodeKernel


@dataclass(frozen=True)
class PrefillSpan:
    start: int  # first row of the chunk in the flattened batch
    num_tokens: int  # rows of the chunk (query length)
    num_context_tokens: int  # tokens already in the cache before this chunk
    block_ids: torch.Tensor | None  # [num_blocks] long: blocks of context + chunk; None when no context
    mask: torch.Tensor | None  # [num_tokens, num_blocks * block_size] bool, causal; None when no context (or kernel)


@dataclass(frozen=True)
class DecodeGroup:
    """Decode rows attended together, padded to the longest context among them (the torch route)."""

    rows: torch.Tensor  # [n] long: rows of the decode batch
    block_ids: torch.Tensor  # [n, max_blocks] long, 0-padded
    mask: torch.Tensor  # [n, 1, 1, max_blocks * block_size] bool: True on real tokens


def length_groups(num_blocks: list[int], overhead_blocks: int) -> list[list[int]]:
    """Decode rows (by their number of context blocks) split into groups, each padded to its own longest: rows are
    bucketed by the power of two of their block count, and adjacent buckets merged wherever another call would cost
    more (`overhead_blocks`, a call's fixed cost in gathered blocks) than the padding it saves. Exact: a row attends
    to the same real keys whatever it is padded to (masked keys add exact zeros)."""
    buckets: dict[int, list[int]] = {}
    for row, n in enumerate(num_blocks):
        buckets.setdefault(n.bit_length(), []).append(row)
    keys = sorted(buckets)
    if len(keys) == 1:
        return [list(range(len(num_blocks)))]
    widest = [max(num_blocks[r] for r in buckets[k]) for k in keys]
    sizes = [len(buckets[k]) for k in keys]
    # best[i]: cheapest split of buckets[:i]; a group of buckets j..i-1 gathers rows(j..i-1) x widest[i-1] blocks
    best, cut = [0] * (len(keys) + 1), [0] * (len(keys) + 1)
    for i in range(1, len(keys) + 1):
        best[i], cut[i] = min((best[j] + sum(sizes[j:i]) * widest[i - 1] + overhead_blocks, j) for j in range(i))
    groups: list[list[int]] = []
    i = len(keys)
    while i:
        groups.append(sorted(r for k in keys[cut[i] : i] for r in buckets[k]))
        i = cut[i]
    return groups[::-1]


@dataclass(frozen=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] long: where each row's new K/V is written
    num_decodes: int  # leading single-token rows
    decode_block_ids: torch.Tensor | None  # [num_decodes, max_blocks] long: each decode's blocks, 0-padded
    decode_mask: torch.Tensor | None  # [num_decodes, 1, 1, max_blocks * block_size] bool: True on real tokens
    decode_seq_lens: torch.Tensor | None  # [num_decodes] long: context tokens, the one being decoded included
    prefills: list[PrefillSpan]
    # For the prefill kernel: per chunk (first row after the decodes, rows, tokens cached before it) [S, 3] long and
    # its blocks, context and chunk [S, max_blocks] long (0-padded). None when there are no prefills.
    prefill_spans: torch.Tensor | None = None
    prefill_block_tables: torch.Tensor | None = None
    # The torch route's decode rows by context length when more than one group pays (else the whole batch is one).
    decode_groups: tuple[DecodeGroup, ...] = ()


def paged_attention(
    q: torch.Tensor,  # [T, H, D]
    k: torch.Tensor,  # [T, H_kv, D]
    v: torch.Tensor,  # [T, H_kv, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, H_kv, D]
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    decode_kernel: DecodeKernel | None = None,
    prefill_kernel: PrefillKernel | None = None,
) -> torch.Tensor:  # [T, H, D]
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, k)
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, v)
    if not meta.prefills:  # a pure decode step: no output buffer to assemble
        return _decode_attention(q, k_cache, v_cache, meta, scale, decode_kernel)
    out = torch.empty_like(q)
    if meta.num_decodes:
        out[: meta.num_decodes] = _decode_attention(q[: meta.num_decodes], k_cache, v_cache, meta, scale, decode_kernel)
    if prefill_kernel is not None and meta.prefill_spans is not None and meta.prefill_block_tables is not None:
        tables, spans = meta.prefill_block_tables, meta.prefill_spans
        out[meta.num_decodes :] = prefill_kernel(q[meta.num_decodes :], k_cache, v_cache, tables, spans, scale)
        return out
    for span in meta.prefills:
        rows = slice(span.start, span.start + span.num_tokens)
        qp = q[rows].transpose(0, 1).unsqueeze(0)  # [1, H, q, D]
        if span.block_ids is None:
            kp = k[rows].transpose(0, 1).unsqueeze(0)  # [1, H_kv, q, D]
            vp = v[rows].transpose(0, 1).unsqueeze(0)
        else:
            kp = _gather(k_cache, span.block_ids.unsqueeze(0))  # [1, H_kv, num_blocks * block_size, D]
            vp = _gather(v_cache, span.block_ids.unsqueeze(0))
        op = F.scaled_dot_product_attention(
            qp, kp, vp, attn_mask=span.mask, is_causal=span.mask is None, scale=scale, enable_gqa=True
        )
        out[rows] = op.squeeze(0).transpose(0, 1)
    return out


def _decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    decode_kernel: DecodeKernel | None,
) -> torch.Tensor:  # [B, H, D]
    assert meta.decode_block_ids is not None
    if decode_kernel is not None:
        assert meta.decode_seq_lens is not None
        return decode_kernel(q, k_cache, v_cache, meta.decode_block_ids, meta.decode_seq_lens, scale)
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    # A KV head's query heads as its query rows: [B, H_kv, H / H_kv, D], one mask row for all of them. Same math as
    # SDPA's enable_gqa (query head h reads KV head h // (H / H_kv)), but CPU SDPA runs a 1-row query in bf16
    # ~6x slower than a 3-row one (SmolLM2: 1.9 -> 0.3 ms per layer at 16 x 320 tokens).
    grouped = q.view(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
    if not meta.decode_groups:
        out = _attend_gathered(grouped, k_cache, v_cache, meta.decode_block_ids, meta.decode_mask, scale)
        return out.reshape(batch, num_heads, head_dim)  # CUDA's SDPA returns its heads strided: not a view
    out = torch.empty_like(grouped)
    for group in meta.decode_groups:
        out[group.rows] = _attend_gathered(grouped[group.rows], k_cache, v_cache, group.block_ids, group.mask, scale)
    return out.view(batch, num_heads, head_dim)


def _attend_gathered(
    q: torch.Tensor,  # [B, H_kv, H / H_kv, D]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_ids: torch.Tensor,  # [B, max_blocks]
    mask: torch.Tensor | None,  # [B, 1, 1, max_blocks * block_size]
    scale: float,
) -> torch.Tensor:
    k = _gather(k_cache, block_ids)  # [B, H_kv, max_blocks * block_size, D]
    v = _gather(v_cache, block_ids)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _gather(cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """Blocks `[B, n]` of a `[num_blocks, block_size, H_kv, D]` cache as `[B, H_kv, n * block_size, D]`."""
    batch, num = block_ids.shape
    blocks = cache.index_select(0, block_ids.flatten())  # [B n, block_size, H_kv, D]
    return blocks.view(batch, num * cache.shape[1], cache.shape[2], cache.shape[3]).transpose(1, 2)
