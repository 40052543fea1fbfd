"""Linear layers with the weight prepacked for oneDNN where that is measurably faster.

bf16 on a CPU with native bf16 (AMX / avx512_bf16): oneDNN's blocked weight layout runs the skinny matmuls of
decode ~35% faster than `F.linear` on the same weights (30 SmolLM2-sized layers: 17.2 -> 11.4 ms at 16 rows;
equal at 512 rows) and gives the same bits.
float32 on CPU: `F.linear` goes to a GEMM that repacks the weight on every call, which dominates at the few rows of
decode; prepacked, SmolLM2-135M's linears per step on an AVX2-only EPYC (2 threads) take 60 -> 17 ms at 3 rows,
72 -> 41 ms at 16, 175 -> 132 ms at 64 and the same at 512 (1 thread: 66 -> 25 ms at 3 rows, 20 -> 24 ms at 1).
The sums come out in another order, so results differ from `F.linear`'s in the last bits (~1e-5 relative) — the
same order of difference batching itself makes, and what tests/oracle.py's near-tie rule allows for.
CUDA keeps `F.linear`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pdserve.engine.weights import cpu_has_native_bf16

_PACK_BATCH_HINT = 64  # oneDNN picks its blocking for about this many rows; decode batches are near it


def can_prepack(weight: torch.Tensor) -> bool:
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    return weight.dtype == torch.float32 or (weight.dtype == torch.bfloat16 and cpu_has_native_bf16())


class Linear:
    """y = x W^T + b for x `[rows, in_features]`; W `[out_features, in_features]`."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, prepack: bool = True) -> None:
        self.out_features = weight.shape[0]
        self.bias = bias
        self._weight: torch.Tensor | None = weight
        self._packed: torch.Tensor | None = None
        if prepack and can_prepack(weight):
            self._packed = torch.ops.mkldnn._reorder_linear_weight(weight, _PACK_BATCH_HINT)
            self._weight = None  # the packed copy replaces it

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")
        assert self._weight is not None
        return F.linear(x, self._weight, self.bias)
