#!/usr/bin/env bash
set -uo pipefail
cd /tmp/bench
export PYTHONPATH=/tmp/bench/src
. /work/main/.venv/bin/activate
for spin in default 30000 default 30000; do
  ray stop --force > /dev/null 2>&1 || true
  if [ $spin = default ]; then unset GOMP_SPINCOUNT; else export GOMP_SPINCOUNT=$spin; fi
  python -u load_tests/serving_tax.py --rounds 2 --pin --front haproxy --only colocated --skip-disaggregated --json /tmp/run11/spin-$spin-$SECONDS.json > /tmp/run11/spin-$spin-$SECONDS.txt 2>&1
done
echo done > /tmp/run11/spin.done
