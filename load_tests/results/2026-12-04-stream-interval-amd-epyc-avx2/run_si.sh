#!/usr/bin/env bash
# Colocated with 1 and 4 tokens per streamed message beside the engine alone; 3 rounds interleaved (frozen tree at cfcc9b7).
set -euo pipefail
cd /tmp/bench
export PYTHONPATH=/tmp/bench/src
. /work/main/.venv/bin/activate
ray stop --force > /dev/null 2>&1 || true
python -u load_tests/serving_tax.py --rounds 3 --pin --front haproxy --skip-disaggregated --stream-interval 4 \
  --json /tmp/run13/si.json > /tmp/run13/si.txt 2>&1
echo done > /tmp/run13/done
