#!/usr/bin/env bash
# lend_idle_cores with the decode replica's side threads free over both cores, the prefill's on its own: the burst
# A/B (queue-aware 1P1D with and without lending), then the mixed workload at 0.30 and 0.82 req/s with lending.
set -euo pipefail
cd /tmp/bench
export PYTHONPATH=/tmp/bench/src
ray stop --force > /dev/null 2>&1 || true
python load_tests/serving_tax.py --rounds 2 --pin --lend-cores --front haproxy --local-prefill-queue-s 0 \
    --only "queue-aware" --json /tmp/run8/serving_tax.json
C="--pin --workload mixed --long-share 0.2 --duration-s 120 --burst-size 2
   --max-prompt 2048 --max-output 128 --ttft-slo-s 10 --tpot-slo-s 0.1 --seed 7 --quiet"
ray stop --force > /dev/null 2>&1 || true
python load_tests/harness.py --serve 1p1d $C --sweep 0.3,0.82 --config '{"lend_idle_cores": true}' --out /tmp/run8/1p1d-lent
