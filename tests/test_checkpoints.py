"""Checkpoints as users' hub repos have them, beyond the tiny test models' defaults (found in review): a float16
checkpoint is never rounded to bfloat16 by `dtype: auto` (transformers and vLLM run it in float16; its greedy tokens
differed at 8% of positions), GPU memory counts only the shards the loader reads (Mistral repos also ship the weights
as consolidated.safetensors: 14.5 GB less KV cache), Qwen's sliding window caps the context only where a layer
slides, dynamic NTK RoPE is served below max_position_embeddings (its table is the default one there), and a sharded
index naming a missing shard is refused before any tensor is read."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from oracle import assert_matches, greedy, load_reference_model, random_prompts, reference_greedy, run_staggered
from pdserve.engine import EngineRequest
from pdserve.engine.memory import checkpoint_elements
from test_engine_exact import make_engine
from tiny_models import build_tiny_variant


def _edit_config(path: Path, **fields: object) -> Path:
    cfg = json.loads((path / "config.json").read_text())
    for key, value in fields.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def _matches_transformers(path: Path, lengths: list[int], max_tokens: int = 16, **engine_kw: object) -> None:
    model = load_reference_model(path)
    prompts = random_prompts(lengths, model.config.vocab_size)
    engine = make_engine(path, **engine_kw)
    requests = [(i, EngineRequest(f"r{i}", tuple(p), greedy(max_tokens))) for i, p in enumerate(prompts)]
    got = run_staggered(engine, requests)
    for i, p in enumerate(prompts):
        assert_matches(reference_greedy(model, p, max_tokens), got[f"r{i}"], f"{len(p)} prompt tokens")


def test_auto_dtype_runs_a_float16_checkpoint_in_float16_on_cuda(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                  ) -> None:  # fmt: skip
    """On CUDA, as transformers and vLLM; on CPU the speed rule holds for every checkpoint (bfloat16 where native,
    else float32), as vLLM-CPU's."""
    from pdserve.engine import engine as engine_module
    from pdserve.engine.weights import checkpoint_dtype, load_hf_config, resolve_dtype

    path = build_tiny_variant(tmp_path / "fp16", "llama", 4242)
    state = load_file(path / "model.safetensors")
    save_file({k: v.half() for k, v in state.items()}, path / "model.safetensors", metadata={"format": "pt"})
    _edit_config(path, dtype="float16", torch_dtype=None)
    stored = checkpoint_dtype(load_hf_config(path))
    assert stored == torch.float16
    assert resolve_dtype("auto", torch.device("cpu"), stored) == resolve_dtype("auto", torch.device("cpu"))
    assert resolve_dtype("auto", torch.device("cuda"), stored) == torch.float16
    assert resolve_dtype("auto", torch.device("cuda"), torch.float32) == torch.bfloat16
    # The engine hands the checkpoint's dtype over
    seen: list[tuple[str, torch.dtype | None]] = []

    def resolving(name: str, device: torch.device, stored: torch.dtype | None = None) -> torch.dtype:
        seen.append((name, stored))
        return resolve_dtype(name, device, stored)

    monkeypatch.setattr(engine_module, "resolve_dtype", resolving)
    make_engine(path)
    assert seen == [("float32", torch.float16)]


def test_memory_counts_only_the_shards_the_engine_loads(tmp_path: Path) -> None:
    path = build_tiny_variant(tmp_path / "m", "llama", 4242)
    single = checkpoint_elements(str(path))
    shutil.copy(path / "model.safetensors", path / "consolidated.safetensors")  # as Mistral's repos ship
    assert checkpoint_elements(str(path)) == single


def test_sliding_window_caps_the_context_only_where_a_layer_slides(tmp_path: Path) -> None:
    path = _edit_config(
        build_tiny_variant(tmp_path / "q", "qwen2", 4242),
        use_sliding_window=True,
        sliding_window=48,
        max_window_layers=2,
        layer_types=None,
    )  # no layer slides
    assert make_engine(path).max_model_len > 48
    _matches_transformers(path, [40, 100])
    _edit_config(path, max_window_layers=1)  # layer 1 slides
    assert make_engine(path).max_model_len == 48


def test_dynamic_rope_is_served_below_max_position_embeddings(tmp_path: Path) -> None:
    path = _edit_config(
        build_tiny_variant(tmp_path / "d", "llama", 4242),
        rope_parameters=None,
        rope_theta=10000.0,
        rope_scaling={"type": "dynamic", "factor": 2.0},
    )
    _matches_transformers(path, [1, 300, 900])


def test_a_missing_shard_is_refused_before_loading(tmp_path: Path) -> None:
    path = build_tiny_variant(tmp_path / "s", "llama", 4242)
    state = load_file(path / "model.safetensors")
    (path / "model.safetensors").unlink()
    names = sorted(state)
    save_file({n: state[n] for n in names[:5]}, path / "a.safetensors", metadata={"format": "pt"})
    weight_map = {n: "a.safetensors" if i < 5 else "b.safetensors" for i, n in enumerate(names)}
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ValueError, match=r"lacks: 'b\.safetensors'"):
        make_engine(path)
