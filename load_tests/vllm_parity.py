"""pdserve's OpenAI API against vLLM's, request by request: the same bodies to both servers, the answers compared.

Both serve the same checkpoint greedily (float32 on both sides keeps the tokens equal), so every difference is the
API's: a status code, a field one side lacks, a count, a finish reason, an error's type or parameter. Prints a table
(case, status on each side, what differs) and writes it as JSON with `--json`.

    bash ../shared/peers/vllm-cpu.sh ~/.cache/pdserve/models/SmolLM2-135M-Instruct-float32 8100 --dtype float32
    pdserve serve ~/.cache/pdserve/models/SmolLM2-135M-Instruct-float32 --colocated --port 8011 --dtype float32
    python load_tests/vllm_parity.py --pdserve http://127.0.0.1:8011/v1 --vllm http://127.0.0.1:8100/v1 \\
        --model SmolLM2-135M-Instruct-float32

Fields every server fills its own way (ids, timestamps, fingerprints) are left out; so are those only one side has
and that `--ignore` names. A case passes when both sides answer the same status and, for a 200, the same body after
that; for an error, the same status (pdserve's error `type`s are OpenAI's, `invalid_request_error`, where vLLM names
its exception class, and pdserve names the `param` where vLLM often gives none). A field null on one side and
absent on the other is the same to a client.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from typing import Any

import httpx

VOLATILE = {"id", "created", "system_fingerprint", "model", "service_tier", "kv_transfer_params"}
# pdserve's by design: the usage's cached tokens always (vLLM's only with --enable-prompt-tokens-details)
DELIBERATE = {"prompt_tokens_details"}


@dataclass
class Case:
    name: str
    route: str  # under /v1, or a path from the server's root when it starts with "/"
    body: dict[str, Any]
    method: str = "POST"


@dataclass
class Outcome:
    case: str
    status: tuple[int, int]
    differences: list[str] = field(default_factory=list)


def cases(model: str) -> list[Case]:
    chat = [{"role": "user", "content": "Name three colors."}]
    text = "The capital of France is"
    c: list[Case] = []

    def completion(name: str, **body: Any) -> None:
        c.append(Case(name, "completions", {"model": model, "prompt": text, "max_tokens": 8, "temperature": 0} | body))

    def chat_case(name: str, **body: Any) -> None:
        c.append(Case(name, "chat/completions", {"model": model, "messages": chat, "max_tokens": 8, "temperature": 0}
                      | body))  # fmt: skip

    completion("completion")
    completion("completion, token ids", prompt=[504, 3575, 282, 4649, 314])
    completion("completion, batch of texts", prompt=[text, "Water boils at"])
    completion("completion, batch of ids", prompt=[[504, 3575], [1780, 282]])
    completion("completion, n=2", n=2)
    completion("completion, echo", echo=True)
    completion("completion, echo + logprobs", echo=True, logprobs=1, max_tokens=3)
    completion("completion, logprobs=2", logprobs=2, max_tokens=4)
    completion("completion, stop string", stop=[" Paris"], max_tokens=16)
    completion("completion, stop kept", stop=[" Paris"], include_stop_str_in_output=True, max_tokens=16)
    completion("completion, stop token id", stop_token_ids=[7042], max_tokens=16)
    completion("completion, max_tokens=1", max_tokens=1)
    completion("completion, min_tokens + ignore_eos", min_tokens=4, ignore_eos=True, max_tokens=6)
    completion("completion, suffix", suffix="!")
    completion("completion, seed sampling", temperature=1.0, seed=7)
    completion("completion, best_of=1", best_of=1)
    completion("completion, prompt_logprobs", prompt_logprobs=1, max_tokens=2)
    completion("completion, skip_special_tokens false", skip_special_tokens=False, max_tokens=8)
    completion("completion, return_tokens_as_token_ids", logprobs=1, return_tokens_as_token_ids=True, max_tokens=3)
    completion("completion, stream", stream=True)
    completion("completion, stream + usage", stream=True, stream_options={"include_usage": True})
    completion(
        "completion, stream + continuous usage",
        stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True},
    )
    completion("completion, stream n=2 batch", stream=True, n=2, prompt=[text, "Water boils at"])
    completion("completion, stream + echo", stream=True, echo=True)
    completion("completion, stream + logprobs", stream=True, logprobs=1, max_tokens=3)
    chat_case("chat")
    chat_case("chat, system", messages=[{"role": "system", "content": "Be brief."}, *chat])
    chat_case("chat, content parts", messages=[{"role": "user", "content": [{"type": "text", "text": "Hi"}]}])
    chat_case("chat, max_completion_tokens", max_tokens=None, max_completion_tokens=5)
    chat_case("chat, n=2", n=2)
    chat_case("chat, logprobs", logprobs=True, top_logprobs=2, max_tokens=3)
    chat_case("chat, stop", stop=["\n"], max_tokens=32)
    chat_case("chat, continue final message", messages=[*chat, {"role": "assistant", "content": "Red,"}],
              continue_final_message=True, add_generation_prompt=False)  # fmt: skip
    chat_case("chat, echo", echo=True, max_tokens=4)
    chat_case("chat, stream", stream=True)
    chat_case("chat, stream + usage", stream=True, stream_options={"include_usage": True})
    chat_case("chat, stream + logprobs", stream=True, logprobs=True, top_logprobs=1, max_tokens=3)
    chat_case("chat, response_format text", response_format={"type": "text"})
    chat_case("chat, user field", user="someone")
    completion("completion, return_token_ids", return_token_ids=True, max_tokens=4)
    chat_case("chat, return_token_ids", return_token_ids=True, max_tokens=4)
    completion("completion, stream + return_token_ids", stream=True, return_token_ids=True, prompt=[text, "Hi"])
    chat_case("chat, stream + return_token_ids", stream=True, return_token_ids=True)
    chat_case("chat, return_tokens_as_token_ids", logprobs=True, top_logprobs=1, return_tokens_as_token_ids=True,
              max_tokens=3)  # fmt: skip
    completion("completion, add_special_tokens false", add_special_tokens=False, max_tokens=4, echo=True)
    completion("completion, echo + return_token_ids", echo=True, return_token_ids=True, max_tokens=4)
    completion("completion, scoring (max_tokens 0, echo)", echo=True, logprobs=1, max_tokens=0)
    completion("completion, scoring + return_token_ids", echo=True, logprobs=1, max_tokens=0, return_token_ids=True)
    completion("completion, stream + return_tokens_as_token_ids", stream=True, logprobs=1, max_tokens=3,
               return_tokens_as_token_ids=True)  # fmt: skip
    completion("completion, top_k + min_p", temperature=0.0, top_k=5, min_p=0.1)
    completion("completion, repetition_penalty", repetition_penalty=1.3, max_tokens=12)
    completion("completion, logit_bias", logit_bias={"7042": -100}, max_tokens=6)
    completion("completion, allowed_token_ids", allowed_token_ids=[28, 29, 30], max_tokens=3)
    completion("completion, bad_words", bad_words=[" Paris"], max_tokens=6)
    completion("completion, truncate_prompt_tokens", truncate_prompt_tokens=3, max_tokens=4)
    completion("completion, truncate_prompt_tokens + echo", truncate_prompt_tokens=3, max_tokens=4, echo=True)
    completion("completion, truncate right", truncate_prompt_tokens=3, truncation_side="right", max_tokens=4)
    completion("completion, truncate_prompt_tokens -1", truncate_prompt_tokens=-1, max_tokens=4)
    chat_case("chat, truncate_prompt_tokens", truncate_prompt_tokens=12, max_tokens=4)
    completion("bad: truncate_prompt_tokens past the context", truncate_prompt_tokens=10**6)
    completion("completion, priority", priority=0, max_tokens=4)
    completion("completion, spaces_between_special_tokens", spaces_between_special_tokens=False, max_tokens=4)
    chat_case("chat, developer role", messages=[{"role": "developer", "content": "Be brief."}, *chat])
    chat_case("chat, tool role", messages=[*chat, {"role": "assistant", "content": "Red"},
                                          {"role": "tool", "content": "42", "tool_call_id": "x"}])  # fmt: skip
    chat_case("chat, name field", messages=[{"role": "user", "content": "Hi", "name": "bob"}])
    chat_case("chat, parallel_tool_calls", parallel_tool_calls=False)
    chat_case("chat, tool_choice none", tool_choice="none")
    chat_case("chat, chat_template_kwargs", chat_template_kwargs={"enable_thinking": False})
    chat_case("chat, documents", documents=[{"title": "t", "text": "x"}])
    chat_case("chat, stop_token_ids", stop_token_ids=[2])
    chat_case("chat, min_tokens", min_tokens=3, max_tokens=5)
    chat_case("chat, frequency_penalty", frequency_penalty=0.5)
    chat_case("chat, metadata", metadata={"a": "b"})
    chat_case("chat, store false", store=False)
    chat_case("chat, prediction", prediction={"type": "content", "content": "Red"})
    chat_case("chat, reasoning_effort", reasoning_effort="low")
    chat_case("chat, modalities text", modalities=["text"])
    chat_case("chat, audio null", audio=None)
    chat_case("chat, seed greedy", seed=3)
    chat_case("chat, stream_options without stream", stream_options={"include_usage": True})
    # Refusals: the status, and the error's type and param
    completion("bad: unknown model", model="nope")
    completion("bad: max_tokens over the context", max_tokens=10**6)
    completion("bad: negative temperature", temperature=-1)
    completion("bad: top_p 0", top_p=0)
    completion("bad: n=0", n=0)
    completion("bad: logprobs=21", logprobs=21)
    completion("bad: empty prompt", prompt="")
    completion("bad: empty batch", prompt=[])
    completion("bad: token id out of vocabulary", prompt=[10**9])
    completion("bad: stop of 5 strings", stop=["a", "b", "c", "d", "e"])
    completion("bad: max_tokens=0", max_tokens=0)
    completion("bad: prompt missing", prompt=None)
    completion("bad: presence_penalty 3", presence_penalty=3)
    completion("bad: stream n=2 best_of=3", best_of=3, n=2)
    chat_case("bad: chat without messages", messages=[])
    chat_case("bad: chat role unknown", messages=[{"role": "wizard", "content": "x"}])
    chat_case("bad: top_logprobs without logprobs", top_logprobs=2)
    chat_case("bad: top_logprobs 21", logprobs=True, top_logprobs=21)
    chat_case("bad: tools", tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
    chat_case("bad: response_format json_schema", response_format={"type": "json_schema", "json_schema": {"name": "x"}})
    c.append(Case("tokenize", "/tokenize", {"model": model, "prompt": text}))
    c.append(Case("tokenize chat", "/tokenize", {"model": model, "messages": chat}))
    c.append(Case("detokenize", "/detokenize", {"model": model, "tokens": [504, 3575, 282]}))
    c.append(Case("models", "models", {}, method="GET"))
    return c


def _normalized(value: Any, ignore: set[str]) -> Any:
    if isinstance(value, dict):
        return {k: _normalized(v, ignore) for k, v in value.items() if k not in VOLATILE | DELIBERATE | ignore}
    if isinstance(value, list):
        return [_normalized(v, ignore) for v in value]
    return value


def _stream_summary(text: str) -> dict[str, Any]:
    """A stream as a whole: per choice index its text (or content) and finish reason, the last usage, the logprobs
    tokens in order, and the number of events carrying usage."""
    choices: dict[int, dict[str, Any]] = {}
    usage, num_usage, done, prompt_ids, num_prompt_ids = None, 0, False, None, 0
    for event in text.split("\n\n"):
        payload = event.removeprefix("data: ").strip()
        if not payload:
            continue
        if payload == "[DONE]":
            done = True
            continue
        chunk = json.loads(payload)
        if chunk.get("usage"):
            usage, num_usage = chunk["usage"], num_usage + 1
        if chunk.get("prompt_token_ids"):  # a chat stream's, in its opening chunks
            prompt_ids = chunk["prompt_token_ids"]
            num_prompt_ids += 1
        for choice in chunk.get("choices", []):
            seen = choices.setdefault(
                choice["index"],
                {"text": "", "finish_reason": None, "logprob_tokens": [], "text_offset": [], "token_ids": []},
            )
            seen["token_ids"] += choice.get("token_ids") or []
            if choice.get("prompt_token_ids"):  # where it goes counts: once, in the choice's first chunk
                seen["prompt_token_ids"] = choice["prompt_token_ids"]
                seen["chunks with prompt_token_ids"] = seen.get("chunks with prompt_token_ids", 0) + 1
            delta = choice.get("delta") or {}
            seen["text"] += choice.get("text") or delta.get("content") or ""
            seen["finish_reason"] = choice.get("finish_reason") or seen["finish_reason"]
            logprobs = choice.get("logprobs") or {}
            seen["logprob_tokens"] += logprobs.get("tokens") or [t["token"] for t in logprobs.get("content") or []]
            seen["text_offset"] += logprobs.get("text_offset") or []
    return {"choices": dict(sorted(choices.items())), "usage": usage, "events with usage": num_usage, "done": done,
            "prompt_token_ids": prompt_ids, "chunks with prompt_token_ids": num_prompt_ids}  # fmt: skip


def _differences(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(a.keys() | b.keys(), key=str):
            if a.get(key) is None and b.get(key) is None:  # null and absent read the same to clients
                continue
            if key not in b:
                out.append(f"{path}.{key}: only pdserve ({json.dumps(a[key])[:60]})")
            elif key not in a:
                out.append(f"{path}.{key}: only vLLM ({json.dumps(b[key])[:60]})")
            else:
                out += _differences(a[key], b[key], f"{path}.{key}")
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in _differences(x, y, f"{path}[{i}]")]
    if isinstance(a, float) and isinstance(b, float) and abs(a - b) <= 1e-3 * max(1.0, abs(b)):
        return []
    if a != b:
        return [f"{path or '.'}: pdserve {json.dumps(a)[:80]} vs vLLM {json.dumps(b)[:80]}"]
    return []


def _answer(client: httpx.Client, base: str, case: Case, model: str) -> tuple[int, Any]:
    url = base.removesuffix("/v1") + case.route if case.route.startswith("/") else f"{base}/{case.route}"
    body = {k: v for k, v in case.body.items() if v is not None or k == "prompt"}
    body = {**body, "model": model} if body.get("model") not in (None, "nope") else body
    if body.get("prompt", 0) is None:
        del body["prompt"]
    response = client.get(url) if case.method == "GET" else client.post(url, json=body)
    if response.status_code == 200 and body.get("stream"):
        return 200, _stream_summary(response.text)
    try:
        return response.status_code, response.json()
    except ValueError:
        return response.status_code, response.text


def compare(pdserve: str, vllm: str, model_a: str, model_b: str, ignore: set[str]) -> list[Outcome]:
    outcomes = []
    with httpx.Client(timeout=120) as client:
        for case in cases(model_a):
            (sa, a), (sb, b) = _answer(client, pdserve, case, model_a), _answer(client, vllm, case, model_b)
            outcome = Outcome(case.name, (sa, sb))
            if sa != sb:
                outcome.differences.append(f"status {sa} vs {sb}: {json.dumps(a)[:160]} | {json.dumps(b)[:160]}")
            elif sa != 200:  # the same refusal: types and params differ by design (pdserve's are OpenAI's)
                pass
            else:
                if case.route == "models":
                    a, b = [m["object"] for m in a["data"]], [m["object"] for m in b["data"]]
                outcome.differences = _differences(_normalized(a, ignore), _normalized(b, ignore))
            outcomes.append(outcome)
    return outcomes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pdserve", default="http://127.0.0.1:8011/v1")
    parser.add_argument("--vllm", default="http://127.0.0.1:8100/v1")
    parser.add_argument("--model", required=True, help="the served model name (both sides, unless --vllm-model)")
    parser.add_argument("--vllm-model", help="vLLM's served name when it differs")
    parser.add_argument("--ignore", nargs="*", default=[], help="fields to leave out of the comparison")
    parser.add_argument("--json", help="write the outcomes here")
    args = parser.parse_args()
    outcomes = compare(args.pdserve, args.vllm, args.model, args.vllm_model or args.model, set(args.ignore))
    print("| case | status pdserve / vLLM | differences |\n|---|---|---|")
    for o in outcomes:
        print(f"| {o.case} | {o.status[0]} / {o.status[1]} | {'; '.join(o.differences) or 'same'} |")
    same = sum(not o.differences for o in outcomes)
    print(f"\n{same} of {len(outcomes)} cases answered the same")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([o.__dict__ for o in outcomes], f, indent=1)
    sys.exit(0)


if __name__ == "__main__":
    main()
