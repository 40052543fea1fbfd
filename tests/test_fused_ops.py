"""The fused bf16 glue ops (csrc/fused_ops.cpp) against the torch sequences they replace in model.py, bit for bit
up to rare differences of a bf16 step or two (1 element in 100,000 at most; see `_same`):
RMSNorm, the residual add fused with the next norm, rotary embedding, SiLU times up. Random shapes from one row,
rows strided as the fused projections leave them, magnitudes from tiny to large, inf and NaN. Then the whole engine
in bf16 (every tiny family, prefill chunks and decodes, prefix hits) gives the same tokens with and without them."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig

from oracle import greedy, random_prompts, run_staggered
from pdserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from pdserve.engine import EngineRequest, LLMEngine, native
from pdserve.engine.model import apply_rope, rms_norm
from pdserve.engine.weights import cpu_has_native_bf16

NUM_CASES = 300
BF16 = torch.bfloat16


@pytest.fixture(scope="module")
def ops() -> native.FusedOps:
    fused = native.fused_ops()
    if fused is None:
        if os.environ.get("CI"):  # CI installs a compiler: ops that do not build there are a failure
            pytest.fail("the native kernels did not build (see the warning logged by pdserve.engine.native)")
        pytest.skip("no C++ compiler here: the engine keeps torch's ops")
    return fused


def _values(rng: random.Random, g: torch.Generator, *shape: int) -> torch.Tensor:
    x = torch.randn(*shape, generator=g) * rng.choice([1e-3, 0.5, 3.0, 80.0])
    if rng.random() < 0.1:  # a few non-finite entries propagate as torch's do
        flat = x.view(-1)
        special = rng.choice([float("inf"), -float("inf"), float("nan")])
        flat[torch.randint(0, flat.numel(), (3,), generator=g)] = special
    return x.to(BF16)


def _strided_rows(rng: random.Random, x: torch.Tensor) -> torch.Tensor:
    """x itself, or the same values as the leading columns of a wider buffer (rows strided, last dim contiguous)."""
    if rng.random() < 0.5:
        return x
    wide = torch.zeros(x.shape[0], x[0].numel() + rng.randint(1, 40), dtype=x.dtype)
    wide[:, : x[0].numel()] = x.reshape(x.shape[0], -1)
    return wide[:, : x[0].numel()].view(x.shape)


def _same(got: torch.Tensor, want: torch.Tensor, what: str) -> int:
    """Bit for bit but for rare elements a bf16 step or two apart (returns how many): RMSNorm's float32 sum runs in
    another order than torch's (a row whose rsqrt lands one float step away can flip an element sitting on a bf16
    rounding boundary, by one step, and two after the weight's multiply rounds again), and the exp differs from
    torch's (Sleef) in its last bit. NaN where torch has NaN and the same infinities."""
    assert got.shape == want.shape and got.dtype == want.dtype, what
    assert torch.equal(got.isnan(), want.isnan()), f"{what}: NaN elsewhere"
    finite = ~want.isnan()
    a, b = got[finite].view(torch.int16).int(), want[finite].view(torch.int16).int()
    off = (a - b).abs()
    same_sign = (a < 0) == (b < 0)  # sign-magnitude bits: k steps apart means k apart with equal signs
    assert bool(((off == 0) | ((off <= 2) & same_sign)).all()), f"{what}: off by more than two bf16 steps"
    return int((off != 0).sum())


def test_each_op_equals_the_torch_sequence_it_replaces(ops: native.FusedOps) -> None:
    rng = random.Random(5)
    g = torch.Generator().manual_seed(5)
    num_elements = num_off = 0
    for i in range(NUM_CASES):
        rows = rng.choice([1, 2, 16, rng.randint(1, 600)])
        width = rng.choice([576, 128, 64, rng.randint(1, 300)])
        eps = rng.choice([1e-5, 1e-6])
        x, w = _values(rng, g, rows, width), (torch.rand(width, generator=g) + 0.5).to(BF16)
        checks = [(ops.rms_norm(x, w, eps), rms_norm(x, w, eps), "rms_norm")]
        delta = _strided_rows(rng, _values(rng, g, rows, width))
        fused_x, torch_x = x.clone(), x.clone()
        torch_x += delta
        checks.append((ops.add_rms_norm_(fused_x, delta, w, eps), rms_norm(torch_x, w, eps), "add_rms_norm_"))
        torch.testing.assert_close(fused_x, torch_x, rtol=0, atol=0, equal_nan=True)  # the residual add: exact
        heads, head_dim = rng.randint(1, 12), rng.choice([32, 64, 128, 2 * rng.randint(1, 40)])
        qk = _strided_rows(rng, _values(rng, g, rows, heads, head_dim))
        cos, sin = (torch.randn(rows, head_dim, generator=g).to(BF16) for _ in range(2))
        checks.append((ops.rope(qk, cos, sin), apply_rope(qk, cos.unsqueeze(1), sin.unsqueeze(1)), "rope"))
        inter = rng.choice([1536, 64, rng.randint(1, 300)])
        gate_up = _strided_rows(rng, _values(rng, g, rows, 2 * inter))
        gate, up = gate_up.chunk(2, dim=-1)
        checks.append((ops.silu_and_mul(gate_up), F.silu(gate).mul_(up), "silu_and_mul"))
        for got, want, name in checks:
            num_off += _same(got, want, f"case {i} {name}")
            num_elements += got.numel()
    assert num_off <= num_elements // 100_000, f"{num_off} of {num_elements} elements a bf16 step or two off"


def test_bad_shapes_are_errors(ops: native.FusedOps) -> None:
    x = torch.randn(4, 8).to(BF16)
    with pytest.raises(RuntimeError, match="weight"):
        ops.rms_norm(x, torch.ones(7, dtype=BF16), 1e-5)
    with pytest.raises(RuntimeError, match="bf16"):
        ops.rms_norm(x.float(), torch.ones(8), 1e-5)
    with pytest.raises(RuntimeError, match="delta"):
        ops.add_rms_norm_(x, torch.randn(4, 7).to(BF16), torch.ones(8, dtype=BF16), 1e-5)
    with pytest.raises(RuntimeError, match="cos, sin"):
        ops.rope(x.view(4, 2, 4), torch.ones(4, 3, dtype=BF16), torch.ones(4, 3, dtype=BF16))
    with pytest.raises(RuntimeError, match="2 \\* intermediate"):
        ops.silu_and_mul(torch.randn(4, 7).to(BF16))


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
def test_the_bf16_engine_gives_the_same_tokens_with_and_without_them(
    ops: native.FusedOps, tiny_models: dict[str, Path], family: str
) -> None:
    """Staggered arrivals with chunked prefill (24-token budget), a shared prefix (cache hits) and decodes beside
    prefill chunks: token for token the same, and no block left behind."""
    path = tiny_models[family]
    vocab = AutoConfig.from_pretrained(path).vocab_size
    prefix = random_prompts([40], vocab, seed=3)[0]
    prompts = random_prompts([1, 5, 17, 33, 64, 90], vocab, seed=4)
    prompts += [prefix + p for p in random_prompts([1, 9, 30], vocab, seed=6)]
    results = []
    for fused in (ops, None):
        engine = LLMEngine(
            EngineConfig(
                ModelConfig(str(path), dtype="bfloat16"),
                CacheConfig(block_size=16, num_blocks=128),
                SchedulerConfig(max_num_batched_tokens=24, max_num_seqs=16),
            )
        )
        # on by default in bf16 on a CPU with bf16 instructions (elsewhere torch's ops; asked for here)
        assert (engine.model.fused is not None) == cpu_has_native_bf16()
        engine.model.fused = fused
        arrivals = [(2 * i, EngineRequest(f"r{i}", tuple(p), greedy(16))) for i, p in enumerate(prompts)]
        results.append(run_staggered(engine, arrivals))
        assert engine.stats().num_used_blocks == 0
    assert results[0] == results[1]
