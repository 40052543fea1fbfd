"""Request traces: what arrives when, with which prompt, decoding how many tokens.

A trace is a list of `TraceRequest` sorted by arrival, stored as JSON lines. `multiturn_trace` makes a synthetic
chat workload (shared system prompts, conversations that grow turn by turn); `ideal_hit_rate` bounds the prefix
cache hit rate any routing policy can reach on a trace.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from pdserve.kvcache import BlockHash, hash_block_chain

_MIN_TOKEN_ID = 100  # below this: ids a tokenizer reserves for special tokens
_JITTER_S = 0.01  # arrival jitter, so requests of equal nominal time do not tie


@dataclass(frozen=True)
class TraceRequest:
    request_id: str
    arrival_s: float  # seconds since the trace's start
    prompt_token_ids: tuple[int, ...]
    output_len: int  # tokens to decode, the first one included
    conversation_id: int = 0
    turn: int = 0


def save_trace(path: str | Path, requests: Iterable[TraceRequest]) -> None:
    """Write one JSON object per line."""
    with Path(path).open("w") as f:
        for r in requests:
            f.write(json.dumps(asdict(r)) + "\n")


def load_trace(path: str | Path) -> list[TraceRequest]:
    """Read a JSON-lines trace, sorted by arrival. Raises ValueError on a line that is not a request."""
    requests = []
    with Path(path).open() as f:
        for num, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                fields = json.loads(line)
                fields["prompt_token_ids"] = tuple(fields["prompt_token_ids"])
                requests.append(TraceRequest(**fields))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{num}: not a trace request ({e}); see TraceRequest for the fields") from e
    return sorted(requests, key=lambda r: r.arrival_s)


def multiturn_trace(
    num_conversations: int = 64,
    num_turns: int = 4,
    num_system_prompts: int = 4,
    system_prompt_tokens: int = 512,
    user_tokens: int = 64,
    reply_tokens: int = 128,
    output_len: int = 128,
    turn_interval_s: float = 5.0,
    conversation_stagger_s: float = 0.25,
    vocab_size: int = 49152,
    seed: int = 0,
) -> list[TraceRequest]:
    """Chats: conversation c starts at c x stagger with system prompt c % num_system_prompts; turn t arrives
    t x turn_interval_s later with prompt system + (user_0 + reply_0) + ... + user_t. Sorted by arrival."""
    rng = random.Random(seed)

    def tokens(n: int) -> tuple[int, ...]:
        return tuple(rng.randrange(_MIN_TOKEN_ID, vocab_size) for _ in range(n))

    systems = [tokens(system_prompt_tokens) for _ in range(num_system_prompts)]
    requests = []
    for c in range(num_conversations):
        history = systems[c % num_system_prompts]
        for t in range(num_turns):
            user = tokens(user_tokens)
            arrival_s = c * conversation_stagger_s + t * turn_interval_s + rng.uniform(0.0, _JITTER_S)
            requests.append(TraceRequest(f"c{c}-t{t}", arrival_s, history + user, output_len, c, t))
            history += user + tokens(reply_tokens)
    return sorted(requests, key=lambda r: r.arrival_s)


def ideal_hit_rate(requests: Sequence[TraceRequest], block_size: int) -> float:
    """Fraction of prompt tokens an infinite cache holding every earlier request's prompt blocks would serve, in
    arrival order (the engine recomputes at least the last prompt token). An upper bound for any policy."""
    seen: set[BlockHash] = set()
    num_hit = num_prompt = 0
    for r in sorted(requests, key=lambda r: r.arrival_s):
        hashes = hash_block_chain(r.prompt_token_ids, block_size)
        num_cacheable = (len(r.prompt_token_ids) - 1) // block_size
        num_blocks = next((i for i, h in enumerate(hashes[:num_cacheable]) if h not in seen), num_cacheable)
        num_hit += num_blocks * block_size
        num_prompt += len(r.prompt_token_ids)
        seen.update(hashes)
    return num_hit / num_prompt if num_prompt else 0.0
