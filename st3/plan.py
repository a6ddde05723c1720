"""What a method will do at a given model shape, without running a model.

Walks the method's own decisions (`prefill_keep`, `decode_budget`) for one sample of `visual` image
tokens and `text` other prompt tokens generating `new_tokens`, and prices the result with the same
formulas as the trace. Useful to choose knobs (the README's arithmetic for ST3's defaults is this) and to
match methods at equal cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from st3.accounting import Shape, decode_flops, prefill_flops, unpruned_flops
from st3.methods.base import Method
from st3.models import SPECS

#: Decoder shapes by name, from the one table of real models' shapes.
SHAPES: dict[str, Shape] = {name: spec.shape for name, spec in SPECS.items()}
#: The shape the defaults are chosen for: LLaVA-1.5-7B's decoder (Vicuna-7B).
LLAVA_15_7B = SHAPES["llava-1.5-7b"]


@dataclass
class Plan:
    """Visual tokens per layer over time, and the cost ratios against the unpruned model."""

    prefill_visual: list[int]
    """[layer]: visual tokens held after prefill."""
    decode_visual: list[list[int]]
    """[step][layer]: visual tokens each decode forward attends to."""
    final_visual: list[int]
    """[layer]: visual tokens held when generation ends."""
    prefill_flops_ratio: float
    total_flops_ratio: float
    kv_ratio: float
    """KV-cache bytes at the end over the unpruned model's."""

    @property
    def mean_visual_per_layer(self) -> float:
        return sum(self.prefill_visual) / len(self.prefill_visual)


def plan(method: Method, shape: Shape, visual: int = 576, text: int = 60, new_tokens: int = 64) -> Plan:
    """Simulate `method` on one sample (as `generate(max_new_tokens=new_tokens)` would run it)."""
    layers = shape.num_layers
    method.validate_for(layers)
    held, prefill_visual = method.tokens_before_decoder(visual), []
    for layer in range(layers):
        keep = method.prefill_keep(layer, layers, torch.tensor([held]))
        if keep is not None:
            kept = min(held, int(keep[0]))
            held = kept + method.merged_rows(held - kept)
        prefill_visual.append(held)

    current, decode_visual = list(prefill_visual), []
    for step in range(new_tokens - 1):  # the first token comes from prefill
        decode_visual.append(list(current))
        for layer in range(layers):
            budget = method.decode_budget(layer, step + 1, torch.tensor([prefill_visual[layer]]))
            if budget is not None:
                current[layer] = min(current[layer], int(budget[0]))

    prompt = visual + text
    pruned_prefill = prefill_flops(shape, [text + v for v in prefill_visual])
    pruned_decode = sum(
        decode_flops(shape, [text + t + 1 + v for v in counts]) for t, counts in enumerate(decode_visual)
    )
    full = unpruned_flops(shape, [prompt], new_tokens)
    generated = new_tokens - 1  # tokens fed back, hence cached
    return Plan(
        prefill_visual=prefill_visual,
        decode_visual=decode_visual,
        final_visual=current,
        prefill_flops_ratio=pruned_prefill / full["prefill"],
        total_flops_ratio=(pruned_prefill + pruned_decode) / full["total"],
        kv_ratio=sum(text + generated + v for v in current) / (layers * (prompt + generated)),
    )
