#!/usr/bin/env bash
# The GPU runs planned in benchmarks/README.md ("Not done, and why": CUDA), not yet run, in two parts meant
# (by estimate, not measured) to fit a 10-minute slot each:
#   benchmarks/run_gpu.sh 1 OUTDIR   # the CUDA test, then LLaVA-1.5-7B's shape: batch 1 and 8, 64 and 256 tokens
#   benchmarks/run_gpu.sh 2 OUTDIR   # LLaVA-NeXT-7B's 2916 visual tokens and LLaVA-1.5-13B; eager attention
#   benchmarks/run_gpu.sh 3 OUTDIR   # vLLM serving with the st3 plugin (docs/vllm.md): req/s and TTFT at
#                                    # concurrency 1, 8, 32; needs `pip install "st3[vllm]"` and the scenes package,
#                                    # and llava-hf/llava-1.5-7b-hf in the local Hugging Face cache
#   benchmarks/run_gpu.sh 4 OUTDIR   # fast paths (issue 32): the stock decoder under torch.compile with a static
#                                    # cache (CUDA graphs), int8 weights (if torchao is installed), the
#                                    # split-model offload test, and the speed-accuracy frontier at full depth
# Each run writes NAME.json, NAME.png and NAME.txt (the terminal tables) under OUTDIR.
set -u
PART=${1:?part 1, 2, 3 or 4}
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
if [ "$PART" = 3 ]; then
    # Five engines side by side (unpruned and four settings), 15 % of the GPU's memory each; 128 scenes questions
    # per measurement (the images upscaled to 336 px by the processor), 64 new tokens at most.
    stamp "vLLM serving: LLaVA-1.5-7B, unpruned vs spread and stratified at 50 % and 22 %"
    ${PYTHON:-python3} benchmarks/vllm_serving.py --model llava-hf/llava-1.5-7b-hf --dtype bfloat16 --memory 0.15 \
        --no-enforce-eager --max-model-len 2048 --requests 128 --max-tokens 64 --repeats 3 \
        --prompt "USER: <image>\nDescribe the image in detail. ASSISTANT:" \
        --json "$R/gpu-vllm-llava-1.5-7b.json" 2>&1 | grep -v -E "INFO|WARNING" | tail -n 30
    stamp "vLLM serving: Qwen2.5-VL-7B, unpruned vs stratified and lattice at 50 % and 22 % (grid-only rules)"
    ${PYTHON:-python3} benchmarks/vllm_serving.py --model Qwen/Qwen2.5-VL-7B-Instruct \
        --architecture St3Qwen2_5_VLForConditionalGeneration --dtype bfloat16 --memory 0.15 --no-enforce-eager \
        --max-model-len 4096 --requests 128 --max-tokens 64 --repeats 3 \
        --settings none stratified:0.5 stratified:0.22 lattice:0.5 lattice:0.22 \
        --prompt $'<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe the image in detail.<|im_end|>\n<|im_start|>assistant\n' \
        --json "$R/gpu-vllm-qwen2.5-vl-7b.json" 2>&1 | grep -v -E "INFO|WARNING" | tail -n 30
    stamp done
    exit 0
fi
if [ "$PART" = 4 ]; then
    stamp "offload: a model split over CPU and GPU (accelerate), equal to the same model on one device"
    ${PYTHON:-python3} -m pytest -q -p no:cacheprovider tests/engine/test_offload.py -k split 2>&1 | tail -n 5
    for mode in default reduce-overhead; do
        stamp "stock decoder under torch.compile ($mode), static cache: LLaVA-1.5-7B, spread keeping 64 of 576"
        ${PYTHON:-python3} benchmarks/stock_speed.py --device cuda --layers 32 --new-tokens 64 --repeats 3 --warmup 2 \
            --compile --compile-mode $mode --json "$R/gpu-stock-compile-$mode.json" 2>&1 | grep -v -E "^W[0-9]" | tail -n 5
    done
    stamp "stock decoder, eager, dynamic and static caches (the compiled runs' baseline)"
    ${PYTHON:-python3} benchmarks/stock_speed.py --device cuda --layers 32 --new-tokens 64 --repeats 3 --warmup 1 \
        --json "$R/gpu-stock-eager.json" 2>&1 | tail -n 6
    if ${PYTHON:-python3} -c "import torchao" 2>/dev/null; then
        stamp "int8 weight-only (torchao): the model alone vs spread, st3's loop and the stock decoder"
        ${PYTHON:-python3} benchmarks/stock_speed.py --device cuda --layers 32 --new-tokens 64 --repeats 3 --warmup 1 \
            --quantize int8 --json "$R/gpu-stock-int8.json" 2>&1 | tail -n 6
    else
        stamp "int8 weight-only: skipped (torchao is not installed)"
    fi
    stamp "speed-accuracy frontier at LLaVA-1.5-7B's full depth (scenes accuracy joined)"
    $ST3 frontier --device cuda --accuracy benchmarks/scenes-selectors.json --repeats 3 --warmup 1 \
        --json "$R/gpu-frontier-llava-1.5-7b.json" --plot "$R/gpu-frontier-llava-1.5-7b.png" \
        > "$R/gpu-frontier-llava-1.5-7b.txt" 2>&1
    tail -n 60 "$R/gpu-frontier-llava-1.5-7b.txt"
    stamp done
    exit 0
fi
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
