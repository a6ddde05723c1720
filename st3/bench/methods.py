"""Which methods a benchmark runs: parsing `--method` specs, defaults, and matching peers at equal cost.

A spec is `name`, `name:knob=value,knob=value`, or `name:match` (set the method's budget knob so that its
theoretical total FLOPs equal the first unmatched method's, usually ST3 at its defaults). Names come from the
registry, so any method registered with `st3.register` works; a default peer that is not registered
(yet) is skipped with a note instead of failing the run.
"""

from __future__ import annotations

from dataclasses import dataclass

from st3.accounting import Shape
from st3.methods.base import Method, get, methods
from st3.plan import plan
from st3.spec import Choice, parse

DEFAULT_METHODS = ("st3", "fastv:match", "pyramiddrop:match")
"""ST3 at its defaults, and its two best-known peers at the same theoretical cost."""


@dataclass
class Resolved:
    """A method ready to run, or the reason it is skipped."""

    label: str
    name: str
    method: Method | None
    knobs: dict
    note: str = ""


def resolve(
    specs: list[str] | None, shape: Shape, visual: int, text: int, new_tokens: int
) -> tuple[list[Resolved], list[str]]:
    """Build the methods to run; return them and notes about the ones skipped or matched."""
    explicit = specs is not None
    choices = [parse(s) for s in (specs if explicit else DEFAULT_METHODS)]
    notes: list[str] = []
    out: list[Resolved] = []
    target: float | None = None
    for choice in choices:
        if choice.name not in methods():
            note = f"method {choice.name!r} is not registered (available: {', '.join(methods())}); skipped"
            if explicit:
                raise ValueError(note)
            notes.append(note)
            continue
        try:
            if choice.match:
                if target is None:
                    target = plan(get("st3"), shape, visual, text, new_tokens).total_flops_ratio
                method, knobs, note = match_cost(choice, target, shape, visual, text, new_tokens)
            else:
                method, knobs, note = get(choice.name, **choice.knobs), dict(choice.knobs), ""
                method.validate_for(shape.num_layers)
                if target is None:
                    target = plan(method, shape, visual, text, new_tokens).total_flops_ratio
        except (ValueError, TypeError) as error:
            notes.append(f"{choice.label}: cannot run at this shape ({error}); skipped")
            continue
        if note:
            notes.append(f"{choice.label}: {note}")
        out.append(Resolved(choice.label, choice.name, method, knobs, note))
    return out, notes


def match_cost(
    choice: Choice, target: float, shape: Shape, visual: int, text: int, new_tokens: int
) -> tuple[Method, dict, str]:
    """Set the method's budget knob so its planned total-FLOPs ratio is as close to `target` as it gets.

    Uses `st3.budget.match` (the model-free planner, bisection on the method's `budget_knob`) and accepts
    the closest achievable value, saying how close it came; a method without a budget knob runs at its
    defaults, with a note.
    """
    from st3.budget import match

    base = get(choice.name, **choice.knobs)
    knob = getattr(type(base), "budget_knob", None)
    if knob is None:
        base.validate_for(shape.num_layers)
        return base, dict(choice.knobs), "no budget knob to match cost with; ran at its defaults"
    method = match(
        base,
        target,
        metric="total_flops_ratio",
        shape=shape,
        visual=visual,
        text=text,
        new_tokens=new_tokens,
        tolerance=float("inf"),
    )
    method.validate_for(shape.num_layers)
    achieved = plan(method, shape, visual, text, new_tokens).total_flops_ratio
    value = getattr(method, knob)
    note = f"{knob}={value:.4g} gives total FLOPs ratio {achieved:.3f} (target {target:.3f}, ST3's)"
    return method, {**choice.knobs, knob: value}, note
