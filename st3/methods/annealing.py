"""VTA, visual token annealing: ST3's decode schedule, applicable to any prefill schedule.

While tokens are generated, each layer's visual budget anneals from what it held after prefill to `final` of
it; a layer above budget evicts from its KV cache by an eviction rule, any `st3.selectors.Selector` (by name
or instance). ST3 uses it through its `anneal_*` knobs; `st3.FastV(decode=st3.VTA())` adds it to another.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch

from st3.knobs import check_types
from st3.selectors import SELECTORS, Accumulated, Attention, Coverage, DivPrune, Protected, Selector, check

CURVES = ("linear", "cosine", "exponential")
#: VTA's own names for its eviction rules (any registered selector name works too).
EVICTIONS = ("current", "accumulated", "protected", "coverage", "diverse")


def anneal(curve: str, final: float, steps: int, t: int) -> float:
    """a(t): 1 at t = 0, `final` from t = steps on, non-increasing in between."""
    x = min(t / steps, 1.0)
    if curve == "linear":
        return 1.0 - (1.0 - final) * x
    if curve == "cosine":
        return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * x))
    return final**x  # exponential: a constant factor per step


def eviction_rule(evict: Selector | str, protect: float) -> Selector:
    """The selector an `evict` setting names: VTA's own names, a registered selector's name, or an instance."""
    if isinstance(evict, Selector):
        return evict
    own = {
        "current": Attention,  # the paper: the current token's attention
        "accumulated": Accumulated,
        "protected": lambda: Protected(share=protect),
        "coverage": lambda: Coverage(share=protect),
        "diverse": lambda: DivPrune(features="keys"),
    }
    name = str(evict).lower()
    if name in own:
        return own[name]()
    if name not in SELECTORS.names():
        raise ValueError(
            f"evict: must be one of {EVICTIONS}, a selector's name ({', '.join(SELECTORS.names())}) or a "
            f"st3.selectors.Selector, got {evict!r}"
        )
    return SELECTORS.get(name)


@dataclass(kw_only=True)
class VTA:
    """Visual token annealing.

    Layer l's budget for decode forward t is max(min_keep, round(n_l * a(t - delay))) (a = 1 before `delay`),
    n_l its visual tokens after prefill; every `every` steps a layer above budget evicts by `evict`:
    'current' (the paper): least attended by the current token; 'accumulated': least attention summed over
    every decode step so far; 'protected': the `protect` share of the budget goes to the tokens with the most
    accumulated attention, the rest to those the current token attends to most; 'coverage': the `protect`
    share to the tokens the current token attends to most, the rest to those with the *least* accumulated
    attention (not read yet: a caption's cells still to describe); 'diverse': the max-min diverse subset of
    the cached keys (no attention); or any selector (`st3.selectors`).
    """

    curve: str = "cosine"
    final: float = 0.3
    steps: int = 32
    every: int = 4
    min_keep: int = 4
    evict: Selector | str = "current"
    protect: float = 0.5
    """'protected': share of each budget kept by accumulated attention; 'coverage': by the current token's."""
    delay: int = 0
    """Decode steps before annealing starts (an answer's first words are written with every token)."""

    _rule: tuple | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_types(self)
        self.validate()

    def validate(self) -> None:
        check(self.curve in CURVES, "curve", f"must be one of {CURVES}, got {self.curve!r}")
        check(0.0 < self.final <= 1.0, "final", f"must be in (0, 1], got {self.final}")
        check(self.steps >= 1, "steps", f"must be >= 1, got {self.steps}")
        check(self.every >= 1, "every", f"must be >= 1, got {self.every}")
        check(self.min_keep >= 0, "min_keep", f"must be >= 0, got {self.min_keep}")
        check(0.0 <= self.protect <= 1.0, "protect", f"must be in [0, 1], got {self.protect}")
        check(self.delay >= 0, "delay", f"must be >= 0, got {self.delay}")
        _ = self.rule  # builds (and checks) the eviction rule

    @property
    def rule(self) -> Selector:
        """The eviction selector, built again only when `evict` or `protect` changed (read at every decode step)."""
        key = (self.evict, self.protect)
        if self._rule is None or self._rule[0] != key:
            self._rule = (key, eviction_rule(*key))
        return self._rule[1]

    def knobs(self) -> dict:
        """The settings, e.g. for JSON (an eviction selector as its own knobs)."""
        knobs = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        return {"name": "vta", **knobs, "evict": self.evict if isinstance(self.evict, str) else self.evict.knobs()}

    def budget(self, step: int, visual_after_prefill: torch.Tensor) -> torch.Tensor | None:
        if self.final == 1.0 or step % self.every or step <= self.delay:
            return None
        a = anneal(self.curve, self.final, self.steps, step - self.delay)
        budget = torch.round(visual_after_prefill.double() * a).long().clamp(min=self.min_keep)
        return torch.minimum(budget, visual_after_prefill)
