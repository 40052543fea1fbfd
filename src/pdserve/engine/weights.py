"""Reading a local HF checkpoint: config, safetensors shards, generation defaults, dtype choice."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, GenerationConfig, PretrainedConfig

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 instructions (avx512_bf16 or AMX); elsewhere bf16 runs several times slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def checkpoint_dtype(config: PretrainedConfig) -> torch.dtype | None:
    """The dtype config.json says the weights are stored in (`dtype`, formerly `torch_dtype`), if it says one."""
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(stored, torch.dtype):
        return stored
    return _DTYPES.get(str(stored).removeprefix("torch.")) if stored else None


def resolve_dtype(name: str, device: torch.device, stored: torch.dtype | None = None) -> torch.dtype:
    """Turn a config dtype name into a torch dtype. "auto": bfloat16 where it is native, else float32; on CUDA a
    float16 checkpoint runs in float16, as transformers and vLLM run it (rounded to bfloat16, 3 fewer mantissa bits,
    its greedy tokens differed at 8% of positions). On CPU the speed rule holds for every checkpoint, as vLLM-CPU's
    (float32 would double the weights' memory and lose the native bf16 kernels); `dtype` float32 is exact."""
    if name == "auto":
        if stored == torch.float16 and device.type == "cuda":
            return torch.float16
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
    """EOS ids from generation_config.json (which may list several), else from config.json, and the tokenizer's EOS,
    as vLLM stops on: a chat fine-tune may end its turns with a tokenizer EOS its base model's configs lack (it ran
    to max_tokens, the next turn's text in its output)."""
    eos = None
    if (Path(path) / "generation_config.json").is_file():
        eos = GenerationConfig.from_pretrained(path, local_files_only=True).eos_token_id
    if eos is None:
        eos = getattr(config, "eos_token_id", None)
    ids = () if eos is None else tuple(eos) if isinstance(eos, list | tuple) else (int(eos),)
    tokenizers = tokenizer_eos_id(path)
    if tokenizers is None or tokenizers in ids:
        return ids
    vocab_size = getattr(config, "vocab_size", None)
    if isinstance(vocab_size, int) and not 0 <= tokenizers < vocab_size:  # added without resizing the embeddings
        logger.warning("the tokenizer's EOS id %d is outside the model's %d-token vocabulary: not used", tokenizers,
                       vocab_size)  # fmt: skip
        return ids
    return (*ids, tokenizers)


def tokenizer_eos_id(path: str | Path) -> int | None:
    """The id of tokenizer_config.json's `eos_token`, found among the tokenizer's added tokens (or its vocabulary),
    read from the files: the engine loads no tokenizer. None where a file or the token is missing."""
    try:
        eos = json.loads((Path(path) / "tokenizer_config.json").read_text()).get("eos_token")
        if isinstance(eos, dict):  # an AddedToken's fields
            eos = eos.get("content")
        if not isinstance(eos, str):
            return None
        tokenizer = json.loads((Path(path) / "tokenizer.json").read_text())
    except (OSError, ValueError, AttributeError):
        return None
    for token in tokenizer.get("added_tokens") or []:
        if isinstance(token, dict) and token.get("content") == eos and isinstance(token.get("id"), int):
            return int(token["id"])
    vocab = (tokenizer.get("model") or {}).get("vocab")
    found = vocab.get(eos) if isinstance(vocab, dict) else None
    return found if isinstance(found, int) else None


# Storage dtypes a weight may have on disk: anything else (int8, uint8, float8, ...) is quantized or packed data
# that a plain cast to the compute dtype would silently corrupt.
_FLOAT_STORAGE = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
_MAX_LISTED = 5  # names listed in an error message


def _listing(names: Iterable[str]) -> str:
    names = sorted(names)
    shown = ", ".join(repr(n) for n in names[:_MAX_LISTED])
    return shown + (f" and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else "")


def check_quantization(config: PretrainedConfig) -> None:
    """Raise ValueError for a quantized checkpoint: its tensors are not plain weights of the declared shapes."""
    for key in ("quantization_config", "compression_config"):
        quant = getattr(config, key, None)
        if quant:
            method = quant.get("quant_method", "?") if isinstance(quant, dict) else getattr(quant, "quant_method", "?")
            raise ValueError(
                f"quantized checkpoints are not supported ({key} with quant_method {str(method)!r}); "
                "use an unquantized float32/float16/bfloat16 checkpoint"
            )


def _ignored(name: str) -> bool:
    """Tensors some checkpoints carry that hold nothing the config does not already say."""
    return name.endswith("rotary_emb.inv_freq")  # old Llama exports: recomputed from the rope config


class CheckpointReader:
    """Tensors of a (possibly sharded) safetensors checkpoint, converted to one dtype and device on read.

    Strict: `check_names` refuses a checkpoint whose tensors are not exactly the ones the model reads (nothing is
    silently dropped or left uninitialized), and `get` refuses non-float storage and unexpected shapes.
    """

    def __init__(self, path: str | Path, dtype: torch.dtype, device: torch.device) -> None:
        self.dtype, self.device = dtype, device
        self.root = root = Path(path)
        index = root / "model.safetensors.index.json"
        if index.is_file():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            self._file_of = {name: root / file for name, file in weight_map.items()}
            # Every shard the index names is there and holds what it maps to it: checked on the headers, before any
            # tensor is read (else a missing shard surfaces half-way through loading as a FileNotFoundError).
            absent = sorted({file for file in weight_map.values() if not (root / file).is_file()})
            if absent:
                raise ValueError(f"checkpoint {root}: its index names shard(s) the directory lacks: {_listing(absent)}")
            for file in set(weight_map.values()):
                with safe_open(root / file, framework="pt") as f:
                    lacking = {n for n, shard in weight_map.items() if shard == file} - set(f.keys())
                if lacking:
                    raise ValueError(
                        f"checkpoint {root}: shard {file} lacks tensor(s) its index maps to it: {_listing(lacking)}"
                    )
        elif (root / "model.safetensors").is_file():
            with safe_open(root / "model.safetensors", framework="pt") as f:
                self._file_of = {name: root / "model.safetensors" for name in f.keys()}  # noqa: SIM118
        else:
            raise ValueError(f"{root} has no model.safetensors (or index); only safetensors checkpoints load")

    def has(self, name: str) -> bool:
        return name in self._file_of

    def check_names(self, required: Iterable[str], optional: Iterable[str] = ()) -> None:
        """Raise ValueError unless the checkpoint holds every `required` tensor and nothing beyond `required`,
        `optional` and tensors known to be redundant (rotary inv_freq buffers)."""
        required = set(required)
        missing = required - self._file_of.keys()
        unexpected = {n for n in self._file_of.keys() - required - set(optional) if not _ignored(n)}
        if not missing and not unexpected:
            return
        problems = []
        if missing:
            problems.append(f"missing {len(missing)} tensor(s) the config requires: {_listing(missing)}")
        if unexpected:
            problems.append(
                f"{len(unexpected)} tensor(s) this model does not use, which pdserve will not silently drop: "
                f"{_listing(unexpected)}"
            )
        raise ValueError(
            f"checkpoint {self.root} does not match its config.json: {'; '.join(problems)} "
            "(quantized, adapter or unsupported-architecture checkpoints are refused)"
        )

    def get(self, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """The tensor `name` in this reader's dtype and device; ValueError if it is absent, not stored as a float,
        or (when `shape` is given) of another shape."""
        if name not in self._file_of:
            raise ValueError(f"checkpoint {self.root} lacks tensor {name!r}")
        with safe_open(self._file_of[name], framework="pt") as f:
            stored = f.get_slice(name)
            storage, stored_shape = stored.get_dtype(), tuple(stored.get_shape())
            if storage not in _FLOAT_STORAGE:
                raise ValueError(
                    f"tensor {name!r} is stored as {storage}; only {', '.join(_FLOAT_STORAGE.values())} weights load "
                    "(quantized checkpoints are not supported)"
                )
            if shape is not None and stored_shape != shape:
                raise ValueError(f"tensor {name!r} has shape {list(stored_shape)}; the config implies {list(shape)}")
            return f.get_tensor(name).to(device=self.device, dtype=self.dtype).contiguous()
