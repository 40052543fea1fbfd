"""The disaggregated path on one GPU across two processes, without Ray: a prefill engine here computes each prompt
(prefill-only) and pushes its KV — after the prompt, or layer-pipelined behind per-layer CUDA events — with
`AutoSender` into blocks a decode engine in another process reserved and serves through `make_receiver("auto")`
(CUDA IPC, picked by topology: same GPU). The decode engine then commits and decodes: token-exact with transformers
(float32). Skipped without CUDA."""

from __future__ import annotations

import multiprocessing as mp
import threading
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from oracle import assert_matches, greedy, random_prompts, reference_greedy
from pdserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from pdserve.engine import EngineRequest, KVReservation, LLMEngine, RequestOutput
from pdserve.transfer import (
    AutoSender,
    Deadline,
    KVEndpoint,
    LayerProgress,
    TransferSpec,
    TransferStats,
    make_receiver,
)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(autouse=True, scope="module")
def _shared_kv_secret() -> Iterator[None]:
    """The peer processes this module spawns share the KV handshake's secret with it, as a cluster's replicas do
    (they inherit the environment)."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PDSERVE_KV_SECRET", "gpu-tests-shared-secret")
        yield


MAX_TOKENS = 16


def make_engine(path: str) -> LLMEngine:
    return LLMEngine(
        EngineConfig(
            ModelConfig(path, dtype="float32", device="cuda"),
            CacheConfig(num_blocks=128),
            SchedulerConfig(max_num_batched_tokens=512),
        )
    )


def _decode_replica(conn: Connection, path: str) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    engine = make_engine(path)
    receiver = make_receiver("auto", engine.kv, path, "node-a")
    conn.send(receiver.endpoint)
    while (message := conn.recv()) != "stop":
        op, payload = message
        if op == "reserve":
            held = engine.reserve(payload)
            assert held is not None
            conn.send((held.block_ids, held.num_cached_tokens, held.epoch))
        else:  # commit the first token and decode to the end
            request_id, token = payload
            tokens = [token]
            if engine.commit(request_id, token, None) is None:
                while engine.has_unfinished():
                    for out in engine.step():
                        tokens.extend(out.new_token_ids)
            conn.send((tokens, engine.stats().num_used_blocks))


def prefill_and_push(
    prefill: LLMEngine,
    sender: AutoSender,
    endpoint: KVEndpoint,
    request: EngineRequest,
    reservation: KVReservation,
    pipelined: bool,
) -> tuple[RequestOutput, TransferStats]:
    """Compute the prompt prefill-only and push the blocks the decode side lacks: after the prompt, or from a
    sender thread that moves each layer once its CUDA event says it is written."""
    skip = reservation.num_cached_tokens // prefill.layout.block_size
    progress = LayerProgress(torch.device("cuda")) if pipelined else None
    stats: list[TransferStats] = []

    def push(src_ids: tuple[int, ...]) -> None:
        spec = TransferSpec(
            reservation.epoch, list(src_ids[skip:]), list(reservation.block_ids[skip:]), request.request_id
        )
        stats.append(sender.send(endpoint, spec, prefill.kv, 30, progress))

    thread = None
    if progress is not None:
        thread = threading.Thread(target=lambda: push(progress.wait_blocks(Deadline(30))))
        thread.start()
    prefill.add_request(request, prefill_only=True, layer_sink=progress)
    first = None
    while first is None:
        first = next((o for o in prefill.step() if o.kv_block_ids is not None), None)
    if thread is not None:
        thread.join(timeout=30)
    else:
        assert first.kv_block_ids is not None
        push(tuple(first.kv_block_ids))
    assert len(stats) == 1
    return first, stats[0]


@pytest.mark.parametrize("pipelined", [False, True], ids=["after", "pipelined"])
def test_prefill_here_decode_there_is_exact(tiny_models: dict[str, Path], pipelined: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    path = str(tiny_models["llama"])
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
    prompts = random_prompts([3, 16, 40, 150], model.config.vocab_size)
    prompts.append(prompts[-1][:100] + prompts[0])  # shares 96 tokens (6 blocks) with the one before: delta push
    refs = [reference_greedy(model, p, MAX_TOKENS) for p in prompts]
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    peer = ctx.Process(target=_decode_replica, args=(child, path), daemon=True)
    peer.start()
    try:
        endpoint = parent.recv()
        prefill, sender = make_engine(path), AutoSender(path, "node-a")
        blocks_sent = []
        for i, prompt in enumerate(prompts):
            request = EngineRequest(f"r{i}", tuple(prompt), greedy(MAX_TOKENS))
            parent.send(("reserve", request))
            dst_ids, cached, epoch = parent.recv()
            reservation = KVReservation(request.request_id, dst_ids, cached, epoch)
            first, stats = prefill_and_push(prefill, sender, endpoint, request, reservation, pipelined)
            prefill.release(request.request_id)
            assert stats.transport == "cuda_ipc"
            blocks_sent.append(stats.num_blocks)
            parent.send(("commit", (request.request_id, first.new_token_ids[0])))
            tokens, used = parent.recv()
            assert_matches(refs[i], tokens, f"{'pipelined' if pipelined else 'after'} request {i}")
            assert used == 0
        # Blocks per prompt: all of it, except what the decode engine already cached (the last prompt's prefix).
        assert blocks_sent[:4] == [1, 1, 3, 10] and blocks_sent[4] == 7 - 6
    finally:
        parent.send("stop")
        peer.join(timeout=30)
