"""Layer-pipelined KV push vs pushing after the prefill, same run: what the transfer adds after the prompt is computed.

A real prefill engine (SmolLM2-135M, dtype auto) computes prompts of 512 / 2048 tokens as prefill-only requests;
their blocks go to a receiver process's reserved blocks over shared memory, TCP (loopback) and gloo communicator
pairs (the NCCL transport's protocol on CPU). "after": the
prompt computes, then `send`. "pipelined": a sender thread waits on the engine's per-layer reports and moves layer i
while layer i+1 computes (the last layer's push overlaps its MLP, the LM head and sampling). Reported: prefill time,
how long after the first token the KV lands on the decode side (what the transfer adds to TTFT), and both together;
medians of interleaved rounds.

    python benchmarks/kv_pipeline.py [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import threading
import time
import uuid

import torch

sys.path.insert(0, "tests")
from kv_peer import grant, kv_peer, open_peer
from pdserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from pdserve.engine import EngineRequest, LLMEngine, SamplingParams
from pdserve.engine.weights import resolve_dtype
from pdserve.hub import resolve_model
from pdserve.kvcache import KVCache, KVLayout
from pdserve.transfer import Deadline, KVEndpoint, KVSender, LayerProgress, SharedMemorySender, TcpSender, TransferSpec
from pdserve.transfer.gloo import GlooBackend
from pdserve.transfer.p2p import P2PSender

PROMPT_TOKENS = (512, 2048)


def cpu_line() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    flags = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in fields.get("Flags", "")]
    return f"{fields.get('Model name', '?').strip()} ({' '.join(flags)})"


def one(
    engine: LLMEngine,
    sender: KVSender,
    endpoint: KVEndpoint,
    dst: KVCache,
    prompt: list[int],
    pipelined: bool,
    tag: str,
) -> tuple[float, float]:
    """(prefill seconds, seconds from the prompt computed to its KV in place). `dst`: the receiver's cache, mapped
    here to open the destination blocks to the transfer, as the decode engine's reservation does in production."""
    request = EngineRequest(tag, tuple(prompt), SamplingParams(max_tokens=1, temperature=0))
    num_blocks = -(-len(prompt) // engine.layout.block_size)
    progress = LayerProgress() if pipelined else None
    sent: list[float] = []
    dst_ids = list(range(num_blocks))
    grant(dst, TransferSpec(epoch=1, src_block_ids=dst_ids, dst_block_ids=dst_ids, transfer_id=tag))  # untimed

    def push(src_ids: list[int]) -> None:
        spec = TransferSpec(epoch=1, src_block_ids=src_ids, dst_block_ids=dst_ids, transfer_id=tag)
        sender.send(endpoint, spec, engine.kv, 60, progress)
        sent.append(time.perf_counter())

    thread = None
    if progress is not None:
        thread = threading.Thread(target=lambda: push(list(progress.wait_blocks(Deadline(60)))))
        thread.start()
    start = time.perf_counter()
    engine.add_request(request, prefill_only=True, layer_sink=progress)
    block_ids = None
    while block_ids is None:
        block_ids = next((o.kv_block_ids for o in engine.step() if o.kv_block_ids is not None), None)
    computed = time.perf_counter()
    if thread is not None:
        thread.join()
    else:
        push(list(block_ids))
    engine.release(tag)
    return computed - start, sent[0] - computed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the prefill engine")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = str(resolve_dtype("auto", torch.device("cpu"))).removeprefix("torch.")
    path = str(resolve_model(None, "bfloat16" if dtype == "bfloat16" else "float32"))
    engine = LLMEngine(
        EngineConfig(
            ModelConfig(path, dtype=dtype),
            CacheConfig(block_size=16, num_blocks=512, enable_prefix_caching=False),
            SchedulerConfig(max_num_batched_tokens=4096, max_num_seqs=4),
        )
    )
    remote = KVLayout(**{**vars(engine.layout), "num_blocks": 512})
    g = torch.Generator().manual_seed(0)
    prompts = {n: torch.randint(100, 49000, (n,), generator=g).tolist() for n in PROMPT_TOKENS}
    rows = []
    with (
        kv_peer(remote, f"/dev/shm/pdserve-bench-{uuid.uuid4().hex}", model_id=path) as endpoint,
        kv_peer(remote, f"/dev/shm/pdserve-bench-{uuid.uuid4().hex}", model_id=path, transport="gloo") as gloo,
    ):
        shared, gloo_dst = open_peer(endpoint), open_peer(gloo)
        senders: dict[str, tuple[KVSender, KVEndpoint, KVCache]] = {
            "shm": (SharedMemorySender(path), endpoint, shared),
            "tcp": (TcpSender(path), endpoint, shared),
            "gloo": (P2PSender(path, GlooBackend()), gloo, gloo_dst),
        }
        for name, (sender, peer, dst) in senders.items():
            for n, prompt in prompts.items():
                times: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
                for r in range(args.repeats + 1):  # the first round warms up
                    for pipelined in (False, True):
                        result = one(engine, sender, peer, dst, prompt, pipelined, f"{name}-{n}-{r}-{pipelined}")
                        if r:
                            times[pipelined].append(result)
                rows.append((name, n, times))
    print(f"CPU: {cpu_line()}; dtype {dtype}; {args.threads} torch threads; median of {args.repeats} rounds\n")
    print("Ready = the first token sampled AND the prompt's KV in place on the decode side (ms from the request).")
    print("| transport | prompt tokens | prefill ms (after / pipelined) | KV lands after the first token ms "
          "(after / pipelined) | ready ms (after / pipelined) |")  # fmt: skip
    print("|---|---|---|---|---|")
    for name, n, times in rows:
        prefill = [statistics.median(t[0] for t in times[p]) for p in (False, True)]
        late = [statistics.median(max(0.0, t[1]) for t in times[p]) for p in (False, True)]
        ready = [statistics.median(t[0] + max(0.0, t[1]) for t in times[p]) for p in (False, True)]
        print(
            f"| {name} | {n} | {1e3 * prefill[0]:.0f} / {1e3 * prefill[1]:.0f} | {1e3 * late[0]:.1f} / "
            f"{1e3 * late[1]:.1f} | {1e3 * ready[0]:.0f} / {1e3 * ready[1]:.0f} |"
        )


if __name__ == "__main__":
    main()
