"""Matched budgets: configure any method to a target cost, so comparisons at equal cost are one call.

    fastv = st3.match("fastv", tokens=192, model=model, inputs=inputs)   # 192 visual tokens per layer on average
    fastv = st3.match("fastv", budget=0.33, model=model, inputs=inputs)  # a third of them
    pdrop = st3.match("pyramiddrop", prefill_flops=0.5, shape=st3.plan.LLAVA_15_7B, visual=576, text=60)

The method's `budget_knob` (FastV's `ratio`, PyramidDrop's `keep`, ...) is searched with the model-free
planner, whose counts equal a real run's (tested). Every knob moves the cost monotonically, so bisection
finds the closest achievable value. When that is further from the target than `tolerance` (default: one
visual token per layer, or 0.01 of a FLOPs ratio) the call fails and says what is achievable: VTW's
average moves in steps of n / num_layers tokens (one layer), and PyramidDrop's first stage keeps every
token for a quarter of the layers unless its `stages` are moved.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence

from st3.accounting import Shape, unpruned_flops
from st3.methods.base import Method, get
from st3.plan import LLAVA_15_7B, plan

METRICS = ("visual_per_layer", "prefill_flops_ratio", "total_flops_ratio")


class AssumedShape(UserWarning):
    """`st3.match` was not told the model or the token counts, and matched at assumed ones (it says which)."""


TARGETS = {"tokens": "visual_per_layer", "budget": "visual_per_layer", "prefill_flops": "prefill_flops_ratio",
           "total_flops": "total_flops_ratio"}  # fmt: skip


def match(
    method: Method | str,
    target: float | None = None,
    *,
    tokens: float | None = None,
    budget: float | None = None,
    prefill_flops: float | None = None,
    total_flops: float | None = None,
    model=None,
    inputs: dict | None = None,
    shape: Shape | None = None,
    visual: int | Sequence[int] | None = None,
    text: int | Sequence[int] | None = None,
    new_tokens: int = 64,
    tolerance: float | None = None,
    metric: str | None = None,
    **knobs,
) -> Method:
    """A method whose planned cost is as close to the target as its budget knob allows.

    The target, one of: `tokens=` mean visual tokens per layer after prefill; `budget=` the same as a share of
    the visual tokens (0.5: half of them per layer); `prefill_flops=` / `total_flops=` a FLOPs ratio to the
    unpruned model. (`target` with `metric=` is the older spelling: a count of tokens unless `metric` names a
    FLOPs ratio; a float in (0, 1] there is refused as ambiguous.)

    The costs are those of `model` (its decoder's shape) on `inputs` (visual and text tokens per sample, counted
    by the model's adapter); or of `shape` with `visual` / `text` tokens per sample. Whatever is not given is
    assumed (LLaVA-1.5-7B's decoder, 576 visual and 60 text tokens), with an `AssumedShape` warning saying so.
    `method` is a registered name (with `knobs`) or an instance (its other knobs are kept).
    """
    name, value = _target(target, metric, tokens=tokens, budget=budget, prefill_flops=prefill_flops,
                          total_flops=total_flops)  # fmt: skip
    metric = TARGETS[name]
    shape, counts, texts, assumed = _costed(model, inputs, shape, visual, text)
    if metric == "visual_per_layer" and assumed[-1:] == ["60 text tokens per sample"]:
        assumed.pop()  # visual tokens per layer do not depend on the text
    if assumed:
        warnings.warn(f"st3.match assumed {', '.join(assumed)}: pass model= and inputs= (or shape=, visual=, text=) "
                      "to match your model", AssumedShape, stacklevel=2)  # fmt: skip
    if name == "budget":
        if not 0.0 < value <= 1.0:
            raise ValueError(f"budget: a share of the visual tokens, in (0, 1]; got {value!r} (tokens= for a count)")
        value = value * sum(counts) / len(counts)
    base = get(method, **knobs) if isinstance(method, str) else dataclasses.replace(method, **knobs)
    knob = type(base).budget_knob
    if knob is None:
        raise ValueError(f"{type(base).__name__} has no budget knob to match a cost with")

    steps = new_tokens if metric == "total_flops_ratio" else 1  # prefill metrics need no decoding

    refusals: list[str] = []

    def cost(setting) -> float | None:
        try:
            candidate = dataclasses.replace(base, **{knob: setting})
            return batch_cost(candidate, metric, shape, counts, texts, steps)
        except ValueError as error:  # outside the knob's valid range
            refusals.append(str(error))
            return None

    integer = isinstance(getattr(base, knob), int) or getattr(base, knob) is None

    def nearest_valid(start, end):
        """The valid setting nearest `start` on the way to `end` (e.g. ST3's ratio must stay below 1, VisionZip's
        dominant counts [CLS]: at least 1), probed at doubling distances then bisected; None if none is valid."""
        if cost(start) is not None:
            return start
        direction, step, bad = (1 if end > start else -1), (1 if integer else 1e-6), start
        while True:
            point = end if step >= abs(end - start) else start + direction * step
            if cost(point) is not None:
                break
            if point == end:
                return None
            bad, step = point, step * 2
        while abs(point - bad) > (1 if integer else 1e-6):
            middle = (bad + point) // 2 if integer else (bad + point) / 2
            bad, point = (middle, point) if cost(middle) is None else (bad, middle)
        return point

    low, high = (0, max(max(counts), shape.num_layers)) if integer else (0.0, 1.0)
    high = nearest_valid(high, low)
    if high is None:
        raise ValueError(f"{type(base).__name__}: no value of {knob} is valid on this model: {refusals[-1]}")
    low = nearest_valid(low, high)
    best = _bisect(cost, low, high, value, integer)
    achieved = cost(best)
    tolerance = tolerance if tolerance is not None else (1.0 if metric == "visual_per_layer" else 0.01)
    if abs(achieved - value) > tolerance:
        raise OutOfReach(
            f"{type(base).__name__} cannot reach {metric}={value:.4g} through {knob}: the closest is {achieved:.4g} "
            f"({knob}={best!r})", hint="pass tolerance= to accept it, or change its other knobs"
        )
    return dataclasses.replace(base, **{knob: best})


class OutOfReach(ValueError):
    """A target the budget knob cannot reach; `hint` (the end of the message) says what the caller can change."""

    def __init__(self, message: str, hint: str):
        super().__init__(f"{message}; {hint}")
        self.reason = message


def _target(target, metric, **named) -> tuple[str, float]:
    """(which target, its value) from exactly one of `target` (with `metric`) and the named targets."""
    given = {key: value for key, value in named.items() if value is not None}
    if target is not None:
        given["target"] = target
    if len(given) != 1:
        raise ValueError(f"target: give exactly one of tokens=, budget=, prefill_flops=, total_flops=; got {given}")
    (key, value), = given.items()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ValueError(f"{key}: must be a number, got {value!r}")
    if key != "target":
        if metric is not None:
            raise ValueError(f"metric: the target names its metric ({key}=); leave metric unset")
        return key, float(value)
    if metric not in (None, *METRICS):
        raise ValueError(f"metric: must be one of {METRICS}, got {metric!r}")
    if metric in (None, "visual_per_layer"):
        if isinstance(value, float) and 0.0 < value <= 1.0:
            raise ValueError(f"target: {value} visual tokens per layer is at most one token; for a share of the "
                             f"visual tokens pass budget={value}, for a count pass tokens=")  # fmt: skip
        return "tokens", float(value)
    return {v: k for k, v in TARGETS.items() if k != "budget"}[metric], float(value)


def _costed(model, inputs, shape, visual, text) -> tuple[Shape, list[int], list[int], list[str]]:
    """(shape, visual tokens per sample, text tokens per sample) to plan with, and what of it was assumed."""
    assumed = []
    if model is not None:
        from st3.adapters import adapter_for

        adapter = adapter_for(model)
        if shape is not None:
            raise ValueError("shape: the model gives it; pass model= or shape=, not both")
        shape = adapter.shape
        if inputs is not None:
            if visual is not None or text is not None:
                raise ValueError("visual: the inputs give the token counts; pass inputs= or visual= / text=, not both")
            visual, text = adapter.token_counts(inputs)
        elif visual is None:
            visual = adapter.tokens_per_image()
            if visual is None:
                raise ValueError(f"inputs: {type(model).__name__}'s visual tokens depend on the image; pass inputs= "
                                 "(the processor's output) or visual=")  # fmt: skip
    elif inputs is not None:
        raise ValueError("inputs: pass model= too, whose adapter counts the visual tokens")
    if shape is None:
        shape = LLAVA_15_7B
        assumed.append("LLaVA-1.5-7B's decoder (32 layers)")
    if visual is None:
        visual = 576
        assumed.append("576 visual tokens per sample")
    if text is None:
        text = 60
        assumed.append("60 text tokens per sample")
    counts = [visual] if isinstance(visual, int) else list(visual)
    if not counts or min(counts) < 0:
        raise ValueError(f"visual: needs one or more counts >= 0, got {visual!r}")
    texts = [text] * len(counts) if isinstance(text, int) else list(text)
    if len(texts) != len(counts):
        raise ValueError(f"text: one count per sample ({len(counts)}), got {text!r}")
    return shape, counts, texts, assumed


def batch_cost(method: Method, metric: str, shape: Shape, visual: list[int], text, new_tokens: int) -> float:
    """`metric` of a batch of samples with `visual` tokens each and `text` (one count, or one per sample): mean
    tokens per layer, or summed FLOPs ratios."""
    texts = [text] * len(visual) if isinstance(text, int) else list(text)
    plans = [plan(method, shape, visual=n, text=t, new_tokens=new_tokens) for n, t in zip(visual, texts)]
    if metric == "visual_per_layer":
        return sum(p.mean_visual_per_layer for p in plans) / len(plans)
    part = "prefill" if metric == "prefill_flops_ratio" else "total"
    full = [unpruned_flops(shape, [n + t], new_tokens)[part] for n, t in zip(visual, texts)]
    ratio = f"{part}_flops_ratio"
    return sum(getattr(p, ratio) * f for p, f in zip(plans, full)) / sum(full)


def depth_scaled(name: str, num_layers: int) -> dict:
    """The method's knobs that name layers (its `depth_knobs`, given for 32-layer models), scaled to a model of
    `num_layers` (empty when nothing to scale), as PyramidDrop's stages scale themselves."""
    return {knob: max(1, round(layer * num_layers / 32)) for knob, layer in get(name).depth_knobs().items()}


def at_budget(
    name: str, knobs: dict, budget: float, shape: Shape, visual: int | Sequence[int], text: int | Sequence[int]
) -> Method | None:
    """Method `name` with `knobs`, keeping `budget` (a share of the `visual` tokens) per layer on average at
    `shape`, or None for the unpruned model (a budget of 1). `visual` / `text`: the counts of one sample, or
    one per sample of a batch (then the batch's mean visual tokens per layer is matched).

    The given knobs are kept as given; layer knobs not given are scaled to the model's depth
    (`depth_scaled`); the budget knob is then matched. A budget out of reach while the first layers hold
    every token is matched again with pruning from layer 0. `st3 eval` and the lmms-eval plugin's `budget=`
    both configure methods with this.
    """
    if budget >= 1.0:
        return None
    scaled = {k: v for k, v in depth_scaled(name, shape.num_layers).items() if k not in knobs}
    mean = visual if isinstance(visual, int) else sum(visual) / len(visual)

    def matched(layer_knobs: dict) -> Method:
        return match(name, tokens=budget * mean, shape=shape, visual=visual, text=text, **layer_knobs, **knobs)

    try:
        try:
            return matched(scaled)
        except ValueError:
            if not scaled:
                raise
            return matched({key: 0 if key in ("start_layer", "layer") else value for key, value in scaled.items()})
    except OutOfReach as error:  # the caller has knobs in a spec to change, not a tolerance to pass
        hint = f"change its other knobs in the method spec ({name}:knob=value,...)"
        raise OutOfReach(error.reason, hint=hint) from None


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
