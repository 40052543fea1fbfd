"""Prefill attention on CPU: the native paged kernel (src/pdserve/engine/csrc/paged_attention.cpp) against the SDPA
route (a fresh prompt: one causal SDPA call; a chunk after cached context: its blocks gathered, then SDPA with an
explicit causal mask), same run, same machine.

Two tables:
  kernel   one layer's `paged_attention` on one prefill chunk (SmolLM2's 9 query / 3 KV heads, head_dim 64, blocks
           of 16 anywhere in the cache), median ms per call, for chunks of n rows after c cached tokens; in bf16 the
           native kernel's float32 path and its AVX512-BF16 dot-product path (the default where the CPU has it)
  engine   the whole engine, prefill kernel on and off (decode kernel as configured; interleaved rounds, medians):
           seconds to prefill 16 x 256-token prompts and one 2048-token prompt (512-token chunks), and output tok/s
           over 16 x (256 -> 64) greedy requests

    python benchmarks/prefill_attention.py                  # dtype auto (bf16 where the CPU has it natively)
    python benchmarks/prefill_attention.py --dtype float32 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from engine_throughput import cpu_description, make_prompts, run_engine

from pdserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from pdserve.engine import EngineRequest, LLMEngine, SamplingParams, native
from pdserve.engine.attention import AttentionMetadata, PrefillSpan, paged_attention
from pdserve.engine.weights import resolve_dtype
from pdserve.hub import resolve_model

SHAPES = [(256, 0), (512, 0), (512, 512), (512, 1536), (2048, 0), (64, 4000)]  # (chunk rows, cached tokens before)


def median_ms(fn: Callable[[], object], n: int = 15) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def kernel_row(rows: int, context: int, dtype: torch.dtype, op: Callable[..., torch.Tensor]) -> list[float]:
    """ms per call: SDPA route, native float32 path, native bf16-dot path (the same as float32 outside bf16)."""
    heads, kv_heads, head_dim, block_size = 9, 3, 64, 16
    g = torch.Generator().manual_seed(rows + context)
    num_blocks = -(-(rows + context) // block_size)
    k_cache = torch.randn(2 * num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(2 * num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype)
    table = torch.randperm(2 * num_blocks, generator=g)[:num_blocks]
    pos = torch.arange(context, context + rows)
    slots = table[pos // block_size] * block_size + pos % block_size
    q = torch.randn(rows, heads, head_dim, generator=g).to(dtype)
    k = torch.randn(rows, kv_heads, head_dim, generator=g).to(dtype)
    v = torch.randn(rows, kv_heads, head_dim, generator=g).to(dtype)
    if context:  # what ModelRunner builds for the SDPA route
        mask = torch.arange(num_blocks * block_size).unsqueeze(0) <= pos.unsqueeze(1)
        span = PrefillSpan(0, rows, context, table, mask)
    else:
        span = PrefillSpan(0, rows, 0, None, None)
    meta = AttentionMetadata(
        slots, 0, None, None, None, [span], torch.tensor([[0, rows, context]]), table.unsqueeze(0).contiguous()
    )
    sdpa = median_ms(lambda: paged_attention(q, k, v, k_cache, v_cache, meta, 0.125))
    paths = [
        median_ms(lambda dot=dot: paged_attention(  # type: ignore[misc]
            q, k, v, k_cache, v_cache, meta, 0.125, None, lambda *a: op(*a, dot)
        ))
        for dot in (False, True)
    ]  # fmt: skip
    return [sdpa, *paths]


def kernel_table(dtype: torch.dtype, op: Callable[..., torch.Tensor]) -> None:
    print("\n| chunk rows after cached tokens | SDPA ms | native f32 ms | speedup | native bf16-dot ms | speedup |")
    print("|---|---|---|---|---|---|")
    for rows, context in SHAPES:
        sdpa, f32, dot = kernel_row(rows, context, dtype, op)
        dot_cells = f"{dot:.2f} | {sdpa / dot:.2f}x" if dtype == torch.bfloat16 else "— | —"
        print(f"| {rows} after {context} | {sdpa:.2f} | {f32:.2f} | {sdpa / f32:.2f}x | {dot_cells} |")


def prefill_s(engine: LLMEngine, prompts: list[list[int]]) -> float:
    """Seconds from admitting the prompts to every one's first token (max_tokens=1: prefill only)."""
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(EngineRequest(f"pf-{time.monotonic_ns()}-{i}", tuple(prompt), params))
    start = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="local HF directory (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    op = native.paged_prefill_op()
    if op is None:
        raise SystemExit("the native kernels are not available here (no compiler?): nothing to compare")
    dtype = resolve_dtype(args.dtype, torch.device("cpu"))
    print(f"# CPU: {cpu_description()}")
    print(f"# dtype {str(dtype).removeprefix('torch.')}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    kernel_table(dtype, op)

    path = str(resolve_model(args.model, "bfloat16" if dtype == torch.bfloat16 else "float32"))
    engine = LLMEngine(
        EngineConfig(
            ModelConfig(path, dtype=str(dtype).removeprefix("torch.")),
            CacheConfig(memory_bytes=1 << 30, enable_prefix_caching=False),
            SchedulerConfig(max_num_batched_tokens=512, max_num_seqs=256),
        )
    )
    vocab = engine.model.shape.vocab_size
    run_engine(engine, make_prompts(2, 32, vocab, seed=1), 4)
    kernels = {"SDPA": None, "native": engine.model.prefill_kernel}
    results: dict[str, dict[str, list[float]]] = {name: {"short": [], "long": [], "tok_s": []} for name in kernels}
    for r in range(args.rounds):
        for i, (name, kernel) in enumerate(kernels.items()):
            engine.model.prefill_kernel = kernel
            seed = 100 + 2 * r + i
            results[name]["short"].append(prefill_s(engine, make_prompts(16, 256, vocab, seed=seed)))
            results[name]["long"].append(prefill_s(engine, make_prompts(1, 2048, vocab, seed=seed)))
            results[name]["tok_s"].append(run_engine(engine, make_prompts(16, 256, vocab, seed=seed), 64).tok_per_s)
    decode = "native" if engine.model.decode_kernel is not None else "SDPA"
    print(f"\n# engine: {path}, decode attention {decode}, {args.rounds} interleaved rounds, medians")
    print("| prefill attention | prefill 16 x 256 s | prefill 1 x 2048 s | tok/s 16 x (256 -> 64) |")
    print("|---|---|---|---|")
    for name in kernels:
        m = {key: statistics.median(values) for key, values in results[name].items()}
        print(f"| {name} | {m['short']:.3f} | {m['long']:.3f} | {m['tok_s']:.1f} |")
    ratio = statistics.median(results["native"]["tok_s"]) / statistics.median(results["SDPA"]["tok_s"])
    print(f"\nnative / SDPA engine tok/s: {ratio:.2f}x")


if __name__ == "__main__":
    main()
