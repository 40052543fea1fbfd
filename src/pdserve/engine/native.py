"""Native CPU kernels, compiled on this machine on first use and cached.

Attention straight over the paged KV cache (`csrc/paged_attention.cpp`), no gather:
- decode: the SDPA route gathers every decode's blocks into a padded copy, then runs a kernel tiled for long queries
  over it; at SmolLM2's 16 decodes x 300 tokens that is 425 us per layer in bf16, the native kernel 151 us
  (`benchmarks/decode_attention.py`);
- prefill: torch's CPU flash kernel computes the causal triangle's upper half whenever the keys fit one of its
  512-key blocks, and a chunk with cached context goes through a gather and an explicit mask; the native kernel
  tiles the lower triangle only, over the blocks where they lie (`benchmarks/prefill_attention.py`).

And the elementwise glue of a Llama layer in bf16 (`csrc/fused_ops.cpp`): RMSNorm, the residual add fused with the
next norm, rotary embedding, SiLU times up, one op each instead of ~26 small torch ops per layer, with torch's
roundings (SmolLM2's decode step at 16 x ~300 tokens: 20.8 -> 17.6 ms).

The build needs a C++ compiler (`$CXX`, else g++) and torch's headers; it takes ~10 s once per machine, torch version
and source, under a file lock (replicas starting together build it once). Without a compiler, or with
`PDSERVE_NATIVE_KERNELS=0`, the ops are None and attention keeps the SDPA route: same results up to float rounding.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
# compiled into one library, with CSRC's headers
SOURCES = (CSRC / "paged_attention.cpp", CSRC / "fused_ops.cpp", CSRC / "threads.cpp")
ENV_SWITCH = "PDSERVE_NATIVE_KERNELS"  # "0" keeps every op on torch's own kernels
ENV_CACHE = "PDSERVE_KERNEL_CACHE_DIR"
HEAD_DIMS = (32, 64, 96, 128)  # the kernel's compiled head sizes
MAX_HEADS = 64  # query heads (per KV head, and in all) the kernel holds at once
_BUILD_TIMEOUT_S = 600


def kernel_cache_dir() -> Path:
    env = os.environ.get(ENV_CACHE)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pdserve" / "kernels"


def kernels_supported(dtype: torch.dtype, head_dim: int, num_heads: int, num_kv_heads: int) -> bool:
    """Whether the native kernels (attention, fused glue) run by default for a model of this shape and dtype."""
    # bf16 only by default, and only where the CPU has bf16 instructions: the path they are tuned and held to
    # torch's accuracy on. The kernels compute float32 too (tests call them directly), but on an AVX2-only CPU
    # (where `dtype: auto` picks float32) their float path was 1.23x further from float32 than torch's bf16 ops in
    # decode (SmolLM2, tests/test_smollm2.py). (The one answer in 271 of test_autoscaling_e2e once blamed on the
    # float32 decode kernel is a near-tie of the reference, top-2 gap 2.7e-4, that flips on AVX-512 CPUs with
    # torch's own kernels too: tests/oracle.py's ExpectedText.)
    from pdserve.engine.weights import cpu_has_native_bf16

    return (
        dtype == torch.bfloat16
        and cpu_has_native_bf16()
        and head_dim in HEAD_DIMS
        and num_heads % num_kv_heads == 0
        and num_heads // num_kv_heads <= MAX_HEADS
    )


@functools.cache
def _library() -> bool:
    """Builds and loads the kernels once per process; False when they are off or cannot be built (logged once)."""
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "off", "false", "no"):
        logger.info("native CPU kernels off (%s=0): attention uses SDPA", ENV_SWITCH)
        return False
    try:
        library = build(SOURCES)
        torch.ops.load_library(str(library))
    except Exception as e:  # no compiler, no headers, a failed build: the SDPA route still works
        logger.warning("native CPU kernels unavailable (%s): attention uses SDPA", e)
        return False
    logger.info("native CPU attention kernels loaded from %s", library)
    return True


def paged_decode_op() -> Callable[..., torch.Tensor] | None:
    """`torch.ops.pdserve.paged_decode(q, k_cache, v_cache, block_table, seq_lens, scale)`, or None when native
    kernels are off or cannot be built here."""
    if not _library():
        return None
    op: Callable[..., torch.Tensor] = torch.ops.pdserve.paged_decode
    return op


@dataclass(frozen=True)
class FusedOps:
    """A Llama layer's elementwise glue, one op each (`csrc/fused_ops.cpp`, bf16 only)."""

    rms_norm: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]  # (x, weight, eps)
    add_rms_norm_: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]  # x += delta; norm(x)
    rope: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (x [T, heads, D], cos, sin [T, D])
    silu_and_mul: Callable[[torch.Tensor], torch.Tensor]  # [T, 2I] -> [T, I]


def fused_ops() -> FusedOps | None:
    """The fused bf16 glue ops, or None when native kernels are off or cannot be built here."""
    if not _library():
        return None
    ops = torch.ops.pdserve
    return FusedOps(ops.rms_norm, ops.add_rms_norm_, ops.rope, ops.silu_and_mul)


def pin_threads_op() -> Callable[[list[int]], int] | None:
    """`torch.ops.pdserve.pin_threads(cpus)`: thread i of the caller's intra-op team to core cpus[i] (torch's
    thread count set to len(cpus) first); the threads it pinned. None when native kernels are off or cannot be
    built here."""
    if not _library():
        return None
    op: Callable[[list[int]], int] = torch.ops.pdserve.pin_threads
    return op


def paged_prefill_op() -> Callable[..., torch.Tensor] | None:
    """`torch.ops.pdserve.paged_prefill(q, k_cache, v_cache, block_tables, spans, scale)`, or None when native
    kernels are off or cannot be built here."""
    if not _library():
        return None
    op: Callable[..., torch.Tensor] = torch.ops.pdserve.paged_prefill
    return op


def build(sources: tuple[Path, ...], cache_dir: Path | None = None) -> Path:
    """The shared library of `sources`, compiled once per (sources, torch, compiler, CPU) into the cache."""
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        raise RuntimeError(f"no C++ compiler ({os.environ.get('CXX', 'g++')}) on PATH")
    torch_dir = Path(torch.__file__).parent
    flags = [
        "-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c++20", "-w",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        f"-I{torch_dir / 'include'}", f"-L{torch_dir / 'lib'}", f"-Wl,-rpath,{torch_dir / 'lib'}",
    ]  # fmt: skip
    # torch's lib directory first: the kernel binds to the libgomp torch loaded, so both share one OpenMP pool.
    libs = ["-lc10", "-ltorch_cpu", "-lgomp"]
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256()
    headers = sorted({h for source in sources for h in source.parent.glob("*.h")})
    parts = [path.read_bytes() for path in (*sources, *headers)]  # a header's edit rebuilds too
    for part in (*parts, torch.__version__.encode(), version.encode(), " ".join(flags).encode(), _cpu_flags().encode()):
        key.update(part)
        key.update(b"\0")
    name = "pdserve_kernels"
    out_dir = (cache_dir or kernel_cache_dir()) / f"{name}-{key.hexdigest()[:16]}"
    library = out_dir / f"{name}.so"
    if library.exists():
        return library
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building it: wait, then reuse its result
        if library.exists():
            return library
        logger.info("building native kernels (once per machine and torch version): %s", [s.name for s in sources])
        with tempfile.NamedTemporaryFile(dir=out_dir, suffix=".so", delete=False) as tmp:
            partial = Path(tmp.name)
        try:
            result = subprocess.run(
                [compiler, *flags, *(str(source) for source in sources), "-o", str(partial), *libs],
                capture_output=True,
                text=True,
                timeout=_BUILD_TIMEOUT_S,
            )
            if result.returncode != 0:
                raise RuntimeError(f"{Path(compiler).name} failed: {result.stderr.strip()[-2000:]}")
            os.replace(partial, library)  # atomic: a reader never sees half a library
        finally:
            partial.unlink(missing_ok=True)
    return library


def _cpu_flags() -> str:
    """This CPU's feature flags: -march=native compiles for them, so a library is only reused on a like CPU."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""
