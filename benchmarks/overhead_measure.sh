#!/bin/bash
# Issue 20's recorded figures: the launch-bound proxy, syncs per decode forward and the 8-layer 7B-shape
# block, each for the code before (a checkout of main at f30d291 in $BEFORE) and after (this tree).
# Run under /work/bin/quiet on a shared machine:  BEFORE=/tmp/before benchmarks/overhead_measure.sh
# $BEFORE is made with `git archive f30d291 | tar -x -C $BEFORE`; benchmarks/overhead_run_with.py runs a
# module or script against it (the editable install would otherwise import this tree).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
R=benchmarks/results
WITH="$PY benchmarks/overhead_run_with.py $BEFORE"
$WITH st3/bench/overhead.py --clock thread --json $R/overhead-proxy-before.json | tee $R/overhead-proxy-before.txt
$PY -m st3.bench.overhead --clock thread --json $R/overhead-proxy-after.json | tee $R/overhead-proxy-after.txt
$WITH benchmarks/overhead_syncs.py | tee $R/overhead-syncs-before.txt
$PY benchmarks/overhead_syncs.py | tee $R/overhead-syncs-after.txt
B7="bench --layers 8 --dtype fp32 --clock process --threads 1 --batch-sizes 1 --new-tokens 16 --repeats 2 --warmup 1 -m st3"
$WITH -m st3.cli $B7 --json $R/overhead-7b-l8-before.json | tee $R/overhead-7b-l8-before.txt
$PY -m st3.cli $B7 --json $R/overhead-7b-l8-after.json | tee $R/overhead-7b-l8-after.txt
