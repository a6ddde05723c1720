"""Where a method's own overhead goes: the engine's steps labelled inside torch.profiler.

    python -m st3.bench.profile --layers 4 --new-tokens 16 --json benchmarks/results/profile.json

Runs one vanilla and one method generate under torch.profiler. For the method run, the engine's steps
(decoder layers, per-layer mask building, prefill scoring, top-k selection, row/column gathers, decode
eviction, cache bookkeeping, KV measurement) are wrapped in `record_function` labels for the duration of
the run only, by patching attributes in memory: nothing in st3.engine is edited, and everything is
restored afterwards. Labels nest (a layer's time includes its mask), so totals are inclusive.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from unittest import mock

import torch
from torch.profiler import ProfilerActivity, profile, record_function

import st3
from st3.bench.measure import measure_generate
from st3.bench.shapes import DTYPES, bench_inputs, build_model
from st3.engine.probes import STEPS
from st3.models import spec_for

UPDATE_LABEL = STEPS[-1][2]


def labelled(fn: Callable, label: str) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with record_function(label):
            return fn(*args, **kwargs)

    return wrapper


@contextmanager
def probes(method: st3.Method) -> Iterator[None]:
    """Label the engine's steps (and the method's choices) for the duration of the block."""
    method_steps = ((type(method), "choose", "st3: prefill choice (selector)"),
                    (type(method), "evict", "st3: decode choice (eviction selector)"))  # fmt: skip
    with ExitStack() as stack:
        for owner, name, label in (*STEPS, *method_steps):
            original = getattr(owner, name)
            stack.enter_context(mock.patch.object(owner, name, labelled(original, label)))
        yield


def profiled_run(model, inputs: dict, new_tokens: int, method: st3.Method | None) -> tuple[float, list[dict]]:
    """(wall seconds, per-label rows) of one generate under torch.profiler."""
    with ExitStack() as stack:
        if method is not None:
            stack.enter_context(probes(method))
        else:  # vanilla: only the cache update, the last step
            owner, name, label = STEPS[-1]
            stack.enter_context(mock.patch.object(owner, name, labelled(getattr(owner, name), label)))
        prof = stack.enter_context(profile(activities=[ProfilerActivity.CPU]))
        start = time.perf_counter()
        measure_generate(model, inputs, new_tokens, method)
        wall = time.perf_counter() - start
    rows = []
    for event in prof.key_averages():
        rows.append(
            {
                "name": event.key,
                "calls": event.count,
                "cpu_total_ms": event.cpu_time_total / 1e3,
                "cpu_self_ms": event.self_cpu_time_total / 1e3,
            }
        )
    rows.sort(key=lambda r: r["cpu_total_ms"], reverse=True)
    return wall, rows


def run_profile(
    model_name: str = "llava-1.5-7b",
    layers: int | None = 4,
    batch_size: int = 1,
    new_tokens: int = 16,
    dtype: str = "bf16",
    method_name: str = "st3",
) -> dict:
    """Profile vanilla and `method_name` once each on the same model and prompt."""
    model = build_model(spec_for(model_name, layers), DTYPES[dtype])
    inputs = bench_inputs(model, batch_size)
    measure_generate(model, inputs, 2)  # warm-up (allocator, kernels), unprofiled
    vanilla_wall, vanilla_rows = profiled_run(model, inputs, new_tokens, None)
    method = st3.get(method_name)
    method_wall, method_rows = profiled_run(model, inputs, new_tokens, method)
    return {
        "model": model_name,
        "layers": layers,
        "batch_size": batch_size,
        "new_tokens": new_tokens,
        "dtype": dtype,
        "method": repr(method),
        "threads": torch.get_num_threads(),
        "vanilla_wall_s": vanilla_wall,
        "method_wall_s": method_wall,
        "vanilla_top": vanilla_rows[:25],
        "method_labels": [r for r in method_rows if r["name"].startswith(("st3:", "cache update"))],
        "method_top": method_rows[:40],
    }


def print_profile(result: dict) -> None:
    print(
        f"{result['model']} layers={result['layers']} batch={result['batch_size']} tokens={result['new_tokens']} "
        f"{result['dtype']}: vanilla {result['vanilla_wall_s']:.2f} s, "
        f"{result['method']} {result['method_wall_s']:.2f} s"
    )
    total = result["method_wall_s"] * 1e3
    print(f"{'label':60s} {'calls':>6s} {'total ms':>10s} {'% of run':>8s}")
    for row in result["method_labels"]:
        print(f"{row['name']:60s} {row['calls']:6d} {row['cpu_total_ms']:10.1f} {row['cpu_total_ms'] / total:8.1%}")
    print("\ntop operators (method run):")
    for row in result["method_top"][:25]:
        if not row["name"].startswith(("st3:", "cache update")):
            print(f"{row['name']:60s} {row['calls']:6d} {row['cpu_total_ms']:10.1f} self {row['cpu_self_ms']:10.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llava-1.5-7b")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--method", default="st3")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    result = run_profile(args.model, args.layers, args.batch_size, args.new_tokens, args.dtype, args.method)
    print_profile(result)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
