#!/usr/bin/env bash
# The GPU runs planned in benchmarks/README.md ("Not done, and why": CUDA), not yet run, in two parts meant
# (by estimate, not measured) to fit a 10-minute slot each:
#   benchmarks/run_gpu.sh 1 OUTDIR   # the CUDA test, then LLaVA-1.5-7B's shape: batch 1 and 8, 64 and 256 tokens
#   benchmarks/run_gpu.sh 2 OUTDIR   # LLaVA-NeXT-7B's 2916 visual tokens and LLaVA-1.5-13B; eager attention
# Each run writes NAME.json, NAME.png and NAME.txt (the terminal tables) under OUTDIR.
set -u
PART=${1:?part 1 or 2}
R=${2:-benchmarks/results}
mkdir -p "$R"
export PYTHONUNBUFFERED=1
ST3="${PYTHON:-python3} -m st3"
stamp() { echo "== $(date -u +%FT%TZ) :: $*"; }
bench() {  # NAME ARGS...
    local name=$1; shift
    stamp "$name: st3 bench $*"
    $ST3 bench --device cuda --dtype bf16 "$@" --json "$R/$name.json" --plot "$R/$name.png" > "$R/$name.txt" 2>&1
    tail -n 40 "$R/$name.txt"
}
PEERS=(-m st3 -m fastv:match -m pyramiddrop:match -m visionzip:match)

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
${PYTHON:-python3} -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
if [ "$PART" = 1 ]; then
    stamp "CUDA test: sdpa (and FlashAttention-2 if installed) vs eager under pruning"
    ${PYTHON:-python3} -m pytest -q -p no:cacheprovider tests/engine/test_gpu.py 2>&1 | tail -n 5
    stamp "launch-bound overhead proxy on the GPU (issue 20): engine vs vanilla per decode step"
    $ST3 bench --overhead --device cuda --repeats 5 --json "$R/gpu-overhead.json" > "$R/gpu-overhead.txt" 2>&1
    tail -n 20 "$R/gpu-overhead.txt"
    bench gpu-7b-b1-b8-n64 --batch-sizes 1,8 --new-tokens 64 --repeats 3 --warmup 1 "${PEERS[@]}"
    bench gpu-7b-b1-b8-n256 --batch-sizes 1,8 --new-tokens 256 --repeats 3 --warmup 1 -m st3
else
    bench gpu-next7b-b1-b8-n64 --model llava-next-7b --batch-sizes 1,8 --new-tokens 64 --repeats 3 --warmup 1 "${PEERS[@]}"
    bench gpu-13b-b1-n64 --model llava-1.5-13b --batch-sizes 1 --new-tokens 64 --repeats 3 --warmup 1 -m st3
    bench gpu-7b-eager-b1-n64 --attn eager --batch-sizes 1 --new-tokens 64 --repeats 3 --warmup 1 -m st3
fi
stamp done
