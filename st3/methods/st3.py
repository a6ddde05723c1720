"""ST3: Spatial-Temporal visual token Trimming (Zhuang et al., AAAI 2025, arXiv 2412.20105).

The paper's constants are not public in our sources; this is the definition st3 ships.

PVTP, progressive visual token pruning (space: depth). Pruning layers are start_layer, start_layer +
stride, ... When a sample holding n visual tokens enters a pruning layer l, it keeps
k = max(min_keep, ceil((1 - ratio) * n)) of them (never more than n): those that received the most
attention at layer l - 1 from the query rows (`query`: the last prompt token, or the mean over the text
tokens after the image), averaged over heads. The others leave the hidden states and the KV cache of
layer l and of every later layer; survivors keep their original positions. (At layer 0 there is no
earlier layer: its own attention is used.)

VTA, visual token annealing (time: decoding). With n_l the visual tokens layer l holds after prefill,
its budget for the t-th decode forward (t = 0, 1, ...) is B(l, t) = max(min_keep, round(n_l * a(t))),
where a falls from a(0) = 1 to `anneal_final` over `anneal_steps` generated tokens along
`anneal_curve`. Every `anneal_every` steps, after a decode forward, a layer holding more than its next
budget evicts from its KV cache the visual tokens that the current token attended to least at that layer
(the current step's attention, not accumulated: the token being written is what decides what is still
looked at). That is `anneal_evict='current'`, the default; the alternatives ('accumulated', 'protected',
'coverage', 'diverse' or any selector's name) and `anneal_delay` are st3's (see `st3.VTA`, docs/methods.md).

Composition: `selector=` replaces the attention ranking at the pruning layers (e.g. `st3.selectors.DivPrune()`),
the schedule and annealing stay ST3's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from st3.methods.annealing import CURVES, VTA, anneal
from st3.methods.base import Method, check, register, share
from st3.selectors import Attention, Selector

__all__ = ["CURVES", "ST3", "anneal"]


@register("st3")
@dataclass(kw_only=True)
class ST3(Method):
    """Progressive visual token pruning over depth + visual token annealing over decoding steps."""

    budget_knob: ClassVar[str] = "ratio"

    start_layer: int = 2
    """l0: first pruning layer. FastV's finding: layers 0-1 attend to the image broadly, later ones sparsely."""
    stride: int = 3
    """S: layers between pruning layers."""
    ratio: float = 0.2
    """R: share of the held visual tokens removed at each pruning layer."""
    min_keep: int = 4
    """Visual tokens a layer keeps at least (prefill and decode)."""
    query: str = "last"
    """Rows whose attention ranks tokens at prefill: 'last' prompt token or 'text' after the image."""
    anneal_curve: str = "cosine"
    """Shape of a(t): 'cosine' (gentle at first, while the answer's first words are chosen), 'linear', 'exponential'."""
    anneal_final: float = 0.3
    """a_final: share of its post-prefill visual tokens a layer keeps once annealing is over (1 disables VTA)."""
    anneal_steps: int = 32
    """Generated tokens over which a(t) falls from 1 to anneal_final."""
    anneal_every: int = 4
    """Re-evaluate budgets (and evict) every this many decode steps."""
    anneal_evict: str = "current"
    """Eviction rule: 'current' (the paper), 'accumulated', 'protected', 'coverage', 'diverse' or a selector's name
    (`st3.VTA`)."""
    anneal_protect: float = 0.5
    """'protected'/'coverage': the share of each budget kept by accumulated / current attention."""
    anneal_delay: int = 0
    """Decode steps before annealing starts."""

    _vta: tuple | None = field(default=None, init=False, repr=False, compare=False)

    def validate(self) -> None:
        check(self.start_layer >= 0, "start_layer", f"must be >= 0, got {self.start_layer}")
        check(self.stride >= 1, "stride", f"must be >= 1, got {self.stride}")
        check(0.0 <= self.ratio < 1.0, "ratio", f"must be in [0, 1), got {self.ratio}")
        check(self.min_keep >= 0, "min_keep", f"must be >= 0, got {self.min_keep}")
        check(self.query in ("last", "text"), "query", f"must be 'last' or 'text', got {self.query!r}")
        check(self.decode is None, "decode", "ST3 anneals by its own anneal_* knobs; leave decode unset")
        _ = self.annealing  # building the VTA validates the anneal_* knobs

    def validate_for(self, num_layers: int) -> None:
        check(
            self.start_layer < num_layers,
            "start_layer",
            f"{self.start_layer} is beyond the model's last layer ({num_layers - 1})",
        )

    def default_selector(self) -> Selector:
        return Attention(query=self.query)

    def depth_knobs(self) -> dict[str, int]:
        return {"start_layer": self.start_layer, "stride": self.stride}

    def is_pruning_layer(self, layer: int) -> bool:
        return layer >= self.start_layer and (layer - self.start_layer) % self.stride == 0

    @property
    def annealing(self) -> VTA:
        """The anneal_* knobs as a `VTA`, built (and validated) again only when a knob changed: the engine
        reads it at every decode forward."""
        knobs = (
            self.anneal_curve,
            self.anneal_final,
            self.anneal_steps,
            self.anneal_every,
            self.min_keep,
            self.anneal_evict,
            self.anneal_protect,
            self.anneal_delay,
        )
        if self._vta is None or self._vta[0] != knobs:
            names = ("curve", "final", "steps", "every", "min_keep", "evict", "protect", "delay")
            try:
                self._vta = (knobs, VTA(**dict(zip(names, knobs))))
            except ValueError as error:  # name the knob the user set: anneal_evict, not VTA's evict
                knob, _, message = str(error).partition(": ")
                raise ValueError(f"{knob if knob == 'min_keep' else 'anneal_' + knob}: {message}") from None
        return self._vta[1]

    def prefill_keep(self, layer: int, num_layers: int, visual: torch.Tensor) -> torch.Tensor | None:
        if not self.is_pruning_layer(layer) or self.ratio == 0.0:
            return None
        return share(visual, 1.0 - self.ratio, self.min_keep)
