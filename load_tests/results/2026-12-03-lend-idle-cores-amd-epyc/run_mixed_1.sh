#!/usr/bin/env bash
# Mixed workload (chat + long-prompt bursts): colocated vs 1P1D vs 1P1D lending idle cores; one machine, one run.
set -euo pipefail
cd /tmp/bench
export PYTHONPATH=/tmp/bench/src
C="--pin --workload mixed --long-share 0.2 --goodput 0.3,2.4 --goodput-steps 3 --duration-s 120 --burst-size 2
   --max-prompt 2048 --max-output 128 --ttft-slo-s 10 --tpot-slo-s 0.1 --seed 7 --quiet"
for mode in colocated 1p1d; do
  ray stop --force > /dev/null 2>&1 || true
  python load_tests/harness.py --serve $mode $C --out /tmp/run6/$mode
done
ray stop --force > /dev/null 2>&1 || true
python load_tests/harness.py --serve 1p1d $C --config '{"lend_idle_cores": true}' --out /tmp/run6/1p1d-lent
python load_tests/harness.py --replot colocated=/tmp/run6/colocated 1P1D=/tmp/run6/1p1d "1P1D lent=/tmp/run6/1p1d-lent" --out /tmp/run6
