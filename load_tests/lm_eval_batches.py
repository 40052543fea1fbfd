"""lm-evaluation-harness's `local-completions` model against a running server, as evaluation runs use it: the
same log-likelihoods and generations with `batch_size` 1 (a prompt per request) and 4 (a list of prompts per
request, scored with `echo`, `logprobs` and `max_tokens` 1). Not part of the test suite: lm-eval pulls in datasets,
evaluate and more; install it beside pdserve without them (see docs/LOAD_TESTS.md).

    python load_tests/lm_eval_batches.py --base-url http://127.0.0.1:8000/v1 --model SmolLM2-135M-Instruct \\
        --tokenizer "$(python -m pdserve.hub --dtype bfloat16)"
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

PAIRS = [  # (context, continuation): two share a context, as a multiple-choice task's do
    ("The capital of France is", " Paris"),
    ("Question: What is 2 + 2?\nAnswer:", " 4"),
    ("Once upon a time, there", " was"),
    ("The capital of France is", " Berlin"),
    ("x", " y"),  # a one-token context
]


def run(args: argparse.Namespace, batch_size: int) -> tuple[list[Any], list[str], float]:
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    lm = LocalCompletionsAPI(
        base_url=f"{args.base_url.rstrip('/')}/completions", model=args.model, tokenizer_backend="huggingface",
        tokenizer=args.tokenizer, batch_size=batch_size, num_concurrent=1, max_retries=1,
    )  # fmt: skip
    scored = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(PAIRS)]
    until = {"until": ["\n"], "max_gen_toks": 16}
    generated = [Instance("generate_until", {}, (context, until), i) for i, (context, _) in enumerate(PAIRS)]
    start = time.perf_counter()
    return lm.loglikelihood(scored), lm.generate_until(generated), time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--tokenizer", required=True, help="the model's local directory (its tokenizer)")
    args = parser.parse_args()
    results = {size: run(args, size) for size in (1, 4)}
    print("| pair | log-likelihood, batch 1 | batch 4 | greedy (1 / 4) |\n|---|---|---|---|")
    for pair, one, four in zip(PAIRS, results[1][0], results[4][0], strict=True):
        print(f"| {pair!r} | {one[0]:.6f} | {four[0]:.6f} | {one[1]} / {four[1]} |")
    for size, (_, generations, seconds) in results.items():
        print(f"batch_size {size}: {seconds:.2f} s; generations {generations}")
    same_scores = all(
        abs(a[0] - b[0]) < 0.05 and a[1] == b[1] for a, b in zip(results[1][0], results[4][0], strict=True)
    )
    same_text = results[1][1] == results[4][1]
    print("OK: batch_size 4 agrees with batch_size 1" if same_scores and same_text else "MISMATCH")
    return 0 if same_scores and same_text else 1


if __name__ == "__main__":
    sys.exit(main())
