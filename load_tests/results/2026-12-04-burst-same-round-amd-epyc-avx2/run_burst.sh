#!/usr/bin/env bash
# Issue 15's burst table at 37abee8: engine alone, colocated, 1P1D queue-aware (0 s), vLLM-CPU; 5 rounds
# interleaved, with pdserve's Serve intervals (QUIET_SERVE_ENV); then 3 rounds with Ray's defaults.
set -euo pipefail
cd /tmp/bench
export PYTHONPATH=/tmp/bench/src
. /work/main/.venv/bin/activate
ray stop --force > /dev/null 2>&1 || true
lscpu > /tmp/run10/lscpu.txt
common=(--pin --front haproxy --local-prefill-queue-s 0 --only "colocated|queue-aware"
        --peer vllm=http://127.0.0.1:8100/v1 --peer-model SmolLM2-135M-Instruct-bfloat16)
python load_tests/serving_tax.py --rounds 5 "${common[@]}" --json /tmp/run10/quiet.json 2>&1 | tee /tmp/run10/quiet.txt
ray stop --force > /dev/null 2>&1 || true
RAY_SERVE_CONTROL_LOOP_INTERVAL_S=0.1 RAY_SERVE_METRICS_EXPORT_INTERVAL_MS=100 \
  python load_tests/serving_tax.py --rounds 3 "${common[@]}" --json /tmp/run10/defaults.json 2>&1 | tee /tmp/run10/defaults.txt
