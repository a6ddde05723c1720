"""Shipped compositions of a schedule with another selector or a decode schedule, each under a registry name.

    st3.get("st3+dart")        # ST3's progressive schedule and annealing, DART choosing at each pruning layer
    st3.get("fastv+vta")       # FastV's one-layer prune, then ST3's annealing while decoding

Any other combination is one constructor away:
`st3.PyramidDrop(selector=st3.selectors.DivPrune(), decode=st3.VTA(evict="accumulated"))`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from st3.methods.annealing import VTA
from st3.methods.base import register
from st3.methods.fastv import FastV
from st3.methods.pyramiddrop import PyramidDrop
from st3.methods.st3 import ST3
from st3.selectors import DART, CDPruner, DivPrune, Random, Raster, Selector, Spread, Stratified


def _st3_with(rule: type[Selector], name: str) -> type[ST3]:
    @dataclass(kw_only=True)
    class Composed(ST3):
        def default_selector(self) -> Selector:
            return rule()

    Composed.__name__ = Composed.__qualname__ = f"ST3_{rule.__name__}"
    Composed.__doc__ = f"ST3's schedule and annealing; the {rule.name} selector chooses at each pruning layer."
    return register(name)(Composed)


ST3DivPrune = _st3_with(DivPrune, "st3+divprune")
ST3DART = _st3_with(DART, "st3+dart")
ST3CDPruner = _st3_with(CDPruner, "st3+cdpruner")
ST3Random = _st3_with(Random, "st3+random")
ST3Raster = _st3_with(Raster, "st3+raster")
ST3Spread = _st3_with(Spread, "st3+spread")
ST3Stratified = _st3_with(Stratified, "st3+stratified")


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
