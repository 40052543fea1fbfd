"""The correctness oracle: transformers' greedy generate(), and the one allowed exception to exactness.

Batching changes matmul shapes and so the last bits of fp32 sums; on a near-tie a greedy token can then flip
(DESIGN.md §6). Where our tokens first differ from the reference, the reference's top-2 logit gap there must be
below NEAR_TIE and the comparison stops at that position. Anything else fails. Tests that meet the output as text
(through HTTP) apply the same rule with `ExpectedText`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from pdserve.engine import EngineRequest, LLMEngine, RequestOutput, SamplingParams

NEAR_TIE = 1e-3
HTTP_MAX_TOKENS = 10  # greedy tokens per request in the HTTP tests that use conftest's `oracle` fixture


def continuation_text(tokenizer: object, prompt: list[int], output: list[int]) -> str:
    """The text the API returns for `output` after `prompt` (api/detokenizer.py): what decoding prompt + output adds
    to decoding the prompt alone. It equals decode(output) except where the prompt's context changes it: a
    SentencePiece token's leading space, or a prompt of token ids ending inside a character (the output that
    completes the character carries it, where decode(output) alone would show U+FFFD)."""
    head = str(tokenizer.decode(prompt, skip_special_tokens=True))  # type: ignore[attr-defined]
    whole = str(tokenizer.decode(prompt + output, skip_special_tokens=True))  # type: ignore[attr-defined]
    common = next((i for i, (a, b) in enumerate(zip(head, whole, strict=False)) if a != b), min(len(head), len(whole)))
    return whole[common:]


@dataclass(frozen=True)
class Reference:
    token_ids: list[int]
    top2_gaps: list[float]  # logit gap between the best and second-best token at each generated position


def load_reference_model(path: object) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.inference_mode()
def reference_greedy(model: PreTrainedModel, prompt: list[int], max_tokens: int) -> Reference:
    ids = torch.tensor([prompt], device=model.device)
    # One thread: beside a live Ray cluster (replicas, daemons, other load) two OpenMP threads spin at each barrier for
    # a preempted peer, 20-50x slower on the tiny test models (0.2-1.1 s a 600-token prompt against 0.02 s; the
    # autoscaling test's 265 answers took a minute to check). The references are float32 either way.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    # Like ignore_eos: run to max_tokens with EOS unmasked (min_new_tokens would mask it and change the argmax).
    eos, model.generation_config.eos_token_id = model.generation_config.eos_token_id, None
    try:
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_tokens,
            do_sample=False,
            return_dict_in_generate=True,
            output_logits=True,
            pad_token_id=0,
        )
    finally:
        model.generation_config.eos_token_id = eos
        torch.set_num_threads(threads)
    gaps = []
    for step_logits in out.logits:
        top2 = step_logits[0].float().topk(2).values
        gaps.append(float(top2[0] - top2[1]))
    return Reference(out.sequences[0, len(prompt) :].tolist(), gaps)


def assert_matches(reference: Reference, got: list[int], label: str = "") -> int:
    """Assert `got` equals the reference up to its length, or up to a first difference at a near-tie.
    Returns the number of tokens compared."""
    assert len(got) == len(reference.token_ids), f"{label}: {len(got)} tokens, expected {len(reference.token_ids)}"
    for i, (want, have) in enumerate(zip(reference.token_ids, got, strict=True)):
        if want != have:
            gap = reference.top2_gaps[i]
            assert gap < NEAR_TIE, f"{label}: token {i} is {have}, expected {want} (top-2 gap {gap:.4g})"
            print(f"{label}: near-tie at token {i} (gap {gap:.2e}); compared {i} tokens")
            return i
    return len(got)


class ExpectedText(str):
    """The text of the reference's greedy continuation, compared as `assert_matches` compares tokens: a text equals
    it when equal, or when it starts with the text of the reference's tokens before a near-tie (the comparison stops
    there; printed, as a near-tie must be shown). A str, so `got == want` and `got == [want, ...]` read as usual:
    Python tries a subclass's reflected `__eq__` first."""

    tie_prefixes: tuple[tuple[int, str], ...]

    def __new__(cls, tokenizer: object, prompt: list[int], reference: Reference) -> ExpectedText:
        text = super().__new__(cls, continuation_text(tokenizer, prompt, reference.token_ids))
        # A prefix cut inside a character ends in U+FFFD where the whole text has the character: compare before it.
        text.tie_prefixes = tuple(
            (k, continuation_text(tokenizer, prompt, reference.token_ids[:k]).rstrip("\ufffd"))
            for k, gap in enumerate(reference.top2_gaps)
            if gap < NEAR_TIE
        )
        return text

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, str):
            return NotImplemented
        if str.__eq__(self, other):
            return True
        for k, prefix in self.tie_prefixes:
            if other.startswith(prefix):
                print(f"near-tie at token {k}: compared the text of the first {k} tokens ({prefix!r})")
                return True
        return False

    def admits_prefix(self, partial: str) -> bool:
        """Whether `partial`, the text of a stream cut short, can begin a text equal to this one."""
        return str.startswith(self, partial) or any(partial.startswith(prefix) for _, prefix in self.tie_prefixes)

    def __ne__(self, other: object) -> bool:
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    __hash__ = str.__hash__


def greedy(max_tokens: int, **kwargs: object) -> SamplingParams:
    """Greedy, ignoring EOS unless told otherwise (the reference runs to max_tokens too)."""
    params: dict[str, object] = {"ignore_eos": True, **kwargs}
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **params)  # type: ignore[arg-type]


def run_staggered(engine: LLMEngine, arrivals: list[tuple[int, EngineRequest]]) -> dict[str, list[int]]:
    """Add each request at its step number, step until all finish; returns each request's output tokens."""
    tokens: dict[str, list[int]] = {r.request_id: [] for _, r in arrivals}
    pending = sorted(arrivals, key=lambda a: a[0])
    step = 0
    while pending or engine.has_unfinished():
        while pending and pending[0][0] <= step:
            engine.add_request(pending.pop(0)[1])
        collect(engine.step(), tokens)
        step += 1
    return tokens


def collect(outputs: list[RequestOutput], tokens: dict[str, list[int]]) -> None:
    for out in outputs:
        tokens.setdefault(out.request_id, []).extend(out.new_token_ids)


def random_prompts(lengths: list[int], vocab: int, seed: int = 0, low: int = 3) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(low, vocab, (n,), generator=g).tolist() for n in lengths]
