"""Reading a local HF checkpoint: config, safetensors shards, generation defaults, dtype choice."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, GenerationConfig, PretrainedConfig

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 instructions (avx512_bf16 or AMX); elsewhere bf16 runs several times slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """Turn a config dtype name into a torch dtype; "auto" picks bfloat16 where it is native, else float32."""
    if name == "auto":
        native = device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())
        return torch.bfloat16 if native else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]


def load_hf_config(path: str | Path) -> PretrainedConfig:
    """The checkpoint's transformers config; ValueError if the directory is not a checkpoint."""
    if not (Path(path) / "config.json").is_file():
        raise ValueError(f"{path} is not a model directory (no config.json)")
    return AutoConfig.from_pretrained(path, local_files_only=True)


def eos_token_ids(path: str | Path, config: PretrainedConfig) -> tuple[int, ...]:
    """EOS ids from generation_config.json (which may list several), else from config.json."""
    eos = None
    if (Path(path) / "generation_config.json").is_file():
        eos = GenerationConfig.from_pretrained(path, local_files_only=True).eos_token_id
    if eos is None:
        eos = getattr(config, "eos_token_id", None)
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list | tuple) else (int(eos),)


class CheckpointReader:
    """Tensors of a (possibly sharded) safetensors checkpoint, converted to one dtype and device on read."""

    def __init__(self, path: str | Path, dtype: torch.dtype, device: torch.device) -> None:
        self.dtype, self.device = dtype, device
        root = Path(path)
        index = root / "model.safetensors.index.json"
        if index.is_file():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            self._file_of = {name: root / file for name, file in weight_map.items()}
        elif (root / "model.safetensors").is_file():
            with safe_open(root / "model.safetensors", framework="pt") as f:
                self._file_of = {name: root / "model.safetensors" for name in f.keys()}  # noqa: SIM118
        else:
            raise ValueError(f"{root} has no model.safetensors (or index); only safetensors checkpoints load")

    def has(self, name: str) -> bool:
        return name in self._file_of

    def get(self, name: str) -> torch.Tensor:
        if name not in self._file_of:
            raise ValueError(f"checkpoint lacks tensor {name!r}")
        with safe_open(self._file_of[name], framework="pt") as f:
            return f.get_tensor(name).to(device=self.device, dtype=self.dtype).contiguous()
