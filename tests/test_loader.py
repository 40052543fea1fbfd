"""The checkpoint loader reads every tensor the config declares (attention and MLP biases included) and refuses,
with a clear error, any checkpoint it cannot compute exactly: quantized, missing or left-over tensors."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from oracle import assert_matches, greedy, load_reference_model, random_prompts, reference_greedy, run_staggered
from pdserve.engine import EngineRequest
from test_engine_exact import make_engine
from tiny_models import build_tiny_variant

MAX_TOKENS = 16
LENGTHS = [1, 40, 9]
BIASED = {  # family -> config overrides that give its projections biases transformers applies
    "llama": {"attention_bias": True, "mlp_bias": True},  # q/k/v/o and gate/up/down
    "qwen3": {"attention_bias": True},  # q/k/v/o
}
SEED = 1000  # not the seeds tiny_models' standard families use


@pytest.fixture(scope="module")
def biased_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("biased")
    return {
        family: build_tiny_variant(root / family, family, SEED + i, **overrides)
        for i, (family, overrides) in enumerate(BIASED.items())
    }


def engine_tokens(path: Path, prompts: list[list[int]]) -> dict[str, list[int]]:
    engine = make_engine(path)
    arrivals = [(2 * i, EngineRequest(f"r{i}", tuple(p), greedy(MAX_TOKENS))) for i, p in enumerate(prompts)]
    got = run_staggered(engine, arrivals)
    assert engine.stats().num_used_blocks == 0
    return got


def edit_checkpoint(
    src: Path, dst: Path, tensors: Callable[[dict[str, torch.Tensor]], None] | None = None, **config: Any
) -> Path:
    """Copy the checkpoint `src` to `dst`, edit its tensors in place with `tensors`, and set `config` fields."""
    shutil.copytree(src, dst)
    if tensors is not None:
        state = load_file(dst / "model.safetensors")
        tensors(state)
        save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    if config:
        cfg = json.loads((dst / "config.json").read_text())
        cfg.update(config)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("family", list(BIASED))
def test_biased_checkpoint_matches_transformers(family: str, biased_models: dict[str, Path]) -> None:
    path = biased_models[family]
    names = set(load_file(path / "model.safetensors"))
    biased = ["self_attn.q_proj", "self_attn.o_proj"]
    if family == "llama":
        biased += ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    for proj in biased:
        assert f"model.layers.1.{proj}.bias" in names
    model = load_reference_model(path)
    prompts = random_prompts(LENGTHS, model.config.vocab_size, seed=3)
    refs = [reference_greedy(model, p, MAX_TOKENS) for p in prompts]

    got = engine_tokens(path, prompts)
    for i, ref in enumerate(refs):
        assert_matches(ref, got[f"r{i}"], f"{family} request {i} ({LENGTHS[i]} prompt tokens)")

    # The comparison would catch a dropped bias: without the o_proj (and MLP) biases the greedy tokens change.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") and ("o_proj" in name or "mlp" in name):
                param.zero_()
    unbiased = [reference_greedy(model, p, MAX_TOKENS).token_ids for p in prompts]
    assert unbiased != [ref.token_ids for ref in refs]


def test_tied_checkpoint_with_its_own_lm_head_matches_transformers(
    biased_models: dict[str, Path], tmp_path: Path
) -> None:
    """tie_word_embeddings with a stored lm_head.weight that differs: transformers unties and uses it; so do we."""

    def add_lm_head(state: dict[str, torch.Tensor]) -> None:
        gen = torch.Generator().manual_seed(5)
        state["lm_head.weight"] = torch.randn(state["model.embed_tokens.weight"].shape, generator=gen) * 0.2

    path = edit_checkpoint(biased_models["llama"], tmp_path / "tied", add_lm_head, tie_word_embeddings=True)
    model = load_reference_model(path)
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    prompts = random_prompts([1, 40], model.config.vocab_size, seed=4)
    got = engine_tokens(path, prompts)
    for i, p in enumerate(prompts):
        assert_matches(reference_greedy(model, p, MAX_TOKENS), got[f"r{i}"], f"tied request {i}")


def test_rotary_inv_freq_buffers_are_ignored(biased_models: dict[str, Path], tmp_path: Path) -> None:
    def add_inv_freq(state: dict[str, torch.Tensor]) -> None:
        for i in range(2):
            state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.ones(16)

    make_engine(edit_checkpoint(biased_models["llama"], tmp_path / "inv_freq", add_inv_freq))


def refused(path: Path, match: str) -> str:
    with pytest.raises(ValueError, match=match) as err:
        make_engine(path)
    return str(err.value)


def test_refuses_unknown_tensor(biased_models: dict[str, Path], tmp_path: Path) -> None:
    def add(state: dict[str, torch.Tensor]) -> None:
        state["model.layers.1.mlp.extra_proj.weight"] = torch.zeros(4, 128)

    path = edit_checkpoint(biased_models["llama"], tmp_path / "extra", add)
    message = refused(path, "does not use")
    assert "'model.layers.1.mlp.extra_proj.weight'" in message


def test_refuses_biases_the_config_does_not_declare(biased_models: dict[str, Path], tmp_path: Path) -> None:
    """The bug report: a checkpoint with o_proj/MLP biases whose config says none (transformers would drop them)."""
    path = edit_checkpoint(biased_models["llama"], tmp_path / "undeclared", attention_bias=False, mlp_bias=False)
    message = refused(path, r"14 tensor\(s\) this model does not use")  # 7 biases in each of 2 layers
    assert "'model.layers.0.mlp.down_proj.bias'" in message and "and 9 more" in message


def test_refuses_missing_tensor(biased_models: dict[str, Path], tmp_path: Path) -> None:
    def drop(state: dict[str, torch.Tensor]) -> None:
        del state["model.layers.0.self_attn.o_proj.bias"]

    path = edit_checkpoint(biased_models["llama"], tmp_path / "missing", drop)
    message = refused(path, "missing 1 tensor")
    assert "'model.layers.0.self_attn.o_proj.bias'" in message


def test_refuses_quantization_config(biased_models: dict[str, Path], tmp_path: Path) -> None:
    quant = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    path = edit_checkpoint(biased_models["llama"], tmp_path / "quantized", quantization_config=quant)
    refused(path, "quantized checkpoints are not supported .quantization_config with quant_method 'gptq'")


def test_refuses_integer_weights(biased_models: dict[str, Path], tmp_path: Path) -> None:
    def to_int8(state: dict[str, torch.Tensor]) -> None:
        name = "model.layers.0.mlp.up_proj.weight"
        state[name] = state[name].mul(100).to(torch.int8)

    path = edit_checkpoint(biased_models["llama"], tmp_path / "int8", to_int8)
    refused(path, "'model.layers.0.mlp.up_proj.weight' is stored as I8")


def test_refuses_wrong_shape(biased_models: dict[str, Path], tmp_path: Path) -> None:
    def shrink(state: dict[str, torch.Tensor]) -> None:
        state["model.layers.1.mlp.gate_proj.bias"] = state["model.layers.1.mlp.gate_proj.bias"][:200].clone()

    path = edit_checkpoint(biased_models["llama"], tmp_path / "shape", shrink)
    refused(path, r"'model.layers.1.mlp.gate_proj.bias' has shape \[200\]; the config implies \[256\]")


def test_sharded_checkpoint_is_checked_across_shards(biased_models: dict[str, Path], tmp_path: Path) -> None:
    src = biased_models["llama"]
    sharded = tmp_path / "sharded"
    load_reference_model(src).save_pretrained(sharded, max_shard_size="200KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, sharded / name)
    index_path = sharded / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    assert len(set(index["weight_map"].values())) > 1
    prompts = random_prompts([1, 40], 500, seed=6)
    assert engine_tokens(sharded, prompts) == engine_tokens(src, prompts)

    extra = dict(index["weight_map"])
    extra["model.layers.0.self_attn.o_proj.lora_A.weight"] = next(iter(extra.values()))
    index_path.write_text(json.dumps({**index, "weight_map": extra}))
    refused(sharded, r"'model\.layers\.0\.self_attn\.o_proj\.lora_A\.weight'")
