"""Engine throughput vs transformers, same machine, same run.

Workload (issue 2): N concurrent requests of P random prompt tokens -> O output tokens (ignore EOS), all arriving
at once. pdserve's engine runs them with continuous batching; transformers runs the same prompts as one static
batch through `generate()`. Also: single-sequence decode tok/s and a 512-token prefill, for both.

    python benchmarks/engine_throughput.py                 # SmolLM2-135M-Instruct, dtype auto
    python benchmarks/engine_throughput.py --dtype float32 --model /path/to/hf_dir
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM

from pdserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from pdserve.engine import EngineRequest, LLMEngine, SamplingParams
from pdserve.engine.weights import resolve_dtype
from pdserve.hub import resolve_model


@dataclass(frozen=True)
class RunResult:
    wall_s: float
    num_output_tokens: int
    ttft_s: list[float]
    tpot_s: list[float]

    @property
    def tok_per_s(self) -> float:
        return self.num_output_tokens / self.wall_s


def cpu_description() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    flags = fields.get("Flags", "").split()
    wanted = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return f"{fields.get('Model name', '?').strip()}, {torch.get_num_threads()} threads, flags: {' '.join(wanted)}"


def make_prompts(num: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(100, vocab - 100, (length,), generator=g).tolist() for _ in range(num)]


def run_engine(engine: LLMEngine, prompts: list[list[int]], max_tokens: int) -> RunResult:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(EngineRequest(f"bench-{time.monotonic_ns()}-{i}", tuple(p), params))
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    counts: dict[str, int] = {}
    while engine.has_unfinished():
        outputs = engine.step()
        now = time.perf_counter()
        for out in outputs:
            first.setdefault(out.request_id, now)
            last[out.request_id] = now
            counts[out.request_id] = counts.get(out.request_id, 0) + len(out.new_token_ids)
    wall = time.perf_counter() - start
    ttft = [first[r] - start for r in first]
    tpot = [(last[r] - first[r]) / (counts[r] - 1) for r in first if counts[r] > 1]
    return RunResult(wall, sum(counts.values()), ttft, tpot)


def run_transformers(model: torch.nn.Module, prompts: list[list[int]], max_tokens: int) -> RunResult:
    ids = torch.tensor(prompts)
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_tokens,
            min_new_tokens=max_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    wall = time.perf_counter() - start
    return RunResult(wall, ids.shape[0] * max_tokens, [], [])


def hf_prefill_s(model: torch.nn.Module, prompt: list[int]) -> float:
    with torch.inference_mode():
        start = time.perf_counter()
        model(torch.tensor([prompt]), logits_to_keep=1)
        return time.perf_counter() - start


def engine_prefill_s(engine: LLMEngine, prompt: list[int]) -> float:
    return run_engine(engine, [prompt], 1).ttft_s[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="local HF directory (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--num-requests", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=512)
    parser.add_argument("--skip-transformers", action="store_true")
    args = parser.parse_args()

    dtype = resolve_dtype(args.dtype, torch.device("cpu"))
    dtype_name = str(dtype).removeprefix("torch.")
    path = str(resolve_model(args.model, "bfloat16" if dtype == torch.bfloat16 else "float32"))
    engine = LLMEngine(
        EngineConfig(
            ModelConfig(path, dtype=dtype_name),
            CacheConfig(memory_bytes=2 << 30),
            SchedulerConfig(max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=256),
        )
    )
    vocab = engine.model.shape.vocab_size
    prompts = make_prompts(args.num_requests, args.prompt_len, vocab)
    warm = make_prompts(2, 32, vocab, seed=1)
    run_engine(engine, warm, 4)  # warm-up: first-call allocations, oneDNN kernel selection

    print(f"# CPU: {cpu_description()}")
    print(f"# model: {path} dtype={dtype_name} torch={torch.__version__}")
    print(
        f"# workload: {args.num_requests} x ({args.prompt_len} prompt -> {args.output_len} output), greedy, "
        f"ignore_eos; pdserve max_num_batched_tokens={args.max_num_batched_tokens}"
    )
    ours = run_engine(engine, prompts, args.output_len)
    single = run_engine(engine, make_prompts(1, 16, vocab, seed=2), 128)
    prefill = engine_prefill_s(engine, make_prompts(1, 512, vocab, seed=3)[0])

    rows = [("pdserve engine", ours)]
    hf_single = hf_prefill = None
    if not args.skip_transformers:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
        run_transformers(model, warm, 4)
        rows.append(("transformers static batch", run_transformers(model, prompts, args.output_len)))
        hf_single = run_transformers(model, make_prompts(1, 16, vocab, seed=2), 128)
        hf_prefill = hf_prefill_s(model, make_prompts(1, 512, vocab, seed=3)[0])

    print("\n| system | output tok/s | wall s | median TTFT s | median TPOT ms |\n|---|---|---|---|---|")
    for name, r in rows:
        ttft = f"{statistics.median(r.ttft_s):.2f}" if r.ttft_s else "-"
        tpot = f"{1000 * statistics.median(r.tpot_s):.1f}" if r.tpot_s else "-"
        print(f"| {name} | {r.tok_per_s:.1f} | {r.wall_s:.2f} | {ttft} | {tpot} |")
    if len(rows) == 2:
        print(f"\npdserve / transformers output tok/s: {ours.tok_per_s / rows[1][1].tok_per_s:.2f}x")
    print("\n| single sequence | pdserve | transformers |\n|---|---|---|")
    hf_decode = hf_single.tok_per_s if hf_single else float("nan")
    print(f"| decode tok/s (128 tokens) | {single.tok_per_s:.1f} | {hf_decode:.1f} |")
    print(f"| prefill 512 tokens, s | {prefill:.3f} | {hf_prefill or float('nan'):.3f} |")


if __name__ == "__main__":
    main()
