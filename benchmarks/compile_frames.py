"""How many frames torch.compile compiles, token by token, for a pre-decoder method on the stock decoder vs the
model alone: `torch.compile(model.forward)`, a static cache, greedy generate, on the tiny families.

    python benchmarks/compile_frames.py [--backend eager|inductor] [--new-tokens 5] [--method spread]

Prints, per family, dynamo's frame count at each generated token (a LogitsProcessor reads the counter). A
count that stays flat after the first decode step means no recompile per step. Counts, not times.
"""

from __future__ import annotations

import argparse

import torch
from torch._dynamo.testing import CompileCounterWithBackend
from transformers import LogitsProcessor, LogitsProcessorList

import st3
from st3.testing import tiny_inputs, tiny_llava, tiny_qwen_inputs, tiny_qwen_vl

QWEN_BATCH = ((3, 5, "image", (1, 8, 8)), (2, 7, "image", (1, 8, 12)), (4, 2, "video", (2, 8, 8)))
FAMILIES = {
    "llava": lambda: (lambda m: (m, tiny_inputs(m, ((4, 6), (2, 9), (5, 3)))))(tiny_llava()),
    "qwen2.5-vl": lambda: (lambda m: (m, tiny_qwen_inputs(m, QWEN_BATCH)))(tiny_qwen_vl("qwen2.5-vl", layers=6)),
    "qwen3-vl": lambda: (lambda m: (m, tiny_qwen_inputs(m, QWEN_BATCH)))(tiny_qwen_vl("qwen3-vl", layers=6)),
}


class Frames(LogitsProcessor):
    def __init__(self, counter: CompileCounterWithBackend):
        self.counter, self.seen = counter, []

    def __call__(self, input_ids, scores):
        self.seen.append(self.counter.frame_count)
        return scores


def frames(model, inputs: dict, method, backend: str, new_tokens: int) -> list[int]:
    torch._dynamo.reset()
    counter = CompileCounterWithBackend(backend)
    model.forward = torch.compile(model.forward, backend=counter)
    seen = Frames(counter)
    kwargs = {"max_new_tokens": new_tokens, "do_sample": False, "cache_implementation": "static",
              "logits_processor": LogitsProcessorList([seen])}  # fmt: skip
    try:
        with torch.no_grad():
            if method is None:
                model.generate(**inputs, **kwargs)
            else:
                with method(model):
                    model.generate(**inputs, **kwargs)
    finally:
        del model.forward
    return seen.seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="eager", help="torch.compile backend (eager: dynamo only; inductor)")
    parser.add_argument("--new-tokens", type=int, default=5)
    parser.add_argument("--method", default="spread", help="a registered pre-decoder method (budget: 8 tokens)")
    args = parser.parse_args()
    for family, build in FAMILIES.items():
        model, inputs = build()
        method = st3.get(args.method, **{st3.get(args.method).budget_knob: 8})
        alone = frames(model, inputs, None, args.backend, args.new_tokens)
        pruned = frames(model, inputs, method, args.backend, args.new_tokens)
        print(f"{family:12s} model alone {alone}  {args.method} {pruned}", flush=True)


if __name__ == "__main__":
    main()
