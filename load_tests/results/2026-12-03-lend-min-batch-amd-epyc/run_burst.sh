#!/usr/bin/env bash
# Issue 15's burst table at c23af33: engine alone, colocated, 1P1D queue-aware with and without lending
# (lend_min_batch 4), vLLM-CPU; 3 rounds interleaved.
set -euo pipefail
cd /tmp/bench
export PYTHONPATH=/tmp/bench/src
. /work/main/.venv/bin/activate
ray stop --force > /dev/null 2>&1 || true
lscpu > /tmp/run9/lscpu.txt
python load_tests/serving_tax.py --rounds 3 --pin --lend-cores --front haproxy --local-prefill-queue-s 0 \
    --only "colocated|queue-aware" \
    --peer vllm=http://127.0.0.1:8100/v1 --peer-model SmolLM2-135M-Instruct-bfloat16 --json /tmp/run9/serving_tax.json
