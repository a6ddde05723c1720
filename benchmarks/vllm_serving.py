"""Serving throughput and time to first token in vLLM, unpruned vs st3's rules through the vLLM plugin.

    python benchmarks/vllm_serving.py                                   # CPU: the shipped scenes model
    python benchmarks/vllm_serving.py --model llava-hf/llava-1.5-7b-hf --dtype bfloat16 --max-tokens 64 \\
        --memory 0.15 --json gpu-llava.json                              # GPU (benchmarks/run_gpu.sh 3)

One AsyncLLM engine per setting (unpruned: the plugin's architecture at keep = every token, so both run the
same code but for the rule), all started before measuring. A measurement sends `--requests` scenes questions
(a different image each) with at most C in flight and records requests/s (requests / wall time) and each
request's time to first token (submission to its first output); settings and concurrencies are interleaved,
repeated `--repeats` times after one warm-up round, and the median of the repeats is reported. Answers are
scored against the scenes ground truth (meaningful for the scenes model only).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid


def settings(specs: list[str]) -> list[tuple[str, dict | None]]:
    """'none' or 'rule:keep' (keep a share in (0, 1) or a count) -> (label, the plugin's st3 setting)."""
    out = []
    for spec in specs:
        if spec == "none":
            out.append(("unpruned", {"method": "raster", "keep": 1.0}))  # every token, through the same code
            continue
        rule, keep = spec.split(":")
        out.append((spec, {"method": rule, "keep": float(keep) if "." in keep else int(keep)}))
    return out


def start(model: str, setting: dict, args):
    from vllm import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    overrides = {"architectures": [args.architecture], "st3": setting}
    if args.positions == "original":  # vLLM's per-request position table (docs/vllm.md): LLaVA keeps original ones
        overrides["rope_parameters"] = {"rope_type": "default", "mrope_section": [1, 1, 1]}
    engine_args = AsyncEngineArgs(
        model=model,
        dtype=args.dtype,
        enforce_eager=args.enforce_eager,
        max_model_len=args.max_model_len,
        limit_mm_per_prompt={"image": 1},
        **({} if args.memory is None else {"gpu_memory_utilization": args.memory}),
        kv_cache_memory_bytes=args.kv_bytes,
        enable_prefix_caching=False,  # every request a fresh image: measure the prefill, not the cache
        hf_overrides=overrides,
        disable_log_stats=True,
    )
    return AsyncLLM.from_engine_args(engine_args)


async def one(engine, request: dict, params) -> tuple[float, str]:
    begin = time.perf_counter()
    first = None
    text = ""
    async for out in engine.generate(request, params, request_id=uuid.uuid4().hex):
        if first is None:
            first = time.perf_counter() - begin
        text = out.outputs[0].text
    return first, text


async def measure(engine, requests: list[dict], concurrency: int, params) -> tuple[float, list[float], list[str]]:
    gate = asyncio.Semaphore(concurrency)

    async def bounded(request):
        async with gate:
            return await one(engine, request, params)

    begin = time.perf_counter()
    results = await asyncio.gather(*(bounded(r) for r in requests))
    wall = time.perf_counter() - begin
    return len(requests) / wall, [r[0] for r in results], [r[1] for r in results]


async def main_async(args) -> dict:
    from vllm import SamplingParams

    from st3_scenes.processor import prompt
    from st3_scenes.tasks import example

    model = args.model or str(__import__("st3_scenes").MODEL_DIR)
    examples = [example("test", args.start + n) for n in range(args.requests)]
    question = (lambda qa: prompt(qa.question)) if args.prompt is None else (lambda qa: args.prompt)
    requests = [{"prompt": question(qa), "multi_modal_data": {"image": qa.image}} for qa in examples]
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    engines = {label: start(model, setting, args) for label, setting in settings(args.settings)}
    rows: dict = {
        label: {c: {"rps": [], "ttft_p50": [], "ttft_p90": []} for c in args.concurrency} for label in engines
    }
    correct: dict = {}
    for round_ in range(args.repeats + 1):  # round 0 warms every engine and shape up, unrecorded
        for c in args.concurrency:
            for label, engine in engines.items():
                rps, ttft, answers = await measure(engine, requests, c, params)
                if round_ == 0:
                    correct[label] = sum(a.strip() == qa.answer for a, qa in zip(answers, examples)) / len(examples)
                    continue
                ttft.sort()
                rows[label][c]["rps"].append(rps)
                rows[label][c]["ttft_p50"].append(statistics.median(ttft))
                rows[label][c]["ttft_p90"].append(ttft[int(0.9 * (len(ttft) - 1))])
                print(
                    f"round {round_} c={c:>2} {label:>16}: {rps:7.2f} req/s, TTFT p50 {statistics.median(ttft):.3f} s"
                )
    for engine in engines.values():
        engine.shutdown()
    return {"model": model, "args": vars(args), "accuracy": correct, "rows": rows}


def table(result: dict) -> str:
    concurrency = result["args"]["concurrency"]
    head = "| setting | answers right | " + " | ".join(f"req/s @{c} | TTFT p50 @{c}" for c in concurrency) + " |"
    lines = [head, "|" + " --- |" * (2 + 2 * len(concurrency))]
    for label, by_c in result["rows"].items():
        cells = []
        for c in concurrency:
            cells += [
                f"{statistics.median(by_c[c]['rps']):.2f}",
                f"{1000 * statistics.median(by_c[c]['ttft_p50']):.0f} ms",
            ]
        lines.append(f"| {label} | {100 * result['accuracy'][label]:.0f} % | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint (default: the scenes model)")
    parser.add_argument("--architecture", default="St3LlavaForConditionalGeneration",
                        help="the plugin's class (St3Qwen2_5_VLForConditionalGeneration for Qwen2.5-VL)")  # fmt: skip
    parser.add_argument("--settings", nargs="+", default=["none", "spread:0.5", "spread:0.22", "stratified:0.5",
                                                          "stratified:0.22"])  # fmt: skip
    parser.add_argument("--positions", choices=("consecutive", "original"), default="consecutive",
                        help="LLaVA: kept tokens at consecutive or original positions (grid-decided rules only)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--start", type=int, default=0, help="first scenes test question")
    parser.add_argument("--prompt", default=None, help="one prompt for every image (default: the scenes questions)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--memory", type=float, default=None, help="gpu_memory_utilization per engine (GPU)")
    parser.add_argument("--kv-bytes", type=int, default=None, help="KV cache bytes per engine (CPU: 2**28)")
    parser.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    result = asyncio.run(main_async(args))
    print(table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
