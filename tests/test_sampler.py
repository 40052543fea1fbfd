"""The sampler draws from the distribution it is asked for: frequencies against the softmax, top-k/top-p supports,
min_tokens, seeds. Randomized over seeded logits; no model."""

from __future__ import annotations

import random

import pytest
import torch

from pdserve.engine.request import SamplingParams
from pdserve.engine.sampler import SampleRow, _draw, sample, stream_seed


def _row(params: SamplingParams, index: int = 0, stops: tuple[int, ...] = ()) -> SampleRow:
    return SampleRow(params, index, stops)


@pytest.mark.parametrize("case", range(12))
def test_frequencies_match_the_tempered_softmax(case: int) -> None:
    rng = random.Random(case)
    vocab = rng.choice([2, 5, 17, 64])
    logits = torch.tensor([rng.gauss(0, 2) for _ in range(vocab)])
    temperature = rng.choice([0.5, 1.0, 1.7])
    params = SamplingParams(temperature=temperature)
    draws = 6000
    counts = torch.zeros(vocab)
    for _ in range(draws):
        counts[sample(logits.unsqueeze(0), [_row(params)]).token_ids[0]] += 1
    want = (logits / temperature).softmax(-1)
    # Every cell within 5 standard deviations of its binomial count (fails with probability < 1e-5 per cell).
    std = (draws * want * (1 - want)).sqrt()
    assert ((counts - draws * want).abs() <= 5 * std + 1).all(), (counts / draws, want)


@pytest.mark.parametrize("case", range(40))
def test_never_draws_outside_top_k_and_top_p(case: int) -> None:
    rng = random.Random(1000 + case)
    vocab = rng.choice([3, 10, 50, 49152])
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(case)) * rng.choice([0.1, 1.0, 8.0])
    top_k = rng.choice([0, 1, 2, 5])
    top_p = rng.choice([1.0, 0.9, 0.5, 1e-6])
    params = SamplingParams(temperature=rng.choice([0.3, 1.0, 2.0]), top_k=top_k, top_p=top_p, seed=case)
    allowed = set(range(vocab))
    if 0 < top_k < vocab:
        allowed &= set(logits.topk(top_k).indices.tolist())
    if top_p < 1.0:
        probs = (logits / params.temperature).softmax(-1)
        ranked = probs.argsort(descending=True).tolist()
        nucleus, mass = [], 0.0
        for token in ranked:
            nucleus.append(token)
            mass += float(probs[token])
            if mass >= top_p:
                break
        allowed &= set(nucleus) | {ranked[0]}
    for index in range(60):
        token = sample(logits.unsqueeze(0), [_row(params, index)]).token_ids[0]
        assert token in allowed


def _kept_by_min_p_then_top_p(logits: torch.Tensor, params: SamplingParams) -> set[int]:
    """vLLM's nucleus after min_p: top_k, then min_p on the tempered softmax, renormalized, then the smallest set of
    most likely tokens whose mass reaches top_p — computed here one token at a time, in float64."""
    scaled = (logits / params.temperature).double()
    if 0 < params.top_k < scaled.numel():
        scaled = scaled.masked_fill(scaled < scaled.topk(params.top_k).values[-1], float("-inf"))
    probs = scaled.softmax(-1)
    probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    probs = probs / probs.sum()
    kept, mass = set(), 0.0
    for token in probs.argsort(descending=True).tolist():
        if probs[token] <= 0 or (kept and mass >= params.top_p):
            break
        kept.add(token)
        mass += float(probs[token])
    return kept


@pytest.mark.parametrize("case", range(40))
def test_top_p_after_min_p_is_a_share_of_what_min_p_kept(case: int) -> None:
    """min_p then top_p, as vLLM: top_p's nucleus is measured on the distribution min_p left, renormalized (it
    was measured against the whole mass, so tokens outside the nucleus were drawn). Case 0 is the plain one:
    [.5, .3, .15, .05] with min_p .2 (.05 goes) and top_p .82 keeps the first two only (.5/.95 + .3/.95 = .84)."""
    rng = random.Random(2000 + case)
    if case == 0:
        logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
        params = SamplingParams(temperature=1.0, min_p=0.2, top_p=0.82, seed=case)
    else:
        vocab = rng.choice([4, 10, 50])
        logits = torch.randn(vocab, generator=torch.Generator().manual_seed(case)) * rng.choice([0.5, 1.0, 3.0])
        params = SamplingParams(
            temperature=rng.choice([0.5, 1.0, 2.0]), top_k=rng.choice([0, 0, 3]), min_p=rng.choice([0.05, 0.2, 0.5]),
            top_p=rng.choice([0.5, 0.8, 0.95]), seed=case,
        )  # fmt: skip
    allowed = _kept_by_min_p_then_top_p(logits, params)
    assert case != 0 or allowed == {0, 1}
    drawn = {sample(logits.unsqueeze(0), [_row(params, index)]).token_ids[0] for index in range(200)}
    assert drawn <= allowed, (drawn, allowed, params)


def test_draw_never_picks_a_token_without_mass() -> None:
    gen = torch.Generator().manual_seed(0)
    for case in range(2000):
        probs = torch.rand(7, generator=gen)
        probs[torch.rand(7, generator=gen) < 0.6] = 0.0
        if case % 3 == 0:
            probs[-1] = 0.0  # the tail empty: a draw rounding up to the total must not land there
        if probs.sum() == 0:
            probs[case % 7] = 1.0
        assert probs[_draw(probs, gen)] > 0


def test_seeded_draws_depend_on_seed_and_index_only() -> None:
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(3))
    params = SamplingParams(temperature=1.0, seed=42)
    alone = [sample(logits[i : i + 1], [_row(params, i)]).token_ids[0] for i in range(4)]
    together = sample(logits, [_row(params, i) for i in range(4)]).token_ids
    assert alone == together
    other = SamplingParams(temperature=1.0, seed=43)
    draws = [sample(logits[:1], [_row(p, i)]).token_ids[0] for p in (params, other) for i in range(50)]
    assert draws[:50] != draws[50:]  # the seed moves the draws
    assert len(set(draws[:50])) > 1  # and so does the index


@pytest.mark.parametrize("apart", [1 << 32, 1 << 63, 1 << 40])
def test_seeds_far_apart_draw_differently(apart: int) -> None:
    """torch's CPU generator keeps a seed's low 32 bits: seeds 2^32 (or 2^40, 2^63) apart must still differ in
    the bits the generator reads, and so in their tokens (they drew the same tokens before)."""
    logits = torch.zeros(1, 1000)
    for base in (0, 7, 12345):
        draws = [
            [sample(logits, [_row(SamplingParams(temperature=1.0, seed=seed), i)]).token_ids[0] for i in range(20)]
            for seed in (base, base + apart)
        ]
        assert draws[0] != draws[1], (base, apart)
        assert stream_seed(base, 0) & 0xFFFFFFFF != stream_seed(base + apart, 0) & 0xFFFFFFFF


def test_min_tokens_masks_stop_ids_until_reached() -> None:
    logits = torch.full((1, 10), -5.0)
    logits[0, 3] = 10.0  # the stop token is overwhelmingly likely
    params = SamplingParams(temperature=1.0, min_tokens=2, seed=1)
    assert sample(logits, [_row(params, 0, stops=(3,))]).token_ids[0] != 3
    assert sample(logits, [_row(params, 2, stops=(3,))]).token_ids[0] == 3


@pytest.mark.parametrize("case", range(200))
def test_penalties_and_logit_bias_match_their_definitions(case: int) -> None:
    """logit_bias, then HF's repetition penalty (transformers' own processor is the oracle), then OpenAI's
    frequency and presence penalties on the output tokens only; greedy picks the argmax of that; logprobs stay the
    model's. Random vocabularies, histories (prompts of 0+ tokens, outputs of 0+), and parameters."""
    from transformers import RepetitionPenaltyLogitsProcessor

    rng = random.Random(5000 + case)
    vocab = rng.choice([4, 30, 500])
    rows, want_rows, histories = [], [], []
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(case)) * rng.choice([0.5, 3.0])
    for r in range(3):
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(1, 12))]
        output = [rng.randrange(vocab) for _ in range(rng.randint(0, 12))]
        params = SamplingParams(
            temperature=0.0, logprobs=True,
            logit_bias=tuple((t, rng.uniform(-100, 100)) for t in rng.sample(range(vocab), rng.randint(0, 3))),
            presence_penalty=rng.choice([0.0, rng.uniform(-2, 2)]),
            frequency_penalty=rng.choice([0.0, rng.uniform(-2, 2)]),
            repetition_penalty=rng.choice([1.0, rng.uniform(0.1, 2.0), rng.uniform(2.0, 20.0)]),
        )  # fmt: skip
        want = logits[r].clone()
        for token_id, bias in params.logit_bias:
            want[token_id] += bias
        if params.repetition_penalty != 1.0:
            processor = RepetitionPenaltyLogitsProcessor(params.repetition_penalty)
            want = processor(torch.tensor([prompt + output]), want.unsqueeze(0)).squeeze(0)
        for token_id in set(output):
            want[token_id] -= params.frequency_penalty * output.count(token_id) + params.presence_penalty
        rows.append(SampleRow(params, len(output), (), (prompt + output) if params.adjusts_logits else ()))
        want_rows.append(want)
        histories.append(prompt + output)
    before = logits.clone()
    result = sample(logits, rows)
    assert torch.equal(logits, before)  # the caller's logits are untouched
    assert result.token_ids == [int(w.argmax()) for w in want_rows]
    assert result.logprobs is not None
    for r, (logprob, _) in enumerate(result.logprobs):  # the raw distribution's, not the adjusted one's
        assert logprob == pytest.approx(float(logits[r].log_softmax(-1)[result.token_ids[r]]), abs=1e-5)


def test_a_temperature_below_a_hundredth_samples_at_a_hundredth() -> None:
    """Logits divided by 1e-38 overflow to +-inf and the softmax to NaN: such a request drew the last token every
    step. As vLLM, a positive temperature below 0.01 samples at 0.01 (on these logits, 40 apart, the argmax), and
    only 0 is greedy."""
    logits = torch.randn(6, 500, generator=torch.Generator().manual_seed(8)) * 40
    for temperature in (1e-38, 1e-30, 1e-6, 9.99e-6, 0.005):
        params = SamplingParams(temperature=temperature, seed=1, top_p=0.9)
        assert params.temperature == 0.01 and not params.is_greedy
        assert sample(logits, [_row(params, i) for i in range(6)]).token_ids == logits.argmax(dim=-1).tolist()
    assert SamplingParams(temperature=0.0).is_greedy and SamplingParams(temperature=0.02).temperature == 0.02


def _expected_distribution(logits: torch.Tensor, params: SamplingParams, row: SampleRow) -> torch.Tensor:
    """What the sampler should draw from, recomputed here in float64 one step at a time, in vLLM's order: logit bias,
    repetition penalty (prompt and output), frequency and presence penalties (output), temperature, top-k, min-p,
    top-p on what min-p left, renormalized."""
    x = logits.double().clone()
    for token, bias in params.logit_bias or ():
        x[token] += bias
    if params.repetition_penalty != 1.0:
        for token in set(row.token_ids):
            x[token] = x[token] / params.repetition_penalty if x[token] > 0 else x[token] * params.repetition_penalty
    output = list(row.token_ids)[len(row.token_ids) - row.num_output_tokens :] if row.num_output_tokens else []
    for token in set(output):
        x[token] -= params.frequency_penalty * output.count(token) + params.presence_penalty
    x = x / params.temperature
    if 0 < params.top_k < x.numel():
        x = x.masked_fill(x < x.topk(params.top_k).values[-1], float("-inf"))
    probs = x.softmax(-1)
    probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    probs = probs / probs.sum()
    kept, mass = torch.zeros_like(probs, dtype=torch.bool), 0.0
    for token in probs.argsort(descending=True).tolist():
        if probs[token] <= 0 or (kept.any() and mass >= params.top_p):
            break
        kept[token] = True
        mass += float(probs[token])
    probs = probs.masked_fill(~kept, 0.0)
    return probs / probs.sum()


@pytest.mark.parametrize("case", range(16))
def test_frequencies_match_the_adjusted_truncated_distribution(case: int) -> None:
    """The frequencies, not only the support, under top-k/min-p/top-p truncation, logit bias and the three penalties
    over a token history (a sampler that always drew the likeliest token of the nucleus, or applied a penalty to
    the wrong tokens, passed the support checks; found in review)."""
    rng = random.Random(3000 + case)
    vocab = rng.choice([4, 8, 17, 30])
    logits = torch.tensor([rng.gauss(0, 1.5) for _ in range(vocab)])
    history = [rng.randrange(vocab) for _ in range(rng.randint(0, 12))]
    params = SamplingParams(
        temperature=rng.choice([0.5, 1.0, 1.7]),
        top_k=rng.choice([0, 0, 3, 6]),
        top_p=rng.choice([1.0, 0.95, 0.8, 0.6]),
        min_p=rng.choice([0.0, 0.0, 0.05, 0.2]),
        repetition_penalty=rng.choice([1.0, 0.8, 1.3]),
        frequency_penalty=rng.choice([0.0, -0.5, 0.7]),
        presence_penalty=rng.choice([0.0, -0.5, 0.7]),
        logit_bias=((rng.randrange(vocab), rng.choice([-2.0, 1.5])),) if rng.random() < 0.5 else None,
    )
    row = SampleRow(params, rng.randint(0, len(history)), (), tuple(history))
    want = _expected_distribution(logits, params, row).float()
    draws = 4000
    counts = torch.zeros(vocab)
    for _ in range(draws):
        counts[sample(logits.unsqueeze(0), [row]).token_ids[0]] += 1
    assert counts[want == 0].sum() == 0, (counts, want, params)  # nothing outside what truncation kept
    std = (draws * want * (1 - want)).sqrt()
    assert ((counts - draws * want).abs() <= 5 * std + 1).all(), (counts / draws, want, params)
