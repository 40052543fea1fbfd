#!/usr/bin/env bash
# Issue 15's burst table at cfcc9b7 (serving_tax names the rest's processes and reports steal): engine alone,
# colocated, 1P1D queue-aware (0 s), vLLM-CPU; 5 rounds interleaved.
set -euo pipefail
cd /tmp/bench
export PYTHONPATH=/tmp/bench/src
. /work/main/.venv/bin/activate
ray stop --force > /dev/null 2>&1 || true
lscpu > /tmp/run12/lscpu.txt
python -u load_tests/serving_tax.py --rounds 5 --pin --front haproxy --local-prefill-queue-s 0 --only "colocated|queue-aware" \
  --peer vllm=http://127.0.0.1:8100/v1 --peer-model SmolLM2-135M-Instruct-bfloat16 --json /tmp/run12/burst.json 2>&1 \
  | while IFS= read -r l; do echo "$(date +%s) $l"; done > /tmp/run12/burst.txt
echo done > /tmp/run12/done
