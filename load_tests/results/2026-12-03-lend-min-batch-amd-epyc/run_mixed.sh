#!/usr/bin/env bash
# The mixed workload at 0.30 and 0.82 req/s: 1P1D lending with lend_min_batch 4, and 1P1D without lending, same run.
set -euo pipefail
cd /tmp/bench
export PYTHONPATH=/tmp/bench/src
. /work/main/.venv/bin/activate
C="--pin --workload mixed --long-share 0.2 --duration-s 120 --burst-size 2
   --max-prompt 2048 --max-output 128 --ttft-slo-s 10 --tpot-slo-s 0.1 --seed 7 --quiet"
ray stop --force > /dev/null 2>&1 || true
python load_tests/harness.py --serve 1p1d $C --sweep 0.3,0.82 --config '{"lend_idle_cores": true}' --out /tmp/run9/1p1d-lent
ray stop --force > /dev/null 2>&1 || true
python load_tests/harness.py --serve 1p1d $C --sweep 0.3,0.82 --out /tmp/run9/1p1d
