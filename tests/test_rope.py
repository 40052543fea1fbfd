"""The engine's RoPE tables equal transformers' Llama rotary module's bit for bit, for every rope type it serves."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from pdserve.engine.model import _rope_tables

MAX_POSITIONS = 4096
ROPE_PARAMETERS: dict[str, dict[str, Any]] = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "default-theta-1e6": {"rope_type": "default", "rope_theta": 1_000_000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "llama3": {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 1024,
    },
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 1024},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(ROPE_PARAMETERS))
@pytest.mark.parametrize("head_dim", [32, 64])
def test_rope_tables_equal_transformers(name: str, dtype: torch.dtype, head_dim: int) -> None:
    config = LlamaConfig(
        hidden_size=4 * head_dim, num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim,
        max_position_embeddings=MAX_POSITIONS, rope_parameters=dict(ROPE_PARAMETERS[name]),
    )  # fmt: skip
    positions = torch.arange(MAX_POSITIONS)[None]
    want_cos, want_sin = LlamaRotaryEmbedding(config)(torch.empty(0, dtype=dtype), positions)
    cos, sin = _rope_tables(config, MAX_POSITIONS, dtype, torch.device("cpu"))
    assert cos.dtype == sin.dtype == dtype and cos.shape == (MAX_POSITIONS, head_dim)
    assert torch.equal(cos, want_cos[0]) and torch.equal(sin, want_sin[0])


def test_the_engine_does_not_import_transformers_modeling_code() -> None:
    """Importing it costs every replica start ~3 s of CPU (torch._dynamo, distributed tensors): the engine never
    needs it for the common rope types."""
    heavy = "m.startswith('torch._dynamo') or m.startswith('transformers.models.') and '.modeling_' in m"
    code = f"import sys, pdserve.serve.replicas; print(sorted(m for m in sys.modules if {heavy}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
