"""Does `torch.compile` of the decoder layers (not st3's loop) speed up an in-decoder method on CPU?

    python benchmarks/compile_layers.py [--layers 4] [--repeats 5] [--new-tokens 16] [--backend inductor]

A LLaVA with a truncated real decoder shape (Qwen2-0.5B's widths: hidden 896, 14 heads, 2 KV heads, MLP 4864; a
224 px image = 256 visual tokens; random weights, fp32, batch 1) runs greedy generate under st3's loop with each
method, its decoder layers eager or compiled in place (`module.compile(dynamic=True)`: st3's loop changes shapes
at every pruning layer and every decode step). Each variant is warmed up once (compilation included there), then
the variants alternate for `repeats` rounds; printed: the median prefill and generate times, and the largest
logit difference compiled vs eager (the eager run is the one the masked reference proves). Wall-clock times on
whatever machine runs it: on a shared machine, read them with the load in mind.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import st3
from st3.adapters import adapter_for
from st3.testing import tiny_inputs, tiny_llava

METHODS = {
    "fastv": lambda: st3.FastV(layer=2, ratio=0.5),
    "st3-annealing": lambda: st3.ST3(start_layer=2, stride=1, ratio=0.5, anneal_steps=8, anneal_every=2),
}


def build(layers: int):
    model = tiny_llava(layers=layers, hidden=896, heads=14, kv_heads=2, vocab=1024, image_size=224, patch_size=14,
                       intermediate_size=4864)  # fmt: skip
    return model, tiny_inputs(model, ((20, 12),))


def run(model, inputs: dict, method, new_tokens: int) -> tuple[float, float, torch.Tensor]:
    """(prefill seconds, generate seconds, logits [T, V]) of one greedy generate."""
    kwargs = dict(do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad(), method(model):
        start = time.perf_counter()
        model.generate(**inputs, max_new_tokens=1, **kwargs)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        out = model.generate(**inputs, max_new_tokens=new_tokens, **kwargs)
        total = time.perf_counter() - start
    return prefill, total, torch.cat(out.logits)


def set_compiled(model, compiled: bool, backend: str) -> None:
    for layer in adapter_for(model).layers:
        if compiled:
            layer.compile(dynamic=True, backend=backend)
        else:
            layer._compiled_call_impl = None  # what `Module.compile` set: the module's own call again


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--methods", default=",".join(METHODS))
    args = parser.parse_args()
    torch.manual_seed(0)
    model, inputs = build(args.layers)
    print(f"prompt {inputs['input_ids'].shape[1]} tokens, {args.layers} layers, {args.new_tokens} new tokens, "
          f"threads {torch.get_num_threads()}, backend {args.backend}")  # fmt: skip
    for name in args.methods.split(","):
        times: dict[bool, list] = {False: [], True: []}
        logits = {}
        for compiled in (False, True):  # warm-up (compilation) and the logits to compare
            set_compiled(model, compiled, args.backend)
            start = time.perf_counter()
            logits[compiled] = run(model, inputs, METHODS[name](), args.new_tokens)[2]
            print(f"{name}: warm-up {'compiled' if compiled else 'eager'} {time.perf_counter() - start:.1f} s")
        for _ in range(args.repeats):
            for compiled in (False, True):
                set_compiled(model, compiled, args.backend)
                prefill, total, _ = run(model, inputs, METHODS[name](), args.new_tokens)
                times[compiled].append((prefill, total))
        set_compiled(model, False, args.backend)
        diff = (logits[True] - logits[False]).abs().max().item()
        for compiled in (False, True):
            prefill = statistics.median(t[0] for t in times[compiled])
            total = statistics.median(t[1] for t in times[compiled])
            print(f"{name:14s} {'compiled' if compiled else 'eager':9s} prefill {prefill * 1e3:8.1f} ms   "
                  f"generate {total * 1e3:8.1f} ms   (median of {args.repeats})")  # fmt: skip
        print(f"{name:14s} max |logit compiled - eager| = {diff:.2e}")


if __name__ == "__main__":
    main()
