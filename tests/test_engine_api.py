"""Engine entry points, input validation, sampling, aborts and KV events on a tiny Llama."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from handoff import copy_missing_blocks, prefill_then_decode
from oracle import greedy, load_reference_model, random_prompts, run_staggered
from pdserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from pdserve.engine import EngineRequest, FinishReason, KVReservation, LLMEngine, RequestOutput, SamplingParams
from pdserve.engine.request import TokenLogprob
from pdserve.engine.weights import resolve_dtype
from pdserve.kvcache import KVEventKind, hash_block_chain


@pytest.fixture(scope="module")
def llama(tiny_models: dict[str, Path]) -> Path:
    return tiny_models["llama"]


def make_engine(path: Path, num_blocks: int = 64, budget: int = 512) -> LLMEngine:
    return LLMEngine(
        EngineConfig(
            ModelConfig(str(path), dtype="float32"),
            CacheConfig(num_blocks=num_blocks),
            SchedulerConfig(max_num_batched_tokens=budget),
        )
    )


@pytest.fixture
def engine(llama: Path) -> LLMEngine:
    return make_engine(llama)


def req(rid: str, prompt: list[int], params: SamplingParams) -> EngineRequest:
    return EngineRequest(rid, tuple(prompt), params)


def stamp(engine: LLMEngine, reservation: KVReservation | None) -> None:
    """Mark the reserved blocks past the cached prefix as fully written, as a KV transport does."""
    assert reservation is not None
    engine.kv.block_epochs[list(reservation.block_ids[reservation.num_cached_tokens // 16 :])] = reservation.epoch


def assert_idle(engine: LLMEngine) -> None:
    s = engine.stats()
    assert (s.num_used_blocks, s.num_running, s.num_waiting, s.num_held) == (0, 0, 0, 0), s


@pytest.mark.parametrize(
    ("prompt_len", "params", "message"),
    [
        (0, SamplingParams(), "prompt is empty"),
        (1024, SamplingParams(), "context"),
        (5, SamplingParams(max_tokens=0), "max_tokens"),
        (5, SamplingParams(temperature=-1.0), "temperature"),
        (5, SamplingParams(temperature=float("nan")), "temperature"),
        (5, SamplingParams(top_p=0.0), "top_p"),
        (5, SamplingParams(top_k=-2), "top_k"),
        (5, SamplingParams(max_tokens=4, min_tokens=5), "min_tokens"),
        (5, SamplingParams(stop_token_ids=(10**9,)), "stop_token_ids"),
        (5, SamplingParams(logit_bias=((10**6, 1.0),)), "logit_bias"),  # was accepted, then failed the step
        (5, SamplingParams(logit_bias=((7, 1.0), (7, -1.0))), "logit_bias"),
    ],
)
def test_invalid_input_raises_before_allocating(
    engine: LLMEngine, prompt_len: int, params: SamplingParams, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        engine.add_request(req("bad", [5] * prompt_len, params))
    with pytest.raises(ValueError, match=message):
        engine.reserve(req("bad", [5] * prompt_len, params))
    assert_idle(engine)
    assert engine.pool.events.latest_seq == 0


def test_out_of_vocab_prompt_and_duplicate_id_are_rejected(engine: LLMEngine) -> None:
    with pytest.raises(ValueError, match="token ids"):
        engine.add_request(req("a", [10**6], greedy(2)))
    engine.add_request(req("a", [5, 6], greedy(2)))
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request(req("a", [5, 6], greedy(2)))
    run_staggered(engine, [])
    assert_idle(engine)


def test_unsupported_architecture_fails_at_load(llama: Path, tmp_path: Path) -> None:
    bad = tmp_path / "gpt2ish"
    shutil.copytree(llama, bad)
    config = json.loads((bad / "config.json").read_text())
    config["architectures"] = ["FalconForCausalLM"]
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unsupported architecture 'FalconForCausalLM'"):
        make_engine(bad)
    with pytest.raises(ValueError, match=r"no config\.json"):
        make_engine(tmp_path)


def test_abort_at_every_stage_frees_every_block(llama: Path) -> None:
    engine = make_engine(llama, budget=32)
    prompts = random_prompts([100, 100, 20, 20, 50], 500)
    engine.add_request(req("decoding", prompts[2], greedy(50)))
    engine.add_request(req("prefilling", prompts[0], greedy(50)))
    engine.add_request(req("waiting", prompts[1], greedy(50)))
    engine.add_request(req("held", prompts[3], greedy(50)), prefill_only=True)
    reservation = engine.reserve(req("reserved", prompts[4], greedy(50)))
    assert reservation is not None and len(reservation.block_ids) == 4
    engine.step()
    engine.step()
    seqs = engine._seqs
    assert seqs["decoding"].num_output_tokens >= 1
    assert 0 < seqs["prefilling"].num_computed_tokens < 100
    assert seqs["waiting"].block_ids == []
    assert engine.stats().num_used_blocks > 0
    for rid in ("decoding", "prefilling", "waiting", "reserved"):
        assert engine.abort(rid)
    assert not engine.abort("decoding")  # already gone
    while engine.has_unfinished():
        engine.step()
    assert engine._seqs["held"].block_ids
    assert engine.abort("held")
    assert_idle(engine)


def test_reservation_reuses_cached_prefix_and_commit_registers_blocks(llama: Path) -> None:
    engine = make_engine(llama)
    prompt = random_prompts([40], 500)[0]
    run_staggered(engine, [(0, req("warm", prompt, greedy(1)))])
    reservation = engine.reserve(req("d", [*prompt, 7, 8], greedy(3)))
    assert reservation is not None
    assert reservation.num_cached_tokens == 32 and len(reservation.block_ids) == 3
    assert engine.stats().num_held == 1
    with pytest.raises(ValueError, match="KV transfer incomplete"):
        engine.commit("d", first_token_id=9)  # block 2 was never written
    stamp(engine, reservation)
    assert engine.commit("d", first_token_id=9) is None
    with pytest.raises(ValueError, match="no open reservation"):
        engine.commit("d", first_token_id=9)
    run_staggered(engine, [])
    assert_idle(engine)


def test_stale_epoch_does_not_commit(llama: Path) -> None:
    engine = make_engine(llama, num_blocks=2)
    first = engine.reserve(req("a", [5] * 20, greedy(2)))
    stamp(engine, first)
    engine.abort("a")
    second = engine.reserve(req("b", [6] * 20, greedy(2)))  # the same blocks, a new epoch
    assert first is not None and second is not None and set(second.block_ids) == set(first.block_ids)
    with pytest.raises(ValueError, match="incomplete"):
        engine.commit("b", first_token_id=3)
    engine.abort("b")
    assert_idle(engine)


def test_reserve_returns_none_without_room(llama: Path) -> None:
    engine = make_engine(llama, num_blocks=4)
    assert engine.reserve(req("a", [5] * 40, greedy(1))) is not None  # 3 blocks
    assert engine.reserve(req("b", [6] * 40, greedy(1))) is None
    assert engine.stats().num_used_blocks == 3
    engine.abort("a")
    assert_idle(engine)


def test_commit_of_a_final_first_token_finishes_at_once(engine: LLMEngine) -> None:
    stamp(engine, engine.reserve(req("one", [5, 6, 7], SamplingParams(max_tokens=1, temperature=0))))
    out = engine.commit("one", first_token_id=11)
    # the caller has the first token: the final output only ends the request (a stream must not show it twice)
    assert out is not None and out.finish_reason is FinishReason.LENGTH and out.new_token_ids == []
    assert_idle(engine)


def test_stop_tokens_min_tokens_and_max_tokens(llama: Path) -> None:
    engine = make_engine(llama)
    prompt = random_prompts([12], 500, seed=3)[0]
    free = run_staggered(engine, [(0, req("free", prompt, greedy(12)))])["free"]
    stop_at = free[4]
    first_stop = free.index(stop_at)
    stopped = run_staggered(engine, [(0, req("s", prompt, greedy(12, stop_token_ids=(stop_at,))))])["s"]
    assert stopped == free[: first_stop + 1]
    min_params = greedy(12, stop_token_ids=(stop_at,), min_tokens=first_stop + 2)
    late = run_staggered(engine, [(0, req("m", prompt, min_params))])["m"]
    assert stop_at not in late[: first_stop + 2]
    # EOS made the argmax everywhere (a logit bias): only min_tokens' mask keeps it out for 5 tokens, then it ends
    # the request (the greedy output without the bias holds no EOS, so an unmasked one passed here before)
    eos = engine.eos_token_ids[0]
    eos_params = SamplingParams(max_tokens=12, temperature=0, min_tokens=5, logit_bias=((eos, 100.0),))
    assert run_staggered(engine, [(0, req("e", prompt, eos_params))])["e"] == [*free[:5], eos]
    assert_idle(engine)


def test_eos_stops_unless_ignored(llama: Path) -> None:
    engine = make_engine(llama)
    eos = engine.eos_token_ids[0]
    # An EOS first token (committed from "outside", as a prefill replica would) ends the request unless ignored.
    stamp(engine, engine.reserve(req("x", [5, 6, 7], greedy(5, ignore_eos=False))))
    out = engine.commit("x", first_token_id=eos)
    assert out is not None and out.finish_reason is FinishReason.STOP
    stamp(engine, engine.reserve(req("y", [5, 6, 7], greedy(5, ignore_eos=True))))
    assert engine.commit("y", first_token_id=eos) is None
    outputs = [out for _ in range(10) for out in engine.step()]
    assert sum(len(o.new_token_ids) for o in outputs) == 4 and outputs[-1].finish_reason is FinishReason.LENGTH
    assert_idle(engine)


def test_the_tokenizers_eos_stops_too(llama: Path, tmp_path: Path) -> None:
    """As vLLM: a checkpoint whose tokenizer ends turns with an EOS its configs lack (a chat fine-tune of a base
    model) stops there too; it ran to max_tokens."""
    model = tmp_path / "model"
    shutil.copytree(llama, model)
    settings = json.loads((model / "tokenizer_config.json").read_text())
    configs_eos = json.loads((model / "config.json").read_text())["eos_token_id"]
    settings["eos_token"] = "<|endoftext|>"  # another special token (tiny_models.UNK)
    (model / "tokenizer_config.json").write_text(json.dumps(settings))
    engine = make_engine(model)
    turn_end = engine.eos_token_ids[-1]
    assert engine.eos_token_ids == (configs_eos, turn_end) and turn_end != configs_eos
    for eos in engine.eos_token_ids:
        stamp(engine, engine.reserve(req(f"x{eos}", [5, 6, 7], greedy(5, ignore_eos=False))))
        out = engine.commit(f"x{eos}", first_token_id=eos)
        assert out is not None and out.finish_reason is FinishReason.STOP
    assert make_engine(llama).eos_token_ids == (configs_eos,)  # the tokenizer's is the configs' own
    assert_idle(engine)
    # An EOS added to the tokenizer without resizing the embeddings is no id the model has: not used (its mask raised
    # IndexError for the whole batch)
    tokenizer = json.loads((model / "tokenizer.json").read_text())
    vocab_size = json.loads((model / "config.json").read_text())["vocab_size"]
    tokenizer["added_tokens"].append({**tokenizer["added_tokens"][0], "id": vocab_size, "content": "<|end|>"})
    (model / "tokenizer.json").write_text(json.dumps(tokenizer))
    (model / "tokenizer_config.json").write_text(json.dumps(settings | {"eos_token": "<|end|>"}))
    assert make_engine(model).eos_token_ids == (configs_eos,)


def test_seeded_sampling_is_reproducible_across_batches_and_split(llama: Path) -> None:
    prompt = random_prompts([30], 500, seed=5)[0]
    others = random_prompts([10, 50, 3], 500, seed=6)
    params = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, top_k=50, seed=1234, ignore_eos=True)
    alone = run_staggered(make_engine(llama), [(0, req("s", prompt, params))])["s"]
    engine = make_engine(llama, budget=16)
    crowd = [
        (0, req(f"o{i}", p, SamplingParams(max_tokens=16, temperature=1.0, ignore_eos=True)))
        for i, p in enumerate(others)
    ]
    batched = run_staggered(engine, [*crowd, (3, req("s", prompt, params))])["s"]
    split, _ = prefill_then_decode(make_engine(llama), make_engine(llama), req("s", prompt, params))
    assert alone == batched == split
    other_seed = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, top_k=50, seed=99, ignore_eos=True)
    assert run_staggered(make_engine(llama), [(0, req("t", prompt, other_seed))])["t"] != alone


def test_top_k_1_and_tiny_top_p_are_greedy(llama: Path) -> None:
    prompt = random_prompts([20], 500, seed=9)[0]
    engine = make_engine(llama)
    want = run_staggered(engine, [(0, req("g", prompt, greedy(10)))])["g"]
    k1 = SamplingParams(max_tokens=10, temperature=1.5, top_k=1, ignore_eos=True)
    p0 = SamplingParams(max_tokens=10, temperature=1.5, top_p=1e-6, ignore_eos=True)
    assert run_staggered(engine, [(0, req("k", prompt, k1)), (0, req("p", prompt, p0))]) == {"k": want, "p": want}


@pytest.mark.parametrize("seed", range(12))
def test_logprobs_and_prompt_logprobs_match_transformers(llama: Path, seed: int) -> None:
    """Sampled tokens' logprobs, their top-k alternatives and every prompt token's logprob (with its top-k) equal
    transformers' log-softmax to 1e-4: requests of random lengths (2 tokens up) prefilled in 16-token chunks
    beside each other, some repeating a cached prompt (prompt logprobs must not skip the cached part)."""
    rng = random.Random(seed)
    engine = make_engine(llama, budget=16)
    prompts = random_prompts([rng.randint(2, 40) for _ in range(4)], 500, seed=seed)
    prompts.append(prompts[0][:])  # the same prompt again: its blocks are cached by now
    params = [
        greedy(rng.randint(1, 6), logprobs=True, top_logprobs=rng.randint(0, 20),
               prompt_logprobs=rng.choice([None, 0, 1, 5, 20]))
        for _ in prompts
    ]  # fmt: skip
    results: dict[str, tuple[list[int], list[TokenLogprob], list[TokenLogprob] | None]] = {}
    for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
        engine.add_request(req(f"r{i}", prompt, p))
        if i == 3:  # the repeat arrives after the first finished: a prefix-cache hit for anyone who would use it
            while engine.has_unfinished():
                _collect(engine.step(), results)
    while engine.has_unfinished():
        _collect(engine.step(), results)
    model = load_reference_model(llama)
    for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
        tokens, logprobs, prompt_logprobs = results[f"r{i}"]
        with torch.inference_mode():
            ref = model(torch.tensor([prompt + tokens])).logits[0].log_softmax(-1)
        sequence = prompt + tokens
        _check(ref, sequence, range(len(prompt) - 1, len(sequence) - 1), logprobs, p.top_logprobs)
        if p.prompt_logprobs is None:
            assert prompt_logprobs is None
        else:
            assert prompt_logprobs is not None and len(prompt_logprobs) == len(prompt) - 1
            _check(ref, sequence, range(0, len(prompt) - 1), prompt_logprobs, p.prompt_logprobs)


def _collect(outputs: list[RequestOutput], results: dict[str, Any]) -> None:
    for out in outputs:
        tokens, logprobs, prompt_logprobs = results.setdefault(out.request_id, ([], [], None))
        tokens += out.new_token_ids
        logprobs += out.new_logprobs or []
        if out.prompt_logprobs is not None:
            assert prompt_logprobs is None, "prompt logprobs come once"
            results[out.request_id] = (tokens, logprobs, out.prompt_logprobs)


def _check(ref: torch.Tensor, sequence: list[int], rows: range, got: list[TokenLogprob], k: int) -> None:
    """Row r of `ref` (log-softmax) predicts sequence[r + 1]: its logprob, and the k most likely tokens (to 5e-4:
    this random model's logits are large, and chunked prefill sums them in another order; SmolLM2: 1e-4)."""
    assert len(got) == len(rows)
    for row, (logprob, top) in zip(rows, got, strict=True):
        assert logprob == pytest.approx(float(ref[row, sequence[row + 1]]), abs=5e-4, rel=5e-5)
        assert len(top) == k
        want = ref[row].topk(k).values.tolist() if k else []
        assert [v for _, v in top] == pytest.approx(want, abs=5e-4, rel=5e-5)
        named = [float(ref[row, t]) for t, _ in top]  # each named token has that logprob
        assert [v for _, v in top] == pytest.approx(named, abs=5e-4, rel=5e-5)


def test_kv_events_follow_the_prompt_hash_chain(llama: Path) -> None:
    engine = make_engine(llama, num_blocks=8)
    prompt = random_prompts([40], 500, seed=12)[0]
    out = run_staggered(engine, [(0, req("a", prompt, greedy(9)))])["a"]
    batch = engine.kv_events_since(0, engine.pool.events.incarnation)
    stored = [h for e in batch.events if e.kind is KVEventKind.STORED for h in e.block_hashes]
    assert stored == hash_block_chain(prompt + out, 16)[:3]  # 49 tokens computed: 3 full blocks
    engine.add_request(req("b", random_prompts([120], 500, seed=13)[0], greedy(1)))  # needs every block
    run_staggered(engine, [])
    removed = [
        h
        for e in engine.kv_events_since(batch.latest_seq, batch.incarnation).events
        if e.kind is KVEventKind.REMOVED
        for h in e.block_hashes
    ]
    assert set(removed) == set(stored)


def test_salted_requests_do_not_share_blocks(engine: LLMEngine) -> None:
    prompt = random_prompts([40], 500, seed=14)[0]
    run_staggered(engine, [(0, EngineRequest("a", tuple(prompt), greedy(1), cache_salt="tenant-a"))])
    engine.add_request(EngineRequest("b", tuple(prompt), greedy(1), cache_salt="tenant-b"))
    engine.add_request(EngineRequest("c", tuple(prompt), greedy(1), cache_salt="tenant-a"))
    cached = {}
    while engine.has_unfinished():
        for out in engine.step():
            cached[out.request_id] = out.num_cached_tokens
    assert cached == {"b": 0, "c": 32}


def test_auto_dtype_follows_the_cpu() -> None:
    from pdserve.engine.weights import cpu_has_native_bf16

    want = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    assert resolve_dtype("auto", torch.device("cpu")) == want
    assert resolve_dtype("float16", torch.device("cpu")) == torch.float16
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("fp8", torch.device("cpu"))


def test_committed_reservations_past_max_num_seqs_wait_for_a_slot(llama: Path) -> None:
    """A decode replica commits every reservation whose KV arrived, even with max_num_seqs sequences running: the
    blocks are held already. A step must still run at most max_num_seqs of them (it sized its activations and the
    GPU memory plan for that many); the rest wait for a seat, and every request ends with exactly its tokens."""
    prefill = make_engine(llama)
    decode = LLMEngine(
        EngineConfig(
            ModelConfig(str(llama), dtype="float32"),
            CacheConfig(num_blocks=64),
            SchedulerConfig(max_num_batched_tokens=512, max_num_seqs=2),
        )
    )
    prompts = random_prompts([9, 1, 23, 5, 17], 500, seed=4)
    requests = [req(f"r{i}", p, greedy(6)) for i, p in enumerate(prompts)]
    expected = {r.request_id: prefill_then_decode(prefill, make_engine(llama), r)[0] for r in requests}
    tokens: dict[str, list[int]] = {}
    for r in requests:  # all five committed before the decode engine steps once
        reservation = decode.reserve(r)
        assert reservation is not None
        prefill.add_request(r, prefill_only=True)
        while (first := next((o for o in prefill.step() if o.request_id == r.request_id), None)) is None:
            pass
        assert first.kv_block_ids is not None
        copy_missing_blocks(prefill, first.kv_block_ids, decode, reservation)
        prefill.release(r.request_id)
        tokens[r.request_id] = list(first.new_token_ids)
        assert decode.commit(r.request_id, first.new_token_ids[0]) is None
    stats = decode.stats()
    assert (stats.num_running, stats.num_waiting) == (0, 5)  # waiting for a seat, holding their blocks
    batch_sizes = []
    while decode.has_unfinished():
        outputs = decode.step()
        batch_sizes.append(len(outputs))
        for out in outputs:
            tokens[out.request_id].extend(out.new_token_ids)
    assert max(batch_sizes) == 2
    assert tokens == expected
    assert_idle(decode)
