"""Span and attribute names, defined once. OpenTelemetry GenAI / HTTP semantic conventions where one exists,
`pdserve.*` otherwise. docs/TELEMETRY.md lists them with their meaning."""

from __future__ import annotations

# ---- spans (one trace per request: HTTP at the ingress, then the replicas' spans as its children) ----------------
SPAN_TOKENIZE = "pdserve.tokenize"  # ingress: chat template + tokenizer
SPAN_ROUTE = "pdserve.route"  # ingress: the router's decision
SPAN_RESERVE = "pdserve.reserve"  # decode replica: blocks held for the prompt's KV
SPAN_PREFILL = "pdserve.prefill"  # prefill replica: the prompt's KV and first token
SPAN_KV_TRANSFER = "pdserve.kv_transfer"  # prefill replica: blocks pushed to the decode replica
SPAN_DECODE = "pdserve.decode"  # decode replica: commit, then tokens until the finish
SPAN_GENERATE = "pdserve.generate"  # one replica prefills and decodes (local mode on D, or colocated)
EVENT_LAYER_SENT = "pdserve.kv_transfer.layer"  # one per layer moved, with its index and seconds

# ---- OpenTelemetry semantic conventions ----------------------------------------------------------------------
HTTP_METHOD = "http.request.method"
HTTP_ROUTE = "http.route"
HTTP_STATUS = "http.response.status_code"
URL_PATH = "url.path"
ERROR_TYPE = "error.type"
GEN_AI_OPERATION = "gen_ai.operation.name"  # "chat" | "text_completion"
GEN_AI_PROVIDER = "gen_ai.provider.name"
GEN_AI_REQUEST_MODEL = "gen_ai.request.model"
GEN_AI_MAX_TOKENS = "gen_ai.request.max_tokens"
GEN_AI_TEMPERATURE = "gen_ai.request.temperature"
GEN_AI_TOP_P = "gen_ai.request.top_p"
GEN_AI_SEED = "gen_ai.request.seed"
GEN_AI_RESPONSE_ID = "gen_ai.response.id"
GEN_AI_FINISH_REASONS = "gen_ai.response.finish_reasons"
GEN_AI_INPUT_TOKENS = "gen_ai.usage.input_tokens"
GEN_AI_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"

# ---- pdserve -------------------------------------------------------------------------------------------------
REQUEST_ID = "pdserve.request_id"
REPLICA_ID = "pdserve.replica_id"
ROLE = "pdserve.role"  # resource attribute: "ingress" | "prefill" | "decode" | "engine"
CACHED_TOKENS = "pdserve.prefix_cache.hit_tokens"  # prompt tokens this replica took from its prefix cache
PROMPT_TOKENS = "pdserve.prompt_tokens"
COMPUTED_TOKENS = "pdserve.computed_tokens"  # prompt tokens this replica computed
QUEUE_S = "pdserve.queue_s"  # waiting in the engine before the first step
COMPUTE_S = "pdserve.compute_s"
TTFT_S = "pdserve.ttft_s"
TPOT_S = "pdserve.tpot_s"
STREAMED = "pdserve.stream"
MODE = "pdserve.route.mode"  # "disaggregated" | "local"
POLICY = "pdserve.route.policy"
PREFILL_REPLICA = "pdserve.route.prefill_replica_id"
DECODE_REPLICA = "pdserve.route.decode_replica_id"
EXPECTED_CACHED_TOKENS = "pdserve.route.expected_hit_tokens"
EXPECTED_TRANSFER_TOKENS = "pdserve.route.expected_transfer_tokens"
CANDIDATES = "pdserve.route.candidates"  # prefix of parallel arrays: .replica_id, .role, .total_s, ...
RESERVED_BLOCKS = "pdserve.reserve.num_blocks"
EPOCH = "pdserve.reserve.epoch"
TRANSFER_BLOCKS = "pdserve.kv_transfer.num_blocks"
TRANSFER_BYTES = "pdserve.kv_transfer.num_bytes"
TRANSFER_S = "pdserve.kv_transfer.seconds"
TRANSFER_GBPS = "pdserve.kv_transfer.gb_per_s"
TRANSPORT = "pdserve.kv_transfer.transport"
PIPELINED = "pdserve.kv_transfer.pipelined"  # layer i sent while layer i+1 computed
LAYER = "pdserve.kv_transfer.layer_index"
LAYER_S = "pdserve.kv_transfer.layer_seconds"
