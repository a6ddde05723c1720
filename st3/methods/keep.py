"""The simplest schedule, `Keep`: `keep` visual tokens from `layer` on, chosen by a selector; and the methods
that are that schedule with a rule of their own.

    st3.get("divprune")        # keep `keep` tokens before the decoder, by max-min diversity (the paper's use)
    st3.get("dart")            # keep `keep` tokens from layer 2 on, duplication-aware against key-norm pivots
    st3.get("cdpruner")        # keep `keep` tokens before the decoder, by a conditional DPP
    st3.get("spread")          # before the decoder, max-min over feature + grid distance (st3's best rule)
    st3.get("stratified")      # before the decoder, one jittered token per block of each image's grid
    st3.get("random")          # controls: a seeded draw ...
    st3.get("lattice")         # ... or a lattice per image grid, from layer 2 on (FastV's layer)

Each method's rule is its selector (`st3.selectors`); `selector=` swaps it, e.g.
`st3.Spread(keep=64, selector=st3.selectors.Spread(spatial=1.0))`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from st3.methods.base import Method, check, register
from st3.selectors import DART as DARTRule
from st3.selectors import Attention, Selector
from st3.selectors import CDPruner as CDPrunerRule
from st3.selectors import DivPrune as DivPruneRule
from st3.selectors import Lattice as LatticeRule
from st3.selectors import Random as RandomRule
from st3.selectors import Spread as SpreadRule
from st3.selectors import Stratified as StratifiedRule
from st3.selectors.dart import DART_VARIANTS


@register("keep")
@dataclass(kw_only=True)
class Keep(Method):
    """`keep` visual tokens from `layer` on (0: before the decoder), chosen by `selector` (default: attention)."""

    budget_knob: ClassVar[str] = "keep"
    rule_type: ClassVar[type[Selector]] = Attention
    """The selector a method of this schedule keeps tokens by when none is given."""

    keep: int = 192
    """Visual tokens kept (192 of 576: the first budget of the VisionZip/VScan comparison tables)."""
    layer: int = 2
    """The layer from which on only the kept tokens remain (FastV's default; 0: before the decoder)."""

    def validate(self) -> None:
        check(self.keep >= 0, "keep", f"must be >= 0, got {self.keep}")
        check(self.layer >= 0, "layer", f"must be >= 0, got {self.layer}")

    def validate_for(self, num_layers: int) -> None:
        check(self.layer < num_layers, "layer", f"{self.layer} is beyond the model's last layer ({num_layers - 1})")

    def default_selector(self) -> Selector:
        return self.rule_type()

    def depth_knobs(self) -> dict[str, int]:
        return {"layer": self.layer} if self.layer else {}

    def prefill_keep(self, layer: int, num_layers: int, visual: torch.Tensor) -> torch.Tensor | None:
        return visual.clamp(max=self.kept()) if layer == self.layer else None

    def kept(self) -> int:
        """Tokens kept for the `keep` knob: the knob itself, or what the rule keeps for it (`kept_for`: DART's
        official rule keeps its image pivots plus an equal share per pivot, k + 4 for k = 128)."""
        rule = self.selector if self.selector is not None else self.default_selector()
        kept_for = getattr(rule, "kept_for", None)
        return kept_for(self.keep) if kept_for is not None else self.keep


@register("random")
@dataclass(kw_only=True)
class Random(Keep):
    """Control: `keep` visual tokens drawn at random (seeded: the same patches for every sample)."""

    seed: int = 0
    """Seed of the draw."""

    def default_selector(self) -> Selector:
        return RandomRule(seed=self.seed)


@register("lattice")
@dataclass(kw_only=True)
class Lattice(Keep):
    """Control: `keep` visual tokens on a lattice per image grid (the budget shared among a sample's images and
    frames by token counts; every n-th visual token where the model gives no grid)."""

    rule_type: ClassVar[type[Selector]] = LatticeRule


@register("divprune")
@dataclass(kw_only=True)
class DivPrune(Keep):
    """DivPrune (arXiv 2503.02175): before the decoder, the max-min diverse `keep` visual tokens."""

    rule_type: ClassVar[type[Selector]] = DivPruneRule
    layer: int = 0


@register("dart")
@dataclass(kw_only=True)
class DART(Keep):
    """DART (arXiv 2502.11494): at layer 2, pivots by key norm and the tokens least duplicated by them. As the
    released code, `keep` is its `max_num_trunction` k: 4 image pivots + 8 pivots x k // 8 picks stay (132 for
    128); `variant="union"` keeps exactly k by st3's former rule (`st3.selectors.DART`)."""

    rule_type: ClassVar[type[Selector]] = DARTRule
    variant: str = "official"
    """'official' (the released rule and count) or 'union' (st3's former rule, exactly `keep`, 8 pivots)."""

    def validate(self) -> None:
        super().validate()
        check(self.variant in DART_VARIANTS, "variant", f"must be one of {DART_VARIANTS}, got {self.variant!r}")

    def default_selector(self) -> Selector:
        return DARTRule(variant=self.variant, pivots=8 if self.variant == "union" else 4)


@register("cdpruner")
@dataclass(kw_only=True)
class CDPruner(Keep):
    """CDPruner (arXiv 2506.10967): before the decoder, a conditional DPP with instruction relevance."""

    rule_type: ClassVar[type[Selector]] = CDPrunerRule
    layer: int = 0


@register("spread")
@dataclass(kw_only=True)
class Spread(Keep):
    """st3's best rule on its benchmark: before the decoder, `keep` visual tokens by greedy max-min over cosine +
    `spatial` x grid distance, the budget shared among images and frames by token counts (docs/methods.md)."""

    rule_type: ClassVar[type[Selector]] = SpreadRule
    layer: int = 0


@register("stratified")
@dataclass(kw_only=True)
class Stratified(Keep):
    """Before the decoder, `keep` visual tokens: each image's grid cut into `keep` blocks, one seeded random
    token of each (jittered sampling; `selector=st3.selectors.Stratified(within=...)` for the other rules)."""

    rule_type: ClassVar[type[Selector]] = StratifiedRule
    layer: int = 0

