"""The native CPU decode-attention kernel against a float64 reference, over thousands of random paged layouts:
lengths from 1 token, any block size, grouped-query heads from 1 to 8 per KV head, blocks anywhere in the cache,
query rows strided as the model's fused QKV leaves them; bad tables are errors, never out-of-bounds reads; and the
build falls back (SDPA) without a compiler."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pdserve.engine import native
from pdserve.engine.attention import AttentionMetadata, paged_attention

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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_random_paged_layouts_match_a_float64_reference(op, dtype: torch.dtype) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(1234 + (dtype == torch.bfloat16))
    # Within float rounding: float32 is exact to ~1e-6; bf16 rounds its output (~4e-3 relative) as SDPA does.
    atol, rtol = (2e-5, 1e-5) if dtype == torch.float32 else (2e-2, 1.6e-2)
    for i in range(NUM_CASES):
        q, k_cache, v_cache, block_ids, lens, scale = _case(rng, dtype)
        got = op(q, k_cache, v_cache, block_ids, lens, scale)
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
    native.paged_decode_op.cache_clear()
    try:
        assert native.paged_decode_op() is None
        monkeypatch.delenv("CXX")
        monkeypatch.setenv(native.ENV_SWITCH, "0")
        native.paged_decode_op.cache_clear()
        assert native.paged_decode_op() is None
    finally:
        native.paged_decode_op.cache_clear()
    assert not list(tmp_path.glob("*/*.so"))  # nothing was built


def test_replicas_starting_together_build_it_once(op, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Two processes with an empty cache: one builds under the lock, the other waits and loads the same library."""
    code = (
        "from pdserve.engine import native; import torch; op = native.paged_decode_op(); assert op is not None; "
        "print(next(native.kernel_cache_dir().glob('*/*.so')))"
    )
    env = {**os.environ, native.ENV_CACHE: str(tmp_path)}
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True) for _ in range(2)
    ]
    outs = [p.communicate(timeout=600)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outs[0] == outs[1] and len(list(tmp_path.glob("*/*.so"))) == 1
    assert not list(tmp_path.glob("*/tmp*"))  # no partial build left behind
