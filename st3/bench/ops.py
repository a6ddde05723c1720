"""Torch operations issued per decode forward: the deterministic figure of the engine's per-step overhead.

On a launch-bound GPU each torch call is one kernel launch or more, so the count per decode step is what
the engine adds to vanilla's, free of the noise of a shared machine. `benchmarks/overhead_ops.py` prints
it for the launch-bound proxy and tests/engine/test_overhead.py asserts its bounds; both count with this module.
"""

from __future__ import annotations

import collections
import contextlib

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from st3.adapters import adapter_for
from st3.compat import cache_in


class Ops(TorchFunctionMode):
    """Counts the torch functions and tensor methods called, by name (attribute reads excluded)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: collections.Counter = collections.Counter()

    @property
    def count(self) -> int:
        return self.names.total()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if name != "__get__":  # attribute reads (.shape, .device, .mT) launch nothing
            self.names[name] += 1
        return func(*args, **(kwargs or {}))


def decode_ops(model: nn.Module, inputs: dict, method, new_tokens: int) -> list[collections.Counter]:
    """The operations (by name) of each decode forward of `model`'s decoder stack in a greedy `generate`.

    method: an st3 method (applied for the run), or None for vanilla transformers. The prefill forward is
    not counted, so the list has `new_tokens - 1` entries.
    """
    lm = adapter_for(model).language_model
    counts: list[collections.Counter] = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        if method is not None:
            stack.enter_context(method(model))
        forward = lm.forward

        def counted(*args, **kwargs):
            cache = cache_in(kwargs)
            if cache is None or cache.get_seq_length() == 0:
                return forward(*args, **kwargs)
            with Ops() as ops:
                out = forward(*args, **kwargs)
            counts.append(ops.names)
            return out

        lm.forward = counted  # an instance attribute over the class's (or the method's) forward, undone below
        try:
            model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
        finally:
            if method is None:
                del lm.forward
            else:
                lm.forward = forward
    return counts
