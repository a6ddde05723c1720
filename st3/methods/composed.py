"""Shipped compositions of a schedule with a selector or a decode schedule, each under a registry name.

    st3.get("divprune")        # keep `keep` tokens before the decoder, by max-min diversity (the paper's use)
    st3.get("dart")            # keep `keep` tokens from layer 2 on, duplication-aware against key-norm pivots
    st3.get("cdpruner")        # keep `keep` tokens before the decoder, by a conditional DPP
    st3.get("st3+dart")        # ST3's progressive schedule and annealing, DART choosing at each pruning layer
    st3.get("fastv+vta")       # FastV's one-layer prune, then ST3's annealing while decoding

Any other combination is one constructor away: `st3.PyramidDrop(selector=st3.DivPrune(), decode=st3.VTA())`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from st3.methods.base import register
from st3.methods.controls import _KeepCount
from st3.methods.fastv import FastV
from st3.methods.pyramiddrop import PyramidDrop
from st3.methods.selectors import DART, VTA, Attention, CDPruner, DivPrune, RandomPick, Selector, UniformPick
from st3.methods.st3 import ST3


@register("keep")
@dataclass(kw_only=True)
class Keep(_KeepCount):
    """The simplest schedule: `keep` visual tokens from `layer` on (0: before the decoder), chosen by `selector`."""

    selector: Selector | str | None = field(default_factory=Attention)

    def validate(self) -> None:
        super().validate()
        if self.selector is None:
            self.selector = Attention()


@register("divprune")
@dataclass(kw_only=True)
class DivPruneMethod(Keep):
    """DivPrune (arXiv 2503.02175): before the decoder, the max-min diverse `keep` visual tokens."""

    selector: Selector | str | None = field(default_factory=DivPrune)
    layer: int = 0


@register("dart")
@dataclass(kw_only=True)
class DARTMethod(Keep):
    """DART (arXiv 2502.11494): at layer 2, pivots by key norm and the tokens least duplicated by them."""

    selector: Selector | str | None = field(default_factory=DART)
    layer: int = 2


@register("cdpruner")
@dataclass(kw_only=True)
class CDPrunerMethod(Keep):
    """CDPruner (arXiv 2506.10967): before the decoder, a conditional DPP with instruction relevance."""

    selector: Selector | str | None = field(default_factory=CDPruner)
    layer: int = 0


def _st3_with(selector_type: type[Selector], name: str) -> type[ST3]:
    @dataclass(kw_only=True)
    class Composed(ST3):
        selector: Selector | str | None = field(default_factory=selector_type)

    Composed.__name__ = Composed.__qualname__ = f"ST3_{selector_type.__name__}"
    Composed.__doc__ = f"ST3's schedule and annealing; {selector_type.__name__} chooses at each pruning layer."
    return register(name)(Composed)


ST3DivPrune = _st3_with(DivPrune, "st3+divprune")
ST3DART = _st3_with(DART, "st3+dart")
ST3CDPruner = _st3_with(CDPruner, "st3+cdpruner")
ST3Random = _st3_with(RandomPick, "st3+random")
ST3Uniform = _st3_with(UniformPick, "st3+uniform")


@register("fastv+vta")
@dataclass(kw_only=True)
class FastVVTA(FastV):
    """FastV's prune at layer K, then visual token annealing while decoding."""

    decode: VTA | str | None = field(default_factory=VTA)


@register("pyramiddrop+vta")
@dataclass(kw_only=True)
class PyramidDropVTA(PyramidDrop):
    """PyramidDrop's stages, then visual token annealing while decoding."""

    decode: VTA | str | None = field(default_factory=VTA)
