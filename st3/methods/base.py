"""What every token-trimming method is: a small validated dataclass with a few decision hooks.

The engine owns the mechanics (removing rows and cache entries, masks, positions, scoring); a method only
decides how many visual tokens each layer keeps, during prefill and during decoding, and which ones.
A method is a schedule (its own class: where and how many) composed with an optional `selector` (which
ones, st3.methods.selectors) and an optional decode schedule `decode` (`VTA`, visual token annealing).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import TYPE_CHECKING, ClassVar, TypeVar

import torch

from st3.knobs import check_types, unknown_knobs
from st3.methods.selectors import QUERY_ROWS, VTA, Selector, View, anneal, check, selector, top_k_mask

if TYPE_CHECKING:
    from torch import nn

    from st3.engine.session import Session
    from st3.trace import Trace

__all__ = ["QUERY_ROWS", "Method", "check", "get", "methods", "register", "share"]


def share(n: torch.Tensor, kept: float, min_keep: int) -> torch.Tensor:
    """max(min_keep, ceil(kept * n)), never above n (the epsilon absorbs float error in kept * n)."""
    k = torch.ceil(kept * n.double() - 1e-9).long()
    return torch.minimum(k.clamp(min=min_keep), n)


@dataclass(kw_only=True)
class Method:
    """Base class: apply with `with method(model): model.generate(...)`, then read `method.trace`."""

    name: ClassVar[str] = "method"
    #: Whether `select` needs attention scores (controls such as Random do not).
    needs_scores: ClassVar[bool] = True
    #: The knob that sets how many tokens the method keeps (searched by `st3.match`).
    budget_knob: ClassVar[str | None] = None
    #: Whether the method merges visual tokens before the decoder (`compress`, from the vision tower).
    compresses_vision: ClassVar[bool] = False

    record_positions: bool = False
    """Also record which visual columns each decode forward attended to, per layer (costs memory)."""
    selector: Selector | str | None = None
    """Which visual tokens the schedule keeps (e.g. `st3.DivPrune()`); None: the method's own rule."""
    decode: VTA | str | None = None
    """A decode schedule (`st3.VTA(...)` or 'vta'): anneal the visual tokens while generating; None: none."""

    _trace: Trace | None = field(default=None, init=False, repr=False, compare=False)

    #: Whether the schedule accepts a `selector` (methods that keep no or merged tokens do not).
    selectable: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_types(self)
        self.selector = selector(self.selector)
        if isinstance(self.decode, str):
            check(self.decode.lower() == "vta", "decode", f"must be a VTA or 'vta', got {self.decode!r}")
            self.decode = VTA()
        check(
            self.selector is None or self.selectable,
            "selector",
            f"{type(self).__name__} keeps no choice of tokens to make; leave selector unset",
        )
        self.validate()

    # ------------------------------------------------------------------------------- to override
    def validate(self) -> None:
        """Raise ValueError naming the knob when a setting is out of range."""

    def validate_for(self, num_layers: int) -> None:
        """Checks that need the model's depth, run when the method is applied."""

    @property
    def query_rows(self) -> str:
        """Which query rows' attention scores tokens: 'last' prompt token, 'text' after the image, 'all'."""
        return "last"

    def prefill_keep(self, layer: int, num_layers: int, visual: torch.Tensor) -> torch.Tensor | None:
        """Visual tokens to keep [B] when entering `layer`, given `visual` [B] held; None: keep all."""
        return None

    def tokens_before_decoder(self, visual: int) -> int:
        """Visual tokens per image that reach the decoder (methods that compress before it say fewer)."""
        return visual

    def compress(
        self, saliency: torch.Tensor, keys: torch.Tensor, features: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Before the decoder: (kept [images, P], rewritten [images, P], features [images, P, d_v]).

        saliency: the vision tower's [CLS] attention to each patch; keys: the patches' keys at that layer;
        features: the projector's inputs. Only methods with `compresses_vision` implement it.
        """
        raise NotImplementedError

    @property
    def annealing(self) -> VTA | None:
        """The decode schedule, if any."""
        return self.decode

    def decode_budget(self, layer: int, step: int, visual_after_prefill: torch.Tensor) -> torch.Tensor | None:
        """Visual tokens layer `layer` may hold for decode forward `step` (0-based); None: no limit."""
        return None if self.annealing is None else self.annealing.budget(step, visual_after_prefill)

    def choose(self, view: View) -> torch.Tensor:
        """Prefill: the candidates of `view` to keep, by the selector, else by the method's own `select`."""
        if self.selector is not None:
            return _counted(self.selector.select(view), view, self.selector)
        scores = view.attention(self.query_rows) if self.needs_scores else None
        return self.select(scores, view.candidates, view.keep, view.patches)

    def evict(self, view: View) -> torch.Tensor:
        """Decode: the cached visual entries to keep, by the decode schedule's eviction rule.

        Not counted here (that would wait for the device at every evicting layer): the engine relies on
        `evicts_exactly`, or checks the counts of a whole step at once with `check_counts`.
        """
        if self.annealing is not None:
            selected = self.annealing.select(view)
            # a rule of top-k masks over the candidates returns a subset of them already: no operation to add
            return selected if self.evicts_exactly else selected & view.candidates
        scores = view.attention("current") if self.needs_scores else None
        return self.select(scores, view.candidates, view.keep, view.patches) & view.candidates

    @property
    def evicts_exactly(self) -> bool:
        """Whether `evict` keeps exactly min(keep, candidates) per sample by construction (`top_k_mask` only)."""
        annealing = self.annealing
        if annealing is not None:
            return annealing.evict in _EXACT_EVICTIONS
        never_evicts = type(self).decode_budget is Method.decode_budget
        return never_evicts or type(self).select is Method.select

    def check_counts(self, evictions: list[tuple[torch.Tensor, View]]) -> None:
        """Check the (kept, view) pairs of one decode step keep exactly their budgets (one device sync)."""
        _check_counts(evictions, self.annealing if self.annealing is not None else self)

    def host_decode_budget(self, layer: int, step: int, visual_after_prefill: list[int]) -> list[int] | None:
        """`decode_budget` on host counts (per sample), called for every layer at every decode forward.

        The engine decides from it whether to evict without waiting for the device: for a decode schedule
        (`VTA`) it is the same rule in Python floats (IEEE doubles, round half to even as `torch.round`; a
        test holds the two equal). A method with a `decode_budget` of its own has it run on a CPU tensor.
        """
        if type(self).decode_budget is not Method.decode_budget:
            budget = self.decode_budget(layer, step, torch.tensor(visual_after_prefill))
            return None if budget is None else budget.tolist()
        vta = self.annealing
        if vta is None or vta.final == 1.0 or step % vta.every or step <= vta.delay:
            return None
        a = anneal(vta.curve, vta.final, vta.steps, step - vta.delay)
        return [min(max(round(n * a), vta.min_keep), n) for n in visual_after_prefill]

    def select(
        self, scores: torch.Tensor | None, candidates: torch.Tensor, keep: torch.Tensor, patches: torch.Tensor
    ) -> torch.Tensor:
        """BoolTensor [B, S]: which candidate slots [B, S] to keep, keep[b] of them per sample.

        scores: attention received [B, S] (None when `needs_scores` is False); patches: each candidate's
        index among the sample's candidates (its patch in raster order while nothing was dropped before).
        """
        return top_k_mask(scores, candidates, keep)

    # ----------------------------------------------------------------------------------- the API
    def knobs(self) -> dict:
        """The method's settings (its constructor arguments), e.g. for JSON (a selector or VTA as a dict)."""

        def plain(value):
            if isinstance(value, (Selector, VTA)):
                return {"name": getattr(value, "name", "vta"), **asdict(value)}
            return value

        return {f.name: plain(getattr(self, f.name)) for f in fields(self) if f.init}

    @property
    def label(self) -> str:
        """The registered name plus what was composed onto it (`st3+divprune` for `ST3(selector=DivPrune())`,
        `fastv+vta` for `FastV(decode=VTA())`): the trace's `method`, so a record says which rule chose."""
        default = {f.name: f.default if f.default_factory is MISSING else f.default_factory() for f in fields(self)}
        parts = [self.name]
        if self.selector is not None and type(self.selector) is not type(default["selector"]):
            parts.append(self.selector.name)
        if self.decode is not None and default["decode"] is None:
            parts.append("vta")
        return "+".join(parts)

    def __call__(self, model: nn.Module) -> Session:
        """A context manager that applies this method to `model` and restores it on exit."""
        from st3.engine.session import Session

        return Session(self, model)

    def begin(self, trace: Trace) -> None:
        """Called by the engine at each prefill with the record of the new run (its image grids included)."""
        trace.method = self.label
        self._trace = trace

    @property
    def trace(self) -> Trace:
        """The record of the last forward or generate call made under this method."""
        if self._trace is None:
            raise RuntimeError(f"{type(self).__name__} has no trace yet: run the model inside `with method(model):`")
        return self._trace


#: VTA eviction rules made of `top_k_mask` calls alone, which keep min(k, candidates) per sample by construction.
_EXACT_EVICTIONS = ("current", "accumulated", "protected", "coverage")


def _counted(selected: torch.Tensor, view: View, rule) -> torch.Tensor:
    """`selected`, after checking it keeps exactly the budget (the planner and st3.match rely on it)."""
    _check_counts([(selected, view)], rule)
    return selected & view.candidates


def _check_counts(pairs: list[tuple[torch.Tensor, View]], rule) -> None:
    """Raise unless each (selected, view) keeps min(keep, candidates) per sample; one sync for all pairs."""
    want = torch.cat([torch.minimum(view.keep, view.candidates.sum(-1)) for _, view in pairs])
    got = torch.cat([(selected & view.candidates).sum(-1) for selected, view in pairs])
    if not torch.equal(got, want):
        raise RuntimeError(f"{type(rule).__name__} kept {got.tolist()} visual tokens, not {want.tolist()}")


# ------------------------------------------------------------------------------------------ registry
_REGISTRY: dict[str, type[Method]] = {}
M = TypeVar("M", bound=type[Method])


def register(name: str) -> Callable[[M], M]:
    """Class decorator: make a method findable as `st3.get(name)`."""

    def wrap(cls: M) -> M:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def methods() -> list[str]:
    """Names of the registered methods."""
    return sorted(_REGISTRY)


def get(name: str, **knobs) -> Method:
    """Build the registered method `name` with `knobs`."""
    try:
        cls = _REGISTRY[name.lower()]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(methods())}") from None
    unknown_knobs(cls, knobs, name)
    return cls(**knobs)
