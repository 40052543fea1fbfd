"""Where a CUDA IPC KV push spends its time (needs one CUDA GPU): a decode replica's cache in a spawned process, a
prefill's cache here, SmolLM2-135M's KV layout in bf16; for 16 / 128 / 512 blocks (256 / 2048 / 8192-token prompts)
the whole `CudaIpcSender.send` next to its parts timed alone, each best of `--repeats`:

- index: the two block-id lists to the GPU (`torch.tensor(..., device=cuda)`, a synchronous host-to-device copy each)
- fence: one check of the decode replica's write permits (host memory, numpy)
- sync: recording an event on the prefill's stream and waiting for it (nothing pending)
- move: the gather + scatter of every layer's blocks into the peer's cache, waited for
- stamps: the arrival stamps written, waited for
- d2d: one contiguous device-to-device copy of as many bytes (the ceiling)

    python benchmarks/cuda_ipc_send.py [--repeats 50]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path

import torch

from pdserve.kvcache import KVCache, KVLayout
from pdserve.transfer import CudaIpcSender, KVEndpoint, TransferSpec, make_receiver
from pdserve.transfer.base import fence_deadline, planes

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from timing import best_of

LAYOUT = KVLayout(num_layers=30, num_blocks=1024, block_size=16, num_kv_heads=3, head_dim=64, dtype=torch.bfloat16)


def _decode_replica(conn: Connection) -> None:
    kv = KVCache(LAYOUT, device="cuda")
    receiver = make_receiver("cuda_ipc", kv, "m", "node-a")
    conn.send(receiver.endpoint)
    conn.recv()  # "stop"


def row(
    num: int,
    src: KVCache,
    dst: KVCache,
    sender: CudaIpcSender,
    endpoint: KVEndpoint,
    stream: torch.cuda.Stream,
    repeats: int,
) -> str:
    """The table's row for a push of `num` blocks."""
    dst_ids = torch.randperm(LAYOUT.num_blocks, generator=torch.Generator().manual_seed(num))[:num].tolist()
    spec = TransferSpec(epoch=7, src_block_ids=list(range(num)), dst_block_ids=dst_ids, transfer_id=f"b{num}")
    dst.open_writes(dst_ids, spec.epoch, time.monotonic_ns() + 600 * 10**9)
    send_s = best_of(lambda: sender.send(endpoint, spec, src, timeout_s=30), repeats)
    index_s = best_of(lambda: torch.tensor(spec.src_block_ids, dtype=torch.long, device="cuda"), repeats)
    fence_s = best_of(lambda: fence_deadline(dst, spec.dst_block_ids, spec.epoch, "x"), repeats)
    sync_s = best_of(lambda: torch.cuda.current_stream().record_event().synchronize(), repeats)
    src_index = torch.tensor(spec.src_block_ids, device="cuda")
    dst_index = torch.tensor(spec.dst_block_ids, device="cuda")
    src_planes, dst_planes = planes(src), planes(dst)

    def move() -> None:
        with torch.cuda.stream(stream):
            dst_planes.index_copy_(2, dst_index, src_planes.index_select(2, src_index))
        stream.synchronize()

    def stamps() -> None:
        with torch.cuda.stream(stream):
            dst.block_epochs.index_fill_(0, dst_index, spec.epoch)
        stream.synchronize()

    move_s, stamps_s = best_of(move, repeats), best_of(stamps, repeats)
    nbytes = num * LAYOUT.bytes_per_block
    flat = src.flat[: nbytes // 2]
    out = torch.empty_like(flat)
    d2d_s = best_of(lambda: (out.copy_(flat), torch.cuda.synchronize()), repeats)
    ms = [x * 1e3 for x in (send_s, index_s, fence_s, sync_s, move_s, stamps_s, d2d_s)]
    return (
        f"| {num} | {nbytes / 1e6:.1f} | {ms[0]:.3f} | {nbytes / 1e9 / send_s:.0f} | {ms[1]:.3f} | "
        f"{ms[2]:.3f} | {ms[3]:.3f} | {ms[4]:.3f} | {ms[5]:.3f} | {ms[6]:.3f} | {nbytes / 1e9 / d2d_s:.0f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    os.environ.setdefault("PDSERVE_KV_SECRET", "cuda-ipc-benchmark")
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    peer = ctx.Process(target=_decode_replica, args=(child,), daemon=True)
    peer.start()
    endpoint = parent.recv()
    try:
        src = KVCache(LAYOUT, device="cuda")
        src.flat.copy_(torch.randn(src.flat.shape, device="cuda"))
        sender = CudaIpcSender("m")
        dst = sender.map(endpoint, src.flat.device)
        stream = torch.cuda.Stream()
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.repeats} repeats, best of each (ms)")
        print("| blocks | MB | send | GB/s | index | fence | sync | move | stamps | d2d | d2d GB/s |")
        print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for num in (16, 128, 512):
            print(row(num, src, dst, sender, endpoint, stream, args.repeats))
            sys.stdout.flush()
    finally:
        parent.send("stop")
        peer.join(timeout=30)


if __name__ == "__main__":
    main()
