#!/usr/bin/env bash
# The runs recorded in benchmarks/README.md, in order. Each writes JSON/PNG/text under benchmarks/results/.
# Started with:  nohup benchmarks/run_recorded.sh > benchmarks/results/run_recorded.log 2>&1 &
set -u
cd "$(dirname "$0")/.."
R=benchmarks/results
ST3=.venv/bin/st3
stamp() { echo "== $(date -u +%FT%TZ) load: $(cut -d' ' -f1-3 /proc/loadavg) :: $*"; }

stamp "bf16 vs fp32 matmul on this CPU"
.venv/bin/python - > $R/matmul-dtype.txt 2>&1 <<'PY'
import time, torch
import torch.nn.functional as F
print("threads", torch.get_num_threads())
for rows in (651, 1):
    for dtype in (torch.float32, torch.bfloat16):
        x, w = torch.randn(rows, 4096).to(dtype), (torch.randn(11008, 4096) * 0.02).to(dtype)
        F.linear(x, w)
        times = []
        for _ in range(5):
            t = time.perf_counter(); F.linear(x, w); times.append(time.perf_counter() - t)
        t = sorted(times)[2]
        print(f"{rows:4d} x 4096 @ 4096 x 11008 {str(dtype):15s} median {t * 1e3:8.1f} ms  {2 * rows * 4096 * 11008 / t / 1e9:6.1f} GFLOP/s")
PY

stamp "profile: 7B shape, 4 layers, batch 1, 16 tokens"
.venv/bin/python -m st3.bench.profile --layers 4 --new-tokens 16 --json $R/profile-7b-l4-b1.json > $R/profile-7b-l4-b1.txt 2>&1

stamp "R1: batch 1, 64 tokens, warmup 1, repeats 2"
$ST3 bench --layers 4 --method st3 --batch-sizes 1 --new-tokens 64 --repeats 2 --warmup 1 \
  --json $R/7b-l4-b1-n64.json --plot $R/7b-l4-b1-n64.png > $R/7b-l4-b1-n64.txt

stamp "R2: batch 1, 256 tokens, warmup 0, repeats 1"
$ST3 bench --layers 4 --method st3 --batch-sizes 1 --new-tokens 256 --repeats 1 --warmup 0 \
  --json $R/7b-l4-b1-n256.json --plot $R/7b-l4-b1-n256.png > $R/7b-l4-b1-n256.txt

stamp "R3: batch 8, 16 tokens, warmup 0, repeats 1"
$ST3 bench --layers 4 --method st3 --batch-sizes 8 --new-tokens 16 --repeats 1 --warmup 0 \
  --json $R/7b-l4-b8-n16.json --plot $R/7b-l4-b8-n16.png > $R/7b-l4-b8-n16.txt

stamp "done"
