"""The native CPU attention kernels against a float64 reference, over thousands of random paged layouts.

Decode: lengths from 1 token, any block size, grouped-query heads from 1 to 8 per KV head, blocks anywhere in the
cache, query rows strided as the model's fused QKV leaves them; in bf16 both the float32 scores and the AVX512-BF16
dot-product scores. Prefill: a step's chunks back to back, from 1 row,
with and without cached context, causal; in bf16 both the float32 path and the AVX512-BF16 dot-product path. Bad
tables and spans are errors, never out-of-bounds reads; and the build falls back (SDPA) without a compiler.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pdserve.engine import native
from pdserve.engine.attention import AttentionMetadata, PrefillSpan, paged_attention

NUM_CASES = 2000


@pytest.fixture(scope="module")
def op():  # type: ignore[no-untyped-def]
    kernel = native.paged_decode_op()
    if kernel is None:
        if os.environ.get("CI"):  # CI installs a compiler: a kernel that does not build there is a failure
            pytest.fail("the native decode kernel did not build (see the warning logged by pdserve.engine.native)")
        pytest.skip("no C++ compiler here: the native kernel is off and attention uses SDPA")
    return kernel


def _reference(q, k_cache, v_cache, block_ids, lens, scale):  # type: ignore[no-untyped-def]
    """float64 attention of each row over its own tokens, one sequence at a time (no padding, no masks)."""
    out = []
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = q.shape[1] // num_kv_heads
    for b, n in enumerate(lens.tolist()):
        blocks = block_ids[b, : -(-n // block_size)]
        k = k_cache[blocks].flatten(0, 1)[:n].double().transpose(0, 1)  # [H_kv, n, D]
        v = v_cache[blocks].flatten(0, 1)[:n].double().transpose(0, 1)
        qb = q[b].double().view(num_kv_heads, group, -1)  # a KV head's query heads as its rows
        out.append(torch.softmax(qb @ k.transpose(1, 2) * scale, -1) @ v)
    return torch.stack(out).flatten(1, 2)  # [B, H, D]


def _case(rng: random.Random, dtype: torch.dtype):  # type: ignore[no-untyped-def]
    head_dim = rng.choice(native.HEAD_DIMS)
    num_kv_heads, group = rng.randint(1, 4), rng.choice([1, 1, 2, 3, 4, 8])
    block_size = rng.choice([1, 2, 4, 16, 16, 32])
    batch = rng.choice([1, 2, 3, rng.randint(1, 24)])
    lens = [rng.choice([1, 2, block_size, block_size + 1, rng.randint(1, 300)]) for _ in range(batch)]
    max_blocks = max(-(-n // block_size) for n in lens) + rng.randint(0, 2)  # a table may be wider than needed
    num_blocks = batch * max_blocks + rng.randint(0, 8)
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g).to(dtype)
    block_ids = torch.randperm(num_blocks, generator=g)[: batch * max_blocks].view(batch, max_blocks)
    num_heads = num_kv_heads * group
    # As the model hands it over: Q is the first `num_heads` heads of each row of the fused Q|K|V projection.
    fused = torch.randn(batch, num_heads + 2 * num_kv_heads, head_dim, generator=g).to(dtype)
    q = fused[:, :num_heads] if rng.random() < 0.5 else fused[:, :num_heads].contiguous()
    return q, k_cache, v_cache, block_ids, torch.tensor(lens), head_dim**-0.5


@pytest.mark.parametrize(
    ("dtype", "bf16_dot"), [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)]
)
def test_random_paged_layouts_match_a_float64_reference(op, dtype: torch.dtype, bf16_dot: bool) -> None:  # type: ignore[no-untyped-def]
    """`bf16_dot` picks the AVX512-BF16 scores where the CPU has it (elsewhere both runs take the float32 path)."""
    rng = random.Random(1234 + (dtype == torch.bfloat16) + 2 * bf16_dot)
    # Within float rounding: float32 is exact to ~1e-6; bf16 rounds its output (~4e-3 relative) as SDPA does.
    atol, rtol = (2e-5, 1e-5) if dtype == torch.float32 else (2e-2, 1.6e-2)
    for i in range(NUM_CASES):
        q, k_cache, v_cache, block_ids, lens, scale = _case(rng, dtype)
        got = op(q, k_cache, v_cache, block_ids, lens, scale, bf16_dot)
        want = _reference(q, k_cache, v_cache, block_ids, lens, scale)
        assert got.dtype == dtype and got.shape == q.shape
        torch.testing.assert_close(got.double(), want, atol=atol, rtol=rtol, msg=lambda m, i=i: f"case {i}: {m}")


def test_the_model_path_is_the_same_with_the_kernel_and_with_sdpa(op) -> None:  # type: ignore[no-untyped-def]
    """`paged_attention` on a mixed step (decodes then a prefill chunk): the kernel's decode rows equal the SDPA
    route's to float32 rounding, and the prefill rows are the same computation."""
    rng = random.Random(7)
    q, k_cache, v_cache, block_ids, lens, scale = _case(rng, torch.float32)
    batch, _, head_dim = q.shape
    block_size = k_cache.shape[1]
    num_kv_heads = k_cache.shape[2]
    new_k = torch.randn(batch, num_kv_heads, head_dim)
    new_v = torch.randn(batch, num_kv_heads, head_dim)
    last = lens - 1  # each decode writes its own (last) token's K/V
    slots = block_ids.gather(1, (last // block_size).unsqueeze(1)).squeeze(1) * block_size + last % block_size
    mask = (torch.arange(block_ids.shape[1] * block_size) < lens.unsqueeze(1))[:, None, None, :]
    meta = AttentionMetadata(slots, batch, block_ids, mask, lens, prefills=[])
    args = (q.contiguous(), new_k, new_v)
    sdpa = paged_attention(*args, k_cache.clone(), v_cache.clone(), meta, scale)
    kernel = paged_attention(*args, k_cache.clone(), v_cache.clone(), meta, scale, op)
    torch.testing.assert_close(kernel, sdpa, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("len0", "sequence length out of range"),
        ("too_long", "sequence length out of range"),
        ("bad_block", "block id out of range"),
        ("negative_block", "block id out of range"),
    ],
)
def test_bad_tables_are_errors_not_stray_reads(op, change: str, message: str) -> None:  # type: ignore[no-untyped-def]
    k_cache = torch.randn(8, 4, 2, 32)
    v_cache = torch.randn(8, 4, 2, 32)
    q = torch.randn(2, 4, 32)
    block_ids = torch.tensor([[0, 1], [2, 3]])
    lens = torch.tensor([5, 8])
    if change == "len0":
        lens[0] = 0
    elif change == "too_long":
        lens[1] = 9
    elif change == "bad_block":
        block_ids[1, 1] = 8
    else:
        block_ids[0, 1] = -1
    with pytest.raises(RuntimeError, match=message):
        op(q, k_cache, v_cache, block_ids, lens, 0.1)


def test_without_a_compiler_or_when_switched_off_attention_keeps_sdpa(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(native.ENV_CACHE, str(tmp_path))
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    native._library.cache_clear()
    try:
        assert native.paged_decode_op() is None and native.paged_prefill_op() is None
        monkeypatch.delenv("CXX")
        monkeypatch.setenv(native.ENV_SWITCH, "0")
        native._library.cache_clear()
        assert native.paged_decode_op() is None and native.paged_prefill_op() is None
    finally:
        native._library.cache_clear()
    assert not list(tmp_path.glob("*/*.so"))  # nothing was built


def test_replicas_starting_together_build_it_once(op, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Two processes with an empty cache: one builds under the lock, the other waits and loads the same library.
    (A small source through a compiler that takes 2 s to start, so the two always overlap; the kernels' own build
    is the `op` fixture's.)"""
    source = tmp_path / "k.cpp"
    source.write_text('extern "C" int pdserve_answer() { return 42; }\n')
    slow = tmp_path / "slow-cxx"
    slow.write_text('#!/bin/sh\nsleep 2\nexec g++ "$@"\n')
    slow.chmod(0o755)
    cache = tmp_path / "cache"
    code = (
        "import ctypes, logging, sys; from pathlib import Path; from pdserve.engine import native; "
        "logging.basicConfig(level=logging.INFO, stream=sys.stderr); "
        f"lib = native.build((Path({str(source)!r}),), Path({str(cache)!r})); "
        "assert ctypes.CDLL(str(lib)).pdserve_answer() == 42; print(lib)"
    )
    env = {**os.environ, "CXX": str(slow)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    assert outs[0][0].strip() == outs[1][0].strip() and len(list(cache.glob("*/*.so"))) == 1
    assert sum(err.count("building native kernels") for _, err in outs) == 1
    assert not list(cache.glob("*/tmp*"))  # no partial build left behind


# ---- prefill ----


@pytest.fixture(scope="module")
def prefill_op(op):  # type: ignore[no-untyped-def]
    kernel = native.paged_prefill_op()
    assert kernel is not None  # built together with the decode kernel
    return kernel


def _prefill_reference(q, k_cache, v_cache, block_tables, spans, scale):  # type: ignore[no-untyped-def]
    """float64 causal attention of each chunk's rows over its sequence's cached context and itself."""
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = q.shape[1] // num_kv_heads
    out = []
    for i, (start, n, context) in enumerate(spans.tolist()):
        total = context + n
        blocks = block_tables[i, : -(-total // block_size)]
        k = k_cache[blocks].flatten(0, 1)[:total].double().transpose(0, 1)  # [H_kv, total, D]
        v = v_cache[blocks].flatten(0, 1)[:total].double().transpose(0, 1)
        qs = q[start : start + n].double().view(n, num_kv_heads, group, -1).permute(1, 2, 0, 3)  # [H_kv, G, n, D]
        scores = qs @ k.transpose(1, 2).unsqueeze(1) * scale  # [H_kv, G, n, total]
        visible = torch.arange(total).unsqueeze(0) <= (context + torch.arange(n)).unsqueeze(1)
        probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), -1)
        out.append((probs @ v.unsqueeze(1)).permute(2, 0, 1, 3).flatten(1, 2))  # [n, H, D]
    return torch.cat(out)


def _prefill_case(rng: random.Random, dtype: torch.dtype):  # type: ignore[no-untyped-def]
    head_dim = rng.choice(native.HEAD_DIMS)
    num_kv_heads, group = rng.randint(1, 4), rng.choice([1, 1, 2, 3, 4, 8])
    block_size = rng.choice([1, 2, 4, 16, 16, 32])
    chunks = [
        (rng.choice([1, 2, 15, 16, 17, 33, rng.randint(1, 80)]), rng.choice([0, 0, 1, block_size, rng.randint(0, 120)]))
        for _ in range(rng.choice([1, 1, 2, rng.randint(1, 5)]))
    ]  # (rows, cached tokens before)
    max_blocks = max(-(-(n + c) // block_size) for n, c in chunks) + rng.randint(0, 2)
    num_blocks = len(chunks) * max_blocks + rng.randint(0, 8)
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g).to(dtype)
    block_tables = torch.randperm(num_blocks, generator=g)[: len(chunks) * max_blocks].view(len(chunks), max_blocks)
    spans, row = [], 0
    for n, context in chunks:
        spans.append([row, n, context])
        row += n
    num_heads = num_kv_heads * group
    fused = torch.randn(row, num_heads + 2 * num_kv_heads, head_dim, generator=g).to(dtype)
    q = fused[:, :num_heads] if rng.random() < 0.5 else fused[:, :num_heads].contiguous()
    return q, k_cache, v_cache, block_tables, torch.tensor(spans), head_dim**-0.5


@pytest.mark.parametrize(
    ("dtype", "bf16_dot"), [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)]
)
def test_random_prefill_layouts_match_a_float64_reference(prefill_op, dtype: torch.dtype, bf16_dot: bool) -> None:  # type: ignore[no-untyped-def]
    """`bf16_dot` picks the AVX512-BF16 path where the CPU has it (elsewhere both runs take the float32 path)."""
    rng = random.Random(99 + 2 * (dtype == torch.bfloat16) + bf16_dot)
    atol, rtol = (2e-5, 1e-5) if dtype == torch.float32 else (2e-2, 1.6e-2)
    for i in range(NUM_CASES):
        q, k_cache, v_cache, block_tables, spans, scale = _prefill_case(rng, dtype)
        got = prefill_op(q, k_cache, v_cache, block_tables, spans, scale, bf16_dot)
        want = _prefill_reference(q, k_cache, v_cache, block_tables, spans, scale)
        assert got.dtype == dtype and got.shape == q.shape
        torch.testing.assert_close(got.double(), want, atol=atol, rtol=rtol, msg=lambda m, i=i: f"case {i}: {m}")


def test_the_model_path_is_the_same_with_the_prefill_kernel_and_with_sdpa(op, prefill_op) -> None:  # type: ignore[no-untyped-def]
    """`paged_attention` on a mixed step built by the engine's own ModelRunner — decodes, a chunk with cached
    context and a fresh prompt — is the same (float32 rounding) with both kernels as with the SDPA route."""
    rng = random.Random(11)
    num_kv_heads, group, head_dim, block_size = 2, 3, 64, 16
    num_heads = num_kv_heads * group
    # two decodes (contexts 20 and 40), a chunk of 30 after 50 cached tokens, a fresh prompt of 17
    rows = [(1, 19), (1, 39), (30, 50), (17, 0)]
    tables = [torch.tensor(rng.sample(range(64), -(-(n + c) // block_size))) for n, c in rows]
    positions = [torch.arange(c, c + n) for n, c in rows]
    slots = torch.cat(
        [t[p // block_size] * block_size + p % block_size for t, p in zip(tables, positions, strict=True)]
    )
    total = sum(n for n, _ in rows)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(total, h, head_dim, generator=g) for h in (num_heads, num_kv_heads, num_kv_heads))
    k_cache = torch.randn(64, block_size, num_kv_heads, head_dim, generator=g)
    v_cache = torch.randn(64, block_size, num_kv_heads, head_dim, generator=g)
    lens = torch.tensor([20, 40])
    max_blocks = max(len(t) for t in tables)
    padded = torch.zeros(len(rows), max_blocks, dtype=torch.long)
    for i, t in enumerate(tables):
        padded[i, : len(t)] = t
    decode_mask = (torch.arange(max_blocks * block_size) < lens.unsqueeze(1))[:, None, None, :]
    ctx_blocks = padded[2, : -(-80 // block_size)]
    ctx_mask = torch.arange(len(ctx_blocks) * block_size).unsqueeze(0) <= torch.arange(50, 80).unsqueeze(1)
    spans = [PrefillSpan(2, 30, 50, ctx_blocks, ctx_mask), PrefillSpan(32, 17, 0, None, None)]
    meta = AttentionMetadata(
        slots, 2, padded[:2], decode_mask, lens, spans,
        prefill_spans=torch.tensor([[0, 30, 50], [30, 17, 0]]), prefill_block_tables=padded[2:],
    )  # fmt: skip
    sdpa = paged_attention(q, k, v, k_cache.clone(), v_cache.clone(), meta, 0.125)
    native_out = paged_attention(q, k, v, k_cache.clone(), v_cache.clone(), meta, 0.125, op, prefill_op)
    torch.testing.assert_close(native_out, sdpa, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("gap", "spans must tile"),
        ("short", "spans cover"),
        ("zero_rows", "spans must tile"),
        ("negative_context", "spans must tile"),
        ("too_long", "longer than its block table"),
        ("bad_block", "block id out of range"),
        ("negative_block", "block id out of range"),
    ],
)
def test_bad_prefill_spans_are_errors_not_stray_reads(prefill_op, change: str, message: str) -> None:  # type: ignore[no-untyped-def]
    k_cache = torch.randn(8, 4, 2, 32)
    v_cache = torch.randn(8, 4, 2, 32)
    q = torch.randn(7, 4, 32)
    block_tables = torch.tensor([[0, 1], [2, 3]])
    spans = torch.tensor([[0, 3, 2], [3, 4, 4]])  # 3 rows after 2 cached tokens, 4 rows after 4
    if change == "gap":
        spans[1, 0] = 4
    elif change == "short":
        q = torch.randn(8, 4, 32)
    elif change == "zero_rows":
        spans[0, 1] = 0
    elif change == "negative_context":
        spans[0, 2] = -1
    elif change == "too_long":
        spans[1, 2] = 5
    elif change == "bad_block":
        block_tables[1, 1] = 8
    else:
        block_tables[0, 0] = -1
    with pytest.raises(RuntimeError, match=message):
        prefill_op(q, k_cache, v_cache, block_tables, spans, 0.1)
