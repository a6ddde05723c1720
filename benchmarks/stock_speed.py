"""End-to-end generate time of a pre-decoder method on the stock decoder vs st3's loop vs the model alone, with a
dynamic and a static cache, at a real model's shape (random weights; speed does not depend on them).

    python benchmarks/stock_speed.py [--model llava-1.5-7b] [--layers 4] [--keep 64] [--new-tokens 8]
                                     [--repeats 3] [--warmup 1] [--dtype bf16] [--device cpu] [--json out.json]
                                     [--compile [--compile-mode reduce-overhead]] [--quantize int8]

Entries run interleaved (A B C ... A B C) after untimed warm-up rounds; medians of wall-clock seconds per
generate (image encoding included), and the ratio of each to the model alone with the same cache.
`--compile` compiles `model.forward` (what users do with a static cache; `reduce-overhead` adds CUDA graphs on a
GPU) and times the static-cache entries only, the model alone and the method on the stock decoder (st3's own loop
refuses a compiled forward); the warm-up rounds then include compilation. `--quantize int8` quantizes the decoder's
linear layers with torchao's int8 weight-only config first (needs torchao). Compiling a 7B-shaped decoder with
inductor on a small CPU takes longer than the run: the compiled entries are meant for a GPU (benchmarks/run_gpu.sh).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import st3
from st3.bench.harness import interleaved, spread
from st3.bench.shapes import DTYPES, bench_inputs, build_model, truncate
from st3.models import spec_for

ENTRIES = (
    ("alone", "dynamic"), ("alone", "static"),
    ("engine", "dynamic"), ("stock", "dynamic"), ("stock", "static"),
)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llava-1.5-7b")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers kept (the first ones)")
    parser.add_argument("--method", default="spread")
    parser.add_argument("--keep", type=int, default=64, help="visual tokens kept (of 576)")
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--compile", action="store_true", help="torch.compile(model.forward), static caches only")
    parser.add_argument("--compile-mode", default="default", help="torch.compile mode (e.g. reduce-overhead)")
    parser.add_argument("--quantize", default="none", choices=("none", "int8"), help="int8: torchao weight-only")
    parser.add_argument("--json")
    args = parser.parse_args()
    model = build_model(spec_for(args.model), DTYPES[args.dtype], device=args.device)
    truncate(model, args.layers)
    if args.quantize == "int8":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(model.model.language_model, Int8WeightOnlyConfig())
    entries = [e for e in ENTRIES if e[1] == "static" or not args.compile]
    if args.compile:
        model.forward = torch.compile(model.forward, mode=args.compile_mode)
    inputs = bench_inputs(model, 1)

    def run(entry: tuple[str, str]) -> float:
        path, cache = entry
        kwargs = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens, "do_sample": False}
        if cache == "static":
            kwargs["cache_implementation"] = "static"
        start = time.perf_counter()
        with torch.no_grad():
            if path == "alone":
                model.generate(**inputs, **kwargs)
            else:
                method = st3.get(args.method, **{st3.get(args.method).budget_knob: args.keep})
                with method(model, decoder=path):
                    model.generate(**inputs, **kwargs)
        if args.device != "cpu":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    samples = interleaved(entries, run, args.repeats, args.warmup)
    medians = {entry: spread(values)["median"] for entry, values in samples.items()}
    rows = []
    for (path, cache), median in medians.items():
        ratio = medians[("alone", cache)] / median
        rows.append({"path": path, "cache": cache, "seconds": spread(samples[(path, cache)]), "speedup": ratio})
        print(f"{path:7s} {cache:8s} median {median:7.3f} s  x{ratio:.2f} vs the model alone ({cache})", flush=True)
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"args": vars(args), "prompt_tokens": int(inputs["input_ids"].shape[1]), "rows": rows}, out,
                      indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
