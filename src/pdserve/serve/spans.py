"""The serving layer's span attributes: what a prefill, a transfer, a decode stream and a routing decision record.

Spans themselves come from `pdserve.telemetry`; names of spans and attributes from `pdserve.telemetry.names`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing

from opentelemetry.trace import Span
from opentelemetry.util.types import AttributeValue

from pdserve.engine import RequestOutput
from pdserve.router import RouteDecision
from pdserve.telemetry import names, record_error
from pdserve.transfer import TransferStats


def prompt_attributes(first: RequestOutput) -> dict[str, AttributeValue]:
    """What computing the prompt took on this replica (from its first output)."""
    return {
        names.PROMPT_TOKENS: first.num_prompt_tokens,
        names.CACHED_TOKENS: first.num_cached_tokens,
        names.COMPUTED_TOKENS: first.num_prompt_tokens - first.num_cached_tokens,
        names.QUEUE_S: first.queue_s,
    }


def record_transfer(span: Span, stats: TransferStats) -> None:
    span.set_attributes(
        {
            names.TRANSPORT: stats.transport,
            names.TRANSFER_BLOCKS: stats.num_blocks,
            names.TRANSFER_BYTES: stats.num_bytes,
            names.TRANSFER_S: stats.seconds,  # from the push's start: with a pipelined push, the prefill's waits too
            names.TRANSFER_GBPS: stats.num_bytes / stats.sending_s / 1e9 if stats.sending_s > 0 else 0.0,
        }
    )
    for layer, seconds in enumerate(stats.layer_seconds):
        span.add_event(names.EVENT_LAYER_SENT, {names.LAYER: layer, names.LAYER_S: seconds})


def route_attributes(decision: RouteDecision | None, policy: str) -> dict[str, AttributeValue]:
    """The chosen pair and mode, and every candidate's cost terms as parallel arrays."""
    if decision is None:
        return {names.POLICY: policy}
    candidates = decision.decode_candidates + decision.prefill_candidates
    prefix = names.CANDIDATES
    return {
        names.POLICY: policy,
        names.MODE: decision.mode.value,
        names.DECODE_REPLICA: decision.decode_replica_id,
        names.PREFILL_REPLICA: decision.prefill_replica_id or "",
        names.EXPECTED_CACHED_TOKENS: decision.expected_cached_tokens,
        names.EXPECTED_TRANSFER_TOKENS: decision.expected_transfer_tokens,
        f"{prefix}.replica_id": [c.replica_id for c in candidates],
        f"{prefix}.role": [c.role for c in candidates],
        f"{prefix}.cached_tokens": [c.num_cached_tokens for c in candidates],
        f"{prefix}.queued_tokens": [c.num_queued_tokens for c in candidates],
        f"{prefix}.decodes": [c.num_decodes for c in candidates],
        f"{prefix}.free_blocks": [c.num_free_blocks for c in candidates],
        f"{prefix}.load_s": [c.load_s for c in candidates],
        f"{prefix}.prefill_s": [c.prefill_s for c in candidates],
        f"{prefix}.transfer_s": [c.transfer_s for c in candidates],
        f"{prefix}.total_s": [c.total_s for c in candidates],
    }


def end_unended(span: Span) -> None:
    """End `span` if its `traced_outputs` never ran: a stream closed before its first item (a call cancelled just
    after its channel's StreamStart) never starts the generators inside it, whose `finally` would have ended it."""
    if span.is_recording():
        span.set_attribute(names.ERROR_TYPE, "cancelled")
        span.end()


async def traced_outputs(
    span: Span, outputs: AsyncGenerator[RequestOutput, None]
) -> AsyncGenerator[RequestOutput, None]:
    """Relay `outputs`, then record on `span` the tokens, TPOT and finish reason (or the error), and end it."""
    first_at = last_at = 0.0
    num_tokens = 0
    try:
        async with aclosing(outputs):  # closed however this ends: the engine aborts an unfinished request at once
            async for out in outputs:
                if out.new_token_ids:  # (a commit's acknowledgement carries none)
                    last_at = time.perf_counter()
                    first_at = first_at or last_at
                num_tokens += len(out.new_token_ids)
                if out.finish_reason is not None:
                    span.set_attribute(names.GEN_AI_FINISH_REASONS, [out.finish_reason.value])
                yield out
    except (GeneratorExit, asyncio.CancelledError):
        span.set_attribute(names.ERROR_TYPE, "cancelled")  # the client left: not a server error
        raise
    except BaseException as e:
        record_error(span, e)
        raise
    finally:
        span.set_attribute(names.GEN_AI_OUTPUT_TOKENS, num_tokens)
        if num_tokens > 1:
            span.set_attribute(names.TPOT_S, (last_at - first_at) / (num_tokens - 1))
        span.end()
