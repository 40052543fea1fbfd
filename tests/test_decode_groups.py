"""The torch route's decode batch split by context length (attention.length_groups): every row in exactly one group,
never costlier than one padded batch, and the attention output as close to float64 as the one-batch call's. (Not
bit-identical: SDPA's arithmetic depends on the padded length, so the one-batch call already differs at float
rounding from each row attended alone, in 167 of 200 random float32 layouts, by up to 1.3e-6.)"""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from pdserve.engine.attention import AttentionMetadata, DecodeGroup, _decode_attention, length_groups


def _cost(num_blocks: list[int], groups: list[list[int]], overhead: int) -> int:
    return sum(len(g) * max(num_blocks[r] for r in g) + overhead for g in groups)


def test_groups_partition_the_rows_and_never_cost_more_than_one_batch() -> None:
    rng = random.Random(0)
    for _ in range(2000):
        n = rng.randint(1, 64)
        top = rng.choice([1, 4, 40, 300])
        num_blocks = [rng.randint(1, top) for _ in range(n)]
        overhead = rng.choice([1, 8, 16, 64])
        groups = length_groups(num_blocks, overhead)
        assert sorted(r for g in groups for r in g) == list(range(n))
        assert all(g == sorted(g) and g for g in groups)
        assert _cost(num_blocks, groups, overhead) <= _cost(num_blocks, [list(range(n))], overhead)
    # one long context among short ones: its own group
    assert length_groups([20] * 15 + [130], 16) == [list(range(15)), [15]]
    assert length_groups([20, 21, 19], 16) == [[0, 1, 2]]  # similar lengths: one call


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_decode_attention_is_as_close_to_float64_as_one_batch(dtype: torch.dtype) -> None:
    rng = random.Random(1)
    torch.manual_seed(1)
    errors: dict[str, list[float]] = {"batched": [], "grouped": []}
    for case in range(300):
        block_size = rng.choice([1, 4, 16, 32])
        num_kv_heads = rng.choice([1, 2, 3])
        num_heads = num_kv_heads * rng.choice([1, 3, 4])
        head_dim = rng.choice([8, 64])
        batch = rng.randint(1, 24)
        lengths = [rng.choice([rng.randint(1, 40), rng.randint(1, 700)]) for _ in range(batch)]
        blocks_needed = [-(-n // block_size) for n in lengths]
        num_blocks = sum(blocks_needed) + 1
        k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim).to(dtype)
        v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim).to(dtype)
        free = list(range(1, num_blocks))
        rng.shuffle(free)
        width = max(blocks_needed)
        block_ids = torch.zeros(batch, width, dtype=torch.long)
        for i, n in enumerate(blocks_needed):
            block_ids[i, :n] = torch.tensor([free.pop() for _ in range(n)])
        lens = torch.tensor(lengths)
        mask = (torch.arange(width * block_size).unsqueeze(0) < lens.unsqueeze(1))[:, None, None, :]
        q = torch.randn(batch, num_heads, head_dim).to(dtype)
        one = AttentionMetadata(torch.zeros(0, dtype=torch.long), batch, block_ids, mask, lens, [])
        groups = length_groups(blocks_needed, rng.choice([1, 4, 16]))
        split = tuple(
            DecodeGroup(
                rows=torch.tensor(g),
                block_ids=block_ids[g, : max(blocks_needed[r] for r in g)],
                mask=mask[g, :, :, : max(blocks_needed[r] for r in g) * block_size],
            )
            for g in groups
        )
        grouped = dataclasses.replace(one, decode_groups=split)
        exact = _decode_attention(
            q.double(), k_cache.double(), v_cache.double(), one, head_dim**-0.5, None
        )  # fmt: skip
        batched = _decode_attention(q, k_cache, v_cache, one, head_dim**-0.5, None)
        got = _decode_attention(q, k_cache, v_cache, grouped, head_dim**-0.5, None)
        errors["batched"].append((batched.double() - exact).abs().max().item())
        errors["grouped"].append((got.double() - exact).abs().max().item())
        assert errors["grouped"][-1] <= (2e-6 if dtype == torch.float32 else 2e-2), (case, lengths, groups)
    assert sum(errors["grouped"]) <= 1.1 * sum(errors["batched"])


def test_the_torch_route_takes_sdpa_output_strided_as_cuda_returns_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA's SDPA kernels return `[B, H, q, D]` laid out as `[B, q, H, D]`: a `view` of it failed, and every decode
    step on a GPU crashed (found on an H200; CI has no GPU). The same layout on CPU, same values."""
    from pdserve.engine import attention

    sdpa = attention.F.scaled_dot_product_attention

    def strided(*args: object, **kwargs: object) -> torch.Tensor:
        out = sdpa(*args, **kwargs)  # type: ignore[arg-type]
        return out.transpose(1, 2).contiguous().transpose(1, 2)

    torch.manual_seed(2)
    batch, num_kv_heads, num_heads, head_dim, block_size = 3, 2, 6, 8, 4
    k_cache, v_cache = torch.randn(2, 9, block_size, num_kv_heads, head_dim)
    block_ids = torch.tensor([[1, 2], [3, 0], [4, 5]])
    lens = torch.tensor([7, 3, 8])
    mask = (torch.arange(2 * block_size).unsqueeze(0) < lens.unsqueeze(1))[:, None, None, :]
    q = torch.randn(batch, num_heads, head_dim)
    meta = AttentionMetadata(torch.zeros(0, dtype=torch.long), batch, block_ids, mask, lens, [])
    want = _decode_attention(q, k_cache, v_cache, meta, head_dim**-0.5, None)
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", strided)
    assert torch.equal(_decode_attention(q, k_cache, v_cache, meta, head_dim**-0.5, None), want)
