"""Torch operations issued per decode forward of the decoder stack, 32-layer launch-bound proxy, batch 1.

    .venv/bin/python benchmarks/overhead_ops.py

A deterministic companion of the timed proxy (`st3 bench --overhead`), counted by `st3.bench.ops` (the
counter tests/engine/test_overhead.py asserts with). Prints the count of each of 16 decode forwards for vanilla,
the no-op, ST3 and FastV at their defaults, for ST3 the operations an eviction step adds, by name, and
each stack's operations over the 63 decode steps of a 64-token run as a ratio to vanilla's.
"""

import torch

import st3
from st3.bench.ops import decode_ops
from st3.testing import tiny_inputs, tiny_llava


def main() -> None:
    torch.set_num_threads(1)
    model = tiny_llava(layers=32, hidden=64, image_size=96, patch_size=8)  # st3.bench.overhead's proxy
    inputs = tiny_inputs(model, ((35, 40),))
    configs = {
        "vanilla": lambda: None,
        "noop": lambda: st3.ST3(ratio=0.0, anneal_final=1.0),
        "st3": st3.ST3,
        "fastv": st3.FastV,
    }
    for label, make in configs.items():
        counts = decode_ops(model, inputs, make(), new_tokens=17)
        print(f"{label:8s} operations per decode forward: {[c.total() for c in counts]}")
        if label == "st3":
            extra = counts[3] - counts[2]  # step 4 evicts, step 3 does not
            print(f"         an eviction step adds {extra.total()}: {dict(extra.most_common(12))}")
    totals = {label: sum(c.total() for c in decode_ops(model, inputs, make(), 64)) for label, make in configs.items()}
    for label, total in totals.items():
        ratio = total / totals["vanilla"]
        print(f"{label:8s} operations over a 64-token run (63 decode steps): {total} = {ratio:.3f}x vanilla")


if __name__ == "__main__":
    main()
