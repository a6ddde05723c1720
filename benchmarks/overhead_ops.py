"""Torch operations issued per decode forward of the decoder stack, 32-layer launch-bound proxy, batch 1.

    .venv/bin/python benchmarks/overhead_ops.py

A deterministic companion of the timed proxy (`st3 bench --overhead`): on a launch-bound GPU each torch
call is one kernel launch or more, so the count per step is what the engine adds to vanilla's, free of
the noise of a shared machine. Prints the count of each of 16 decode forwards for vanilla, the no-op,
ST3 and FastV at their defaults, and for ST3 the operations an eviction step adds, by name.
"""

import collections
import contextlib

import torch
from torch.overrides import TorchFunctionMode

import st3
from st3.testing import tiny_inputs, tiny_llava


class Ops(TorchFunctionMode):
    """Counts torch functions and tensor methods by name (attribute reads excluded)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: collections.Counter = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if name != "__get__":
            self.names[name] += 1
        return func(*args, **(kwargs or {}))


def per_forward(model, inputs, method) -> list[collections.Counter]:
    lm, counts = model.model.language_model, []
    with torch.no_grad(), method(model) if method is not None else contextlib.nullcontext():
        forward = lm.forward

        def counted(*args, **kwargs):
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            if cache is None or cache.get_seq_length() == 0:
                return forward(*args, **kwargs)
            with Ops() as ops:
                out = forward(*args, **kwargs)
            counts.append(ops.names)
            return out

        lm.forward = counted
        try:
            model.generate(**inputs, max_new_tokens=17, do_sample=False)
        finally:
            if method is None:
                del lm.forward
            else:
                lm.forward = forward
    return counts


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
        counts = per_forward(model, inputs, make())
        print(f"{label:8s} operations per decode forward: {[sum(c.values()) for c in counts]}")
        if label == "st3":
            extra = counts[3] - counts[2]  # step 4 evicts, step 3 does not
            print(f"         an eviction step adds {sum(extra.values())}: {dict(extra.most_common(12))}")


if __name__ == "__main__":
    main()
