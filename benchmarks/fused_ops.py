"""The fused bf16 glue ops (src/pdserve/engine/csrc/fused_ops.cpp) against the torch ops they replace, same run.

Two tables:
  ops      median us per call at a decode step's size (16 rows; SmolLM2: hidden 576, 9 + 3 heads of 64,
           intermediate 1536) and a prefill chunk's (512 rows)
  engine   the whole engine with the fused ops on and off (attention kernels as configured; interleaved rounds,
           medians): the mean pure-decode step at 16 decodes of ~300 tokens, and output tok/s over 16 x (256 -> 64)

    python benchmarks/fused_ops.py --rounds 3      # bf16 only: the ops exist for bf16
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from decode_attention import decode_step_ms
from engine_throughput import cpu_description, make_prompts, run_engine

from pdserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from pdserve.engine import LLMEngine, native
from pdserve.engine.model import apply_rope, rms_norm
from pdserve.hub import resolve_model


def median_us(fn: Callable[[], object], n: int = 300) -> float:
    for _ in range(20):
        fn()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def op_rows(ops: native.FusedOps, rows: int) -> list[tuple[str, float, float]]:
    g = torch.Generator().manual_seed(rows)
    bf16 = torch.bfloat16
    x = torch.randn(rows, 576, generator=g).to(bf16)
    delta = torch.randn(rows, 576, generator=g).to(bf16)
    w = torch.rand(576, generator=g).to(bf16)
    qk = torch.randn(rows, 15, 64, generator=g).to(bf16)[:, :12]  # Q and K heads of the fused QKV output
    cos, sin = (torch.randn(rows, 64, generator=g).to(bf16) for _ in range(2))
    gate_up = torch.randn(rows, 3072, generator=g).to(bf16)

    def torch_add_norm() -> torch.Tensor:
        y = x.clone()
        y += delta
        return rms_norm(y, w, 1e-5)

    def torch_silu() -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate).mul_(up)

    cos1, sin1 = cos.unsqueeze(1), sin.unsqueeze(1)
    return [
        ("rms_norm", median_us(lambda: rms_norm(x, w, 1e-5)), median_us(lambda: ops.rms_norm(x, w, 1e-5))),
        ("residual add + rms_norm (with a copy of x)", median_us(torch_add_norm),
         median_us(lambda: ops.add_rms_norm_(x.clone(), delta, w, 1e-5))),
        ("rope (Q and K)", median_us(lambda: apply_rope(qk, cos1, sin1)), median_us(lambda: ops.rope(qk, cos, sin))),
        ("silu(gate) * up", median_us(torch_silu), median_us(lambda: ops.silu_and_mul(gate_up))),
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="local HF directory (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    ops = native.fused_ops()
    if ops is None:
        raise SystemExit("the native kernels are not available here (no compiler?): nothing to compare")
    print(f"# CPU: {cpu_description()}")
    print(f"# dtype bfloat16, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("\n| op | rows | torch us | fused us | speedup |")
    print("|---|---|---|---|---|")
    for rows in (16, 512):
        for name, unfused, fused in op_rows(ops, rows):
            print(f"| {name} | {rows} | {unfused:.1f} | {fused:.1f} | {unfused / fused:.2f}x |")

    path = str(resolve_model(args.model, "bfloat16"))
    engine = LLMEngine(
        EngineConfig(
            ModelConfig(path, dtype="bfloat16"),
            CacheConfig(memory_bytes=1 << 30),
            SchedulerConfig(max_num_batched_tokens=512, max_num_seqs=256),
        )
    )
    vocab = engine.model.shape.vocab_size
    run_engine(engine, make_prompts(2, 32, vocab, seed=1), 4)
    variants = {"torch ops": None, "fused": engine.model.fused}
    steps: dict[str, list[float]] = {name: [] for name in variants}
    tok_s: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(args.rounds):
        for i, (name, fused_ops) in enumerate(variants.items()):
            engine.model.fused = fused_ops
            steps[name].append(decode_step_ms(engine, vocab))
            prompts = make_prompts(16, 256, vocab, seed=100 + 2 * r + i)  # fresh: no prefix-cache hit across runs
            tok_s[name].append(run_engine(engine, prompts, 64).tok_per_s)
    attention = "native" if engine.model.decode_kernel is not None else "SDPA"
    print(f"\n# engine: {path}, attention {attention}, {args.rounds} interleaved rounds, medians")
    print("| glue | decode step ms (16 x ~300) | tok/s 16 x (256 -> 64) |")
    print("|---|---|---|")
    for name in variants:
        print(f"| {name} | {statistics.median(steps[name]):.2f} | {statistics.median(tok_s[name]):.1f} |")
    ratio = statistics.median(tok_s["fused"]) / statistics.median(tok_s["torch ops"])
    print(f"\nfused / torch ops engine tok/s: {ratio:.2f}x")


if __name__ == "__main__":
    main()
