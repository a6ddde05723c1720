"""st3's best rule on its benchmark: before the decoder, the tokens most spread in feature and image space.

    st3.get("spread")           # keep `keep` tokens before the decoder: max-min over feature + grid distance
    st3.get("st3+spread")       # ST3's progressive schedule, the spread choice at each pruning layer

Why (docs/methods.md): spreading a budget over the image beats every attention ranking on the scenes model;
diversity alone leaves regions unseen and a lattice aliases with regular content; both distances together keep
the distinct tokens of every region, and lead every budget down to 11 % of the tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from st3.methods.base import register
from st3.methods.composed import Keep, _st3_with
from st3.methods.selectors import Selector, Spread


@register("spread")
@dataclass(kw_only=True)
class SpreadMethod(Keep):
    """Before the decoder, `keep` visual tokens: greedy max-min over cosine + `spatial` x grid distance, the
    budget shared among images and frames by token counts (`selector=st3.Spread(spatial=...)` to change it)."""

    selector: Selector | str | None = field(default_factory=Spread)
    layer: int = 0


ST3Spread = _st3_with(Spread, "st3+spread")
