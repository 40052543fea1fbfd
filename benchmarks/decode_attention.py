"""Decode attention on CPU: the native paged kernel (src/pdserve/engine/csrc/paged_attention.cpp) against the SDPA route
(blocks gathered into a padded copy, then SDPA), same run, same machine.

Two tables:
  kernel   one layer's decode attention for B sequences of ~ctx tokens (SmolLM2's 9 query / 3 KV heads, head_dim
           64), median us per call: "hot" repeats the call on the same data, "cold" evicts the caches between
           calls (a 64 MB sweep), as a model step does with its weights between layers
  engine   the whole engine, native kernel on and off (interleaved rounds, medians): the mean pure-decode step at 16
           decodes of ~300 tokens, and output tok/s over 16 x (256 -> 64) greedy requests

    python benchmarks/decode_attention.py                  # dtype auto (bf16 where the CPU has it natively)
    python benchmarks/decode_attention.py --dtype float32 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from engine_throughput import cpu_description, make_prompts, run_engine

from pdserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from pdserve.engine import EngineRequest, LLMEngine, SamplingParams, native
from pdserve.engine.attention import _gather
from pdserve.engine.weights import resolve_dtype
from pdserve.hub import resolve_model

SHAPES = [(1, 300), (4, 300), (16, 300), (64, 300), (16, 1000), (16, 4000)]


def median_us(fn: Callable[[], object], cold: bool, sweep: torch.Tensor, n: int = 40) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(n):
        if cold:
            sweep.add_(1)
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def kernel_row(
    batch: int, ctx: int, dtype: torch.dtype, op: Callable[..., torch.Tensor], sweep: torch.Tensor, g: torch.Generator
) -> list[float]:
    """us per call: SDPA hot, native hot, SDPA cold, native cold."""
    heads, kv_heads, head_dim, block_size = 9, 3, 64, 16
    lens = torch.randint(max(1, ctx - 60), ctx + 1, (batch,), generator=g)
    max_blocks = int(-(-lens.max() // block_size))
    num_blocks = batch * max_blocks * 2
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype)
    block_ids = torch.randperm(num_blocks, generator=g)[: batch * max_blocks].view(batch, max_blocks)
    q = torch.randn(batch, heads, head_dim, generator=g).to(dtype)
    mask = (torch.arange(max_blocks * block_size)[None, :] < lens[:, None]).view(batch, 1, 1, -1)

    def sdpa() -> torch.Tensor:
        k, v = _gather(k_cache, block_ids), _gather(v_cache, block_ids)
        grouped = q.view(batch, kv_heads, heads // kv_heads, head_dim)
        return F.scaled_dot_product_attention(grouped, k, v, attn_mask=mask, scale=0.125)

    def ours() -> torch.Tensor:
        return op(q, k_cache, v_cache, block_ids, lens, 0.125)

    return [median_us(f, cold, sweep) for cold in (False, True) for f in (sdpa, ours)]


def kernel_table(dtype: torch.dtype, op: Callable[..., torch.Tensor]) -> None:
    print("\n| B x ctx | SDPA hot us | native hot us | speedup | SDPA cold us | native cold us | speedup |")
    print("|---|---|---|---|---|---|---|")
    sweep = torch.zeros(64 << 20, dtype=torch.uint8)
    g = torch.Generator().manual_seed(0)
    for batch, ctx in SHAPES:
        row = kernel_row(batch, ctx, dtype, op, sweep, g)
        print(
            f"| {batch} x {ctx} | {row[0]:.0f} | {row[1]:.0f} | {row[0] / row[1]:.2f}x "
            f"| {row[2]:.0f} | {row[3]:.0f} | {row[2] / row[3]:.2f}x |"
        )


def decode_step_ms(engine: LLMEngine, vocab: int) -> float:
    """Mean step with 16 decodes at ~256-320 tokens of context (prefills excluded)."""
    params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(make_prompts(16, 256, vocab, seed=4)):
        engine.add_request(EngineRequest(f"step-{time.monotonic_ns()}-{i}", tuple(prompt), params))
    times = []
    while engine.has_unfinished():
        start = time.perf_counter()
        outputs = engine.step()
        if len(outputs) == 16 and all(len(o.new_token_ids) == 1 for o in outputs):
            times.append(time.perf_counter() - start)
    return statistics.mean(times[4:]) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="local HF directory (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    op = native.paged_decode_op()
    if op is None:
        raise SystemExit("the native kernel is not available here (no compiler?): nothing to compare")
    dtype = resolve_dtype(args.dtype, torch.device("cpu"))
    print(f"# CPU: {cpu_description()}")
    print(f"# dtype {str(dtype).removeprefix('torch.')}, torch {torch.__version__}")
    kernel_table(dtype, op)

    path = str(resolve_model(args.model, "bfloat16" if dtype == torch.bfloat16 else "float32"))
    engine = LLMEngine(
        EngineConfig(
            ModelConfig(path, dtype=str(dtype).removeprefix("torch.")),
            CacheConfig(memory_bytes=1 << 30),
            SchedulerConfig(max_num_batched_tokens=512, max_num_seqs=256),
        )
    )
    vocab = engine.model.shape.vocab_size
    run_engine(engine, make_prompts(2, 32, vocab, seed=1), 4)
    kernels = {"SDPA": None, "native": engine.model.decode_kernel}
    steps: dict[str, list[float]] = {name: [] for name in kernels}
    tok_s: dict[str, list[float]] = {name: [] for name in kernels}
    for r in range(args.rounds):
        for i, (name, kernel) in enumerate(kernels.items()):
            engine.model.decode_kernel = kernel
            steps[name].append(decode_step_ms(engine, vocab))
            prompts = make_prompts(16, 256, vocab, seed=100 + 2 * r + i)  # fresh: no prefix-cache hit across runs
            tok_s[name].append(run_engine(engine, prompts, 64).tok_per_s)
    print(f"\n# engine: {path}, {args.rounds} interleaved rounds, medians")
    print("| decode attention | decode step ms (16 x ~300) | tok/s 16 x (256 -> 64) |")
    print("|---|---|---|")
    for name in kernels:
        print(f"| {name} | {statistics.median(steps[name]):.2f} | {statistics.median(tok_s[name]):.1f} |")
    ratio = statistics.median(tok_s["native"]) / statistics.median(tok_s["SDPA"])
    print(f"\nnative / SDPA engine tok/s: {ratio:.2f}x")


if __name__ == "__main__":
    main()
