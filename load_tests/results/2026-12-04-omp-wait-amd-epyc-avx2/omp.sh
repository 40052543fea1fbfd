#!/usr/bin/env bash
set -uo pipefail
cd /tmp/bench
export PYTHONPATH=/tmp/bench/src
. /work/main/.venv/bin/activate
common=(--pin --front haproxy --only "colocated" --skip-disaggregated)
for policy in default passive default passive; do
  ray stop --force > /dev/null 2>&1 || true
  if [ $policy = passive ]; then export OMP_WAIT_POLICY=PASSIVE; else unset OMP_WAIT_POLICY; fi
  python load_tests/serving_tax.py --rounds 2 "${common[@]}" --json /tmp/run11/omp-$policy-$SECONDS.json > /tmp/run11/omp-$policy-$SECONDS.txt 2>&1
done
echo done > /tmp/run11/omp.done
