#!/usr/bin/env bash
# 1P1D lending idle cores, after its fixes (threads of the step pinned; the rest on the replica's own cores), then the
# serving-tax A/B (queue-aware 1P1D with and without lending), one machine, one run.
set -euo pipefail
cd /tmp/bench
export PYTHONPATH=/tmp/bench/src
C="--pin --workload mixed --long-share 0.2 --goodput 0.3,2.4 --goodput-steps 3 --duration-s 120 --burst-size 2
   --max-prompt 2048 --max-output 128 --ttft-slo-s 10 --tpot-slo-s 0.1 --seed 7 --quiet"
ray stop --force > /dev/null 2>&1 || true
python load_tests/harness.py --serve 1p1d $C --config '{"lend_idle_cores": true}' --out /tmp/run7/1p1d-lent
ray stop --force > /dev/null 2>&1 || true
python load_tests/serving_tax.py --rounds 4 --pin --lend-cores --front haproxy --local-prefill-queue-s 0 \
    --only "queue-aware" --json /tmp/run7/serving_tax.json
