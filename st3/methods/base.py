"""What every token-trimming method is: a small validated dataclass with a few decision hooks.

The engine owns the mechanics (removing rows and cache entries, masks, positions, scoring); a method only
decides how many visual tokens each layer keeps, during prefill and during decoding, and which ones. A method
is a schedule (its own class: where and how many) composed with a `selector` (which ones: `st3.selectors`)
and an optional decode schedule `decode` (`st3.VTA`, visual token annealing, with its own eviction selector).
`st3.engine.protocol.Policy` lists what the engine calls; this class implements it once for every method.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, ClassVar

import torch

from st3.knobs import check_types
from st3.methods.annealing import VTA, anneal
from st3.registry import Registry
from st3.selectors import SELECTORS, Attention, Selector, View, check
from st3.selectors.base import VARIANTS

if TYPE_CHECKING:
    from torch import nn

    from st3.engine.session import Session
    from st3.trace import Trace

__all__ = ["METHODS", "VARIANTS", "Method", "check", "get", "methods", "register", "share"]

METHODS: Registry = Registry("method")
register = METHODS.register


def share(n: torch.Tensor, kept: float, min_keep: int) -> torch.Tensor:
    """max(min_keep, ceil(kept * n)), never above n (the epsilon absorbs float error in kept * n)."""
    k = torch.ceil(kept * n.double() - 1e-9).long()
    return torch.minimum(k.clamp(min=min_keep), n)


@dataclass(kw_only=True)
class Method:
    """Base class: apply with `with method(model): model.generate(...)`, then read `method.trace`."""

    name: ClassVar[str] = "method"
    #: The knob that sets how many tokens the method keeps (searched by `st3.match`).
    budget_knob: ClassVar[str | None] = None
    #: Whether the method merges visual tokens before the decoder (`compress`, from the vision tower).
    compresses_vision: ClassVar[bool] = False
    #: Where a compression's [CLS] saliency starts: a slice start over the vision tower's layers, summed through
    #: the feature layer (VTC-CLS); None: the feature layer alone.
    saliency_start: ClassVar[int | None] = None
    #: Whether the schedule accepts a `selector` (methods that keep no or merged tokens do not).
    selectable: ClassVar[bool] = True

    record_positions: bool = False
    """Also record which visual columns each decode forward attended to, per layer (costs memory)."""
    selector: Selector | str | None = None
    """Which visual tokens the schedule keeps (e.g. `st3.selectors.DivPrune()` or 'divprune'); None: the
    method's own rule (`default_selector`)."""
    decode: VTA | str | None = None
    """A decode schedule (`st3.VTA(...)` or 'vta'): anneal the visual tokens while generating; None: none."""

    _trace: Trace | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.selector, Method):  # before 0.2 a method named a rule: its rule, with a warning
            self.selector = as_selector(self.selector)
        check_types(self)
        self.selector = as_selector(self.selector)
        if isinstance(self.decode, str):
            check(self.decode.lower() == "vta", "decode", f"must be a VTA or 'vta', got {self.decode!r}")
            self.decode = VTA()
        check(
            self.selector is None or self.selectable,
            "selector",
            f"{type(self).__name__} keeps no choice of tokens to make; leave selector unset",
        )
        check(
            self.selector is None or "received" not in self.selector.reads,
            "selector",
            f"{type(self.selector).__name__} reads attention accumulated while decoding; use it as a decode "
            "schedule's eviction rule (st3.VTA(evict=...)), not at prefill",
        )
        self.validate()

    # ------------------------------------------------------------------------------- to override
    def validate(self) -> None:
        """Raise ValueError naming the knob when a setting is out of range."""

    def validate_for(self, num_layers: int) -> None:
        """Checks that need the model's depth, run when the method is applied."""

    def default_selector(self) -> Selector:
        """The rule the schedule keeps tokens by when no `selector` is given (attention, as FastV ranks)."""
        return Attention()

    def prefill_keep(self, layer: int, num_layers: int, visual: torch.Tensor) -> torch.Tensor | None:
        """Visual tokens to keep [B] when entering `layer`, given `visual` [B] held; None: keep all."""
        return None

    def depth_knobs(self) -> dict[str, int]:
        """Knobs that name layers, as set for a 32-layer model (st3 eval and lmms-eval scale them to a model's
        depth when the user does not set them)."""
        return {}

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

    # ------------------------------------------------------------------- what the engine calls (Policy)
    @property
    def rule(self) -> Selector:
        """The selector the schedule keeps tokens by at prefill."""
        return self.selector if self.selector is not None else self.default_selector()

    @property
    def eviction_rule(self) -> Selector:
        """The selector that evicts while decoding: the decode schedule's, else the prefill rule."""
        return self.annealing.rule if self.annealing is not None else self.rule

    def choose(self, view: View) -> torch.Tensor:
        """Prefill: the candidates of `view` to keep (their count checked: the planner and st3.match rely on it)."""
        if not bool(view.keep.any()):  # nothing to choose (VTW's withdrawal): no rule runs
            return torch.zeros_like(view.candidates)
        rule = self.rule
        selected = rule.select(view)
        _check_counts([(selected, view)], rule)
        return selected & view.candidates

    def merge_pruned(self, view: View, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Prefill, after `choose` kept `kept` of `view`: visual rows to add, made of pruned ones (hidden [B, M, d],
        members [B, M, S] over the view's slots), or None (every method but SparseVLM's recycling)."""
        return None

    def merged_rows(self, pruned: int) -> int:
        """How many rows `merge_pruned` adds for a sample where a layer pruned `pruned` visual tokens (the planner)."""
        return 0

    def evict(self, view: View) -> torch.Tensor:
        """Decode: the cached visual entries to keep, by the eviction rule.

        Not counted here (that would wait for the device at every evicting layer): the engine relies on
        `evicts_exactly`, or checks the counts of a whole step at once with `check_counts`.
        """
        rule = self.eviction_rule
        selected = rule.select(view)
        return selected if rule.exact else selected & view.candidates

    @property
    def accumulates(self) -> bool:
        """Whether the engine must sum each decode step's attention into the cache (the eviction rule reads it)."""
        vta = self.annealing
        return vta is not None and vta.final < 1.0 and "received" in vta.rule.reads

    @property
    def evicts_exactly(self) -> bool:
        """Whether `evict` keeps exactly min(keep, candidates) per sample by construction."""
        never_evicts = self.annealing is None and type(self).decode_budget is Method.decode_budget
        return never_evicts or self.eviction_rule.exact

    def chooses_before_decoder(self, num_layers: int) -> bool:
        """Whether the schedule only chooses visual tokens before the decoder: no layer after the first prunes
        and nothing is evicted while decoding. Then the model's own decoder can run the shortened prompt (any
        cache, attention backend or `torch.compile`); read off the declared schedule, not the method's name."""
        vta = self.annealing
        if (vta is not None and vta.final < 1.0) or type(self).decode_budget is not Method.decode_budget:
            return False
        held = torch.tensor([1 << 20])
        for layer in range(1, num_layers):
            keep = self.prefill_keep(layer, num_layers, held)
            if keep is not None and bool((keep < held).any()):
                return False
        return True

    def check_counts(self, evictions: list[tuple[torch.Tensor, View]]) -> None:
        """Check the (kept, view) pairs of one decode step keep exactly their budgets (one device sync)."""
        _check_counts(evictions, self.eviction_rule)

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

    # ----------------------------------------------------------------------------------- the API
    def knobs(self) -> dict:
        """The method's settings (its constructor arguments), e.g. for JSON (a selector or VTA as a dict)."""

        def plain(value):
            if isinstance(value, Selector):
                return value.knobs()
            if isinstance(value, VTA):
                return value.knobs()
            return value

        return {f.name: plain(getattr(self, f.name)) for f in fields(self) if f.init}

    @property
    def label(self) -> str:
        """The registered name plus what was composed onto it (`st3+divprune` for `ST3(selector=DivPrune())`,
        `fastv+vta` for `FastV(decode=VTA())`): the trace's `method`, so a record says which rule chose."""
        parts = [self.name]
        if self.selector is not None and type(self.selector) is not type(self.default_selector()):
            parts.append(self.selector.name)
        default = {f.name: f.default for f in fields(self)}
        if self.decode is not None and default.get("decode") is None:
            parts.append("vta")
        return "+".join(parts)

    def __call__(self, model: nn.Module, decoder: str = "auto") -> Session:
        """A context manager that applies this method to `model` and restores it on exit.

        decoder: for a method that chooses only before the decoder, "stock" runs the model's own decoder on
        the shortened prompt (static caches, `torch.compile`, any attention backend: docs/fast-paths.md),
        "engine" st3's loop; "auto" (default) takes the stock decoder where st3's loop cannot run (a cache
        other than a DynamicCache, or while `torch.compile` traces the model).
        """
        from st3.engine.session import Session

        return Session(self, model, decoder)

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


def as_selector(spec: Selector | Method | str | None) -> Selector | None:
    """A selector from an instance or a registered name; a method (st3.DivPrune() where st3.selectors.DivPrune()
    is meant, as before 0.2) gives its selector, with a DeprecationWarning."""
    if spec is None or isinstance(spec, Selector):
        return spec
    if isinstance(spec, Method) and spec.selectable:
        rule = spec.rule
        warnings.warn(
            f"selector: st3.{type(spec).__name__}() is a method now; pass the rule, "
            f"st3.selectors.{type(rule).__name__}()",
            DeprecationWarning,
            stacklevel=4,
        )
        return rule
    if isinstance(spec, str):
        try:
            return SELECTORS.get(spec)
        except ValueError as error:
            raise ValueError(f"selector: {error}") from None
    raise ValueError(f"selector: must be a st3.selectors.Selector or a selector's name, got {spec!r}")


def _check_counts(pairs: list[tuple[torch.Tensor, View]], rule) -> None:
    """Raise unless each (selected, view) keeps min(keep, candidates) per sample; one sync for all pairs."""
    device = pairs[0][0].device  # layers of a model split over devices evict on their own devices
    want = torch.cat([torch.minimum(view.keep, view.candidates.sum(-1)).to(device) for _, view in pairs])
    got = torch.cat([(selected & view.candidates).sum(-1).to(device) for selected, view in pairs])
    if not torch.equal(got, want):
        raise RuntimeError(f"{type(rule).__name__} kept {got.tolist()} visual tokens, not {want.tolist()}")


def methods() -> list[str]:
    """Names of the registered methods."""
    return METHODS.names()


def get(name: str, **knobs) -> Method:
    """Build the registered method `name` with `knobs`."""
    return METHODS.get(name, **knobs)
