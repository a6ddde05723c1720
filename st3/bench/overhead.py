"""The engine's own per-step cost, where Hugging Face decoding is launch-bound (`st3 bench --overhead`).

    python -m st3.bench.overhead                        # vanilla, no-op, ST3, FastV, PyramidDrop
    python -m st3.bench.overhead -m st3 -m fastv --json out.json

On a GPU at batch 1 a decode step is bound by the host (Python and kernel launches), so every small
operation the engine adds per layer shows up in time per token. This proxy reproduces that regime on a
CPU: a 32-layer LLaVA of hidden size 64 (the arithmetic is negligible, the per-layer call overhead is
not), 144 visual tokens, one thread. Each configuration generates 64 tokens and 1 token; the time per
decode step is (t64 - t1) / 63, the prefill time is t1 (image encoding, prompt forward, first token).
Runs are interleaved (vanilla, method, vanilla, ...) `repeats` times by the benchmark harness
(st3.bench.harness) and medians are reported. Ratios are to vanilla's medians. Each run reads every clock of
the harness: wall time, and CPU time (process or thread: with one torch thread all the work runs on it),
which a busy shared machine disturbs far less; `--clock` picks the one the ratios and targets read.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import st3
from st3.bench.harness import CLOCKS, check_clock, environment, interleaved
from st3.compare import timed_generate
from st3.testing import tiny_inputs, tiny_llava

VANILLA = "vanilla"
#: label -> method factory; `None` is vanilla. The no-op is ST3 with both of its mechanisms off.
CONFIGS = {
    "noop": lambda: st3.ST3(ratio=0.0, anneal_final=1.0),
    "st3": lambda: st3.ST3(),
    "fastv": lambda: st3.FastV(),
    "pyramiddrop": lambda: st3.PyramidDrop(),
}
TARGETS = {"noop": 1.05, "st3": 1.15, "fastv": 1.07, "pyramiddrop": 1.07}
"""Issue 20's targets for the decode-step ratio to vanilla."""
PREFILL_TARGET = ("noop", 1.10)


def proxy_model(layers: int = 32, hidden: int = 64, visual_side: int = 12):
    """The launch-bound proxy: a tiny LLaVA with `layers` decoder layers and visual_side^2 visual tokens."""
    return tiny_llava(layers=layers, hidden=hidden, image_size=8 * visual_side, patch_size=8)


def timed(model, inputs: dict, new_tokens: int, method) -> dict[str, float]:
    """Seconds on each clock of `CLOCKS` of one greedy generate of exactly `new_tokens` tokens."""
    run = timed_generate(
        model,
        inputs,
        method,
        clock=lambda: {name: now() for name, now in CLOCKS.items()},
        sync=model.device.type == "cuda",
        max_new_tokens=new_tokens,
        do_sample=False,
    )
    made = run.output.shape[1] - inputs["input_ids"].shape[1]
    if made != new_tokens:
        raise RuntimeError(f"generate made {made} tokens, not {new_tokens}")
    return {name: run.end[name] - run.start[name] for name in CLOCKS}


def _summary(long: list[float], short: list[float], new_tokens: int) -> dict:
    """Median, min and max decode ms per step, and median prefill ms, of paired long/short runs."""
    steps = [(a - b) / (new_tokens - 1) * 1e3 for a, b in zip(long, short)]
    return {
        "decode_ms_per_step": statistics.median(steps),
        "decode_ms_min": min(steps),
        "decode_ms_max": max(steps),
        "prefill_ms": statistics.median(short) * 1e3,
    }


def run_overhead(
    labels: list[str] | None = None,
    layers: int = 32,
    new_tokens: int = 64,
    repeats: int = 5,
    warmup: int = 1,
    batch_size: int = 1,
    threads: int = 1,
    clock: str = "wall",
    device: str = "cpu",
) -> dict:
    """Interleaved timings of vanilla and each configuration; medians and ratios to vanilla."""
    labels = labels or list(CONFIGS)
    unknown = [label for label in labels if label not in CONFIGS]
    if unknown:
        raise ValueError(f"unknown configuration(s) {unknown}; available: {', '.join(CONFIGS)}")
    torch.set_num_threads(threads)
    check_clock(clock, device)
    started = time.time()
    model = proxy_model(layers).to(device)
    inputs = {k: v.to(device) for k, v in tiny_inputs(model, ((35, 40),) * batch_size).items()}
    entries = [VANILLA, *labels]
    factories = {VANILLA: lambda: None, **CONFIGS}

    def long_and_short(label: str) -> tuple[dict, dict]:
        return timed(model, inputs, new_tokens, factories[label]()), timed(model, inputs, 1, factories[label]())

    samples = interleaved(entries, long_and_short, repeats, warmup, warm=lambda label: timed(model, inputs, 8,
                                                                                              factories[label]()))
    runs = {label: {"long": [long for long, _ in pairs], "short": [short for _, short in pairs]}
            for label, pairs in samples.items()}  # fmt: skip
    rows = {}
    for label in entries:
        long, short = runs[label]["long"], runs[label]["short"]
        per_clock = {name: _summary([r[name] for r in long], [r[name] for r in short], new_tokens) for name in CLOCKS}
        rows[label] = {
            **per_clock[clock],
            "clocks": per_clock,
            "samples_long_s": long,
            "samples_short_s": short,
        }
    base = rows[VANILLA]
    for label in labels:
        row = rows[label]
        for name, summary in row["clocks"].items():
            summary["decode_ratio"] = summary["decode_ms_per_step"] / base["clocks"][name]["decode_ms_per_step"]
            summary["prefill_ratio"] = summary["prefill_ms"] / base["clocks"][name]["prefill_ms"]
        row["decode_ratio"] = row["clocks"][clock]["decode_ratio"]
        row["prefill_ratio"] = row["clocks"][clock]["prefill_ratio"]
        row["decode_target"] = TARGETS.get(label)
    return {
        "meta": {
            **environment(model.device, started),
            "layers": layers,
            "hidden": model.config.text_config.hidden_size,
            "visual_tokens": model.config.image_seq_length,
            "prompt_tokens": int(inputs["input_ids"].shape[1]),
            "batch_size": batch_size,
            "new_tokens": new_tokens,
            "repeats": repeats,
            "warmup": warmup,
            "clock": clock,
            "timing": f"decode = (t{new_tokens} - t1) / {new_tokens - 1} per run, prefill = t1; medians of the "
            "repeats, configurations interleaved",
        },
        "rows": rows,
    }


def print_overhead(result: dict) -> None:
    """One markdown table per clock (the chosen one first)."""
    meta = result["meta"]
    print(
        f"launch-bound proxy: {meta['layers']} layers, hidden {meta['hidden']}, {meta['visual_tokens']} visual tokens, "
        f"batch {meta['batch_size']}, {meta['threads']} thread(s), median of {meta['repeats']}"
    )
    for name in sorted(CLOCKS, key=lambda name: name != meta["clock"]):
        print(f"\n{name} clock:\n")
        print("| config | decode ms/step [min-max] | decode x | target | prefill ms | prefill x |")
        print("| --- | --- | --- | --- | --- | --- |")
        for label, row in result["rows"].items():
            summary = row["clocks"][name]
            ratio = f"{summary['decode_ratio']:.3f}" if "decode_ratio" in summary else "1"
            target = f"<= {row['decode_target']}" if row.get("decode_target") else "-"
            prefill = f"{summary['prefill_ratio']:.3f}" if "prefill_ratio" in summary else "1"
            spread = f"{summary['decode_ms_min']:.2f}-{summary['decode_ms_max']:.2f}"
            print(
                f"| {label} | {summary['decode_ms_per_step']:.2f} [{spread}] | {ratio} | {target} "
                f"| {summary['prefill_ms']:.1f} | {prefill} |"
            )


def overhead(labels: list[str] | None = None, json_path: str | None = None, **options) -> dict:
    """Run the proxy (`run_overhead`'s options), print its tables, and write the JSON when asked."""
    result = run_overhead(labels, **options)
    print_overhead(result)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=1) + "\n")
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-m", "--method", action="append", choices=sorted(CONFIGS), help="repeatable; default: all")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", default="wall", help="wall, process or thread (CPU time: robust when shared)")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda: the real launch-bound case")
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    if args.new_tokens < 2:
        parser.error("--new-tokens must be >= 2")
    options = {k: getattr(args, k) for k in ("layers", "new_tokens", "repeats", "warmup", "batch_size", "threads",
                                             "clock", "device")}  # fmt: skip
    try:
        return overhead(args.method, args.json or None, **options)
    except ValueError as error:
        parser.error(str(error))


if __name__ == "__main__":
    main()
