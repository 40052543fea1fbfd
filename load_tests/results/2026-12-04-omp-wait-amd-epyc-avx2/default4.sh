#!/usr/bin/env bash
set -uo pipefail
cd /tmp/bench
export PYTHONPATH=/tmp/bench/src
. /work/main/.venv/bin/activate
ray stop --force > /dev/null 2>&1 || true
python -u load_tests/serving_tax.py --rounds 4 --pin --front haproxy --only colocated --skip-disaggregated --json /tmp/run11/def4.json 2>&1 | while IFS= read -r l; do echo "$(date +%s) $l"; done > /tmp/run11/def4.txt
echo done > /tmp/run11/def4.done
