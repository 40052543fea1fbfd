#!/usr/bin/env bash
set -uo pipefail
cd /tmp/bench
export PYTHONPATH=/tmp/bench/src
. /work/main/.venv/bin/activate
ray stop --force > /dev/null 2>&1 || true
python -u load_tests/serving_tax.py --rounds 3 --pin --front haproxy --only colocated --skip-disaggregated --json /tmp/run11/rest.json > /tmp/run11/rest.txt 2>&1
echo done > /tmp/run11/rest.done
