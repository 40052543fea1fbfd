"""How much GPU memory one engine replica's KV cache may take, vLLM's rule: the replica may use
`total × gpu_memory_utilization` of its GPU (never more than is free); the KV cache gets what the weights, the
activations of one step and the non-tensor overhead leave of it.

vLLM measures the activations with a profiling forward; here they are estimated from the checkpoint's shapes, before
the weights load (the replica sizes its cache when it builds the engine's config).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


@dataclass(frozen=True)
class GPUMemoryPlan:
    total_bytes: int  # the GPU's memory
    free_bytes: int  # free when the replica sized its cache (before loading weights)
    budget_bytes: int  # min(total × utilization, free): what this replica may use
    weight_bytes: int  # the checkpoint's tensors in the serving dtype
    activation_bytes: int  # one step of max_num_batched_tokens tokens, estimated
    overhead_bytes: int  # outside torch's tensors: CUDA context, cuBLAS workspaces, NCCL communicators
    kv_cache_bytes: int  # what is left: the KV cache


def plan_gpu_memory(
    model_path: str,
    dtype: str,
    gpu_memory_utilization: float,
    max_num_batched_tokens: int,
    max_num_seqs: int,
    max_model_len: int | None,
    overhead_bytes: int,
    free_and_total_bytes: tuple[int, int] | None = None,
) -> GPUMemoryPlan:
    """Size the KV cache of a replica on the current CUDA device (or on `free_and_total_bytes`, for tests).
    Raises ValueError when nothing is left for it, naming every term."""
    if free_and_total_bytes is None:
        import torch

        free_and_total_bytes = torch.cuda.mem_get_info()
    free, total = free_and_total_bytes
    config = json.loads(Path(model_path, "config.json").read_text())
    dtype_bytes = 4 if dtype == "float32" else 2  # auto is bfloat16 on CUDA
    budget = min(int(total * gpu_memory_utilization), free)
    weights = checkpoint_elements(model_path) * dtype_bytes
    activations = activation_bytes(config, dtype_bytes, max_num_batched_tokens, max_num_seqs, max_model_len)
    plan = GPUMemoryPlan(total, free, budget, weights, activations, overhead_bytes, 0)
    kv_bytes = budget - weights - activations - overhead_bytes
    if kv_bytes < 1 << 20:
        raise ValueError(
            f"no GPU memory left for the KV cache: {plan}; raise gpu_memory_utilization, lower max_num_batched_tokens "
            "or set kv_cache_memory_bytes"
        )
    return GPUMemoryPlan(total, free, budget, weights, activations, overhead_bytes, kv_bytes)


def checkpoint_files(model_path: str) -> list[Path]:
    """The safetensors files the engine loads (weights.CheckpointReader): the index's shards, else model.safetensors.
    Not every *.safetensors beside them: Mistral's repos also ship the same weights as consolidated.safetensors."""
    root = Path(model_path)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        return [root / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    if (root / "model.safetensors").is_file():
        return [root / "model.safetensors"]
    return sorted(root.glob("*.safetensors"))


def checkpoint_elements(model_path: str) -> int:
    """Elements of every tensor in the checkpoint's safetensors files, read from their headers only."""
    total = 0
    for shard in checkpoint_files(model_path):
        with open(shard, "rb") as fh:
            (header_len,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(header_len))
        for name, entry in header.items():
            if name != "__metadata__":
                start, end = entry["data_offsets"]
                total += (end - start) // _DTYPE_BYTES.get(entry["dtype"], 1)
    return total


def activation_bytes(
    config: dict[str, object], dtype_bytes: int, num_tokens: int, num_seqs: int, max_model_len: int | None
) -> int:
    """Peak transient memory of one step over `num_tokens` tokens (decoder layers run one at a time): the hidden
    states and their copies, fused QKV, fused gate/up and its product, one prefill chunk's gathered context K/V
    (attention itself runs in SDPA's fused kernels), fp32 logits and the sampler's copies for `num_seqs` rows, and
    the RoPE tables."""
    hidden, inter, vocab = _int(config, "hidden_size"), _int(config, "intermediate_size"), _int(config, "vocab_size")
    heads = _int(config, "num_attention_heads")
    kv_heads = _int(config, "num_key_value_heads", heads)
    head_dim = _int(config, "head_dim", hidden // heads)
    positions = _int(config, "max_position_embeddings")
    context = min(max_model_len or positions, positions)
    per_token = 6 * hidden + (heads + 2 * kv_heads) * head_dim + 3 * inter
    gathered_kv = 2 * context * kv_heads * head_dim
    logits = 3 * num_seqs * vocab * 4
    rope = 2 * positions * head_dim
    return (num_tokens * per_token + gathered_kv + rope) * dtype_bytes + logits


def _int(config: dict[str, object], key: str, default: int | None = None) -> int:
    value = config.get(key)
    value = default if value is None else value
    if not isinstance(value, int):
        raise ValueError(f"config.json has no integer {key!r}")
    return value
