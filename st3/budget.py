"""Matched budgets: configure any method to a target cost, so comparisons at equal cost are one call.

    fastv = st3.match("fastv", 192)                                  # 192 visual tokens per layer on average
    pdrop = st3.match("pyramiddrop", 0.5, metric="prefill_flops_ratio")

The method's `budget_knob` (FastV's `ratio`, PyramidDrop's `keep`, ...) is searched with the model-free
planner, whose counts equal a real run's (tested). Every knob moves the cost monotonically, so bisection
finds the closest achievable value. When that is further from the target than `tolerance` (default: one
visual token per layer, or 0.01 of a FLOPs ratio) the call fails and says what is achievable: VTW's
average moves in steps of n / num_layers tokens (one layer), and PyramidDrop's first stage keeps every
token for a quarter of the layers unless its `stages` are moved.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from st3.accounting import Shape, unpruned_flops
from st3.methods.base import Method, get
from st3.plan import LLAVA_15_7B, plan

METRICS = ("visual_per_layer", "prefill_flops_ratio", "total_flops_ratio")


def match(
    method: Method | str,
    target: float,
    *,
    metric: str = "visual_per_layer",
    shape: Shape = LLAVA_15_7B,
    visual: int | Sequence[int] = 576,
    text: int = 60,
    new_tokens: int = 64,
    tolerance: float | None = None,
    **knobs,
) -> Method:
    """A method whose planned `metric` is as close to `target` as its budget knob allows.

    `method` is a registered name (with `knobs`) or an instance (its other knobs are kept). `metric` is the
    mean visual tokens per layer after prefill, or a FLOPs ratio (prefill or total) to the unpruned model.
    `visual` may list one count per sample (e.g. Qwen-VL images of different sizes): the target is then the
    batch's mean tokens per layer, or its FLOPs summed over samples against the unpruned sum.
    """
    if metric not in METRICS:
        raise ValueError(f"metric: must be one of {METRICS}, got {metric!r}")
    base = get(method, **knobs) if isinstance(method, str) else dataclasses.replace(method, **knobs)
    knob = type(base).budget_knob
    if knob is None:
        raise ValueError(f"{type(base).__name__} has no budget knob to match a cost with")

    steps = new_tokens if metric == "total_flops_ratio" else 1  # prefill metrics need no decoding

    def cost(value) -> float | None:
        try:
            candidate = dataclasses.replace(base, **{knob: value})
            return batch_cost(candidate, metric, shape, counts, text, steps)
        except ValueError:  # outside the knob's valid range
            return None

    counts = [visual] if isinstance(visual, int) else list(visual)
    if not counts or min(counts) < 0:
        raise ValueError(f"visual: needs one or more counts >= 0, got {visual!r}")
    integer = isinstance(getattr(base, knob), int) or getattr(base, knob) is None
    low, high = (0, max(max(counts), shape.num_layers)) if integer else (0.0, 1.0)
    while cost(high) is None:  # e.g. ST3's ratio must stay below 1
        high = high - 1 if integer else high - 1e-6
    best = _bisect(cost, low, high, target, integer)
    achieved = cost(best)
    tolerance = tolerance if tolerance is not None else (1.0 if metric == "visual_per_layer" else 0.01)
    if abs(achieved - target) > tolerance:
        raise ValueError(
            f"{type(base).__name__} cannot reach {metric}={target} through {knob}: the closest is {achieved:.4g} "
            f"({knob}={best!r}); pass tolerance= to accept it, or change its other knobs"
        )
    return dataclasses.replace(base, **{knob: best})


def batch_cost(method: Method, metric: str, shape: Shape, visual: list[int], text: int, new_tokens: int) -> float:
    """`metric` of a batch of samples with `visual` tokens each: mean tokens per layer, or summed FLOPs ratios."""
    plans = [plan(method, shape, visual=n, text=text, new_tokens=new_tokens) for n in visual]
    if metric == "visual_per_layer":
        return sum(p.mean_visual_per_layer for p in plans) / len(plans)
    part = "prefill" if metric == "prefill_flops_ratio" else "total"
    full = [unpruned_flops(shape, [n + text], new_tokens)[part] for n in visual]
    ratio = f"{part}_flops_ratio"
    return sum(getattr(p, ratio) * f for p, f in zip(plans, full)) / sum(full)


def depth_scaled(name: str, num_layers: int) -> dict:
    """The method's knobs that name layers (its `depth_knobs`, given for 32-layer models), scaled to a model of
    `num_layers` (empty when nothing to scale), as PyramidDrop's stages scale themselves."""
    return {knob: max(1, round(layer * num_layers / 32)) for knob, layer in get(name).depth_knobs().items()}


def at_budget(name: str, knobs: dict, budget: float, shape: Shape, visual: int, text: int) -> Method | None:
    """Method `name` with `knobs`, keeping `budget` (a share of the `visual` tokens) per layer on average at
    `shape`, or None for the unpruned model (a budget of 1).

    The given knobs are kept as given; layer knobs not given are scaled to the model's depth
    (`depth_scaled`); the budget knob is then matched. A budget out of reach while the first layers hold
    every token is matched again with pruning from layer 0. `st3 eval` and the lmms-eval plugin's `budget=`
    both configure methods with this.
    """
    if budget >= 1.0:
        return None
    scaled = {k: v for k, v in depth_scaled(name, shape.num_layers).items() if k not in knobs}

    def matched(layer_knobs: dict) -> Method:
        return match(name, budget * visual, shape=shape, visual=visual, text=text, **layer_knobs, **knobs)

    try:
        return matched(scaled)
    except ValueError:
        if not scaled:
            raise
        return matched({key: 0 if key in ("start_layer", "layer") else value for key, value in scaled.items()})


def _bisect(cost, low, high, target: float, integer: bool):
    """The value in [low, high] whose cost is closest to `target`, for a monotone `cost`."""
    rising = cost(high) >= cost(low)
    for _ in range(64):
        if (high - low <= 1) if integer else (high - low <= 1e-9):
            break
        mid = (low + high) // 2 if integer else (low + high) / 2
        if (cost(mid) < target) == rising:
            low = mid
        else:
            high = mid
    return min((low, high), key=lambda value: abs(cost(value) - target))
