"""A stratified spread before the decoder: one jittered token per block of an even tiling of each image.

    st3.get("stratified")       # keep `keep` tokens before the decoder: one per block of each image's grid
    st3.get("st3+stratified")   # ST3's progressive schedule, the stratified choice at each pruning layer

Why (docs/methods.md): spreading a budget over the image beats every attention ranking on the scenes model,
but a regular lattice aliases at low budgets; a token drawn anywhere inside each block does not.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from st3.methods.base import register
from st3.methods.composed import Keep, _st3_with
from st3.methods.selectors import Selector, Stratified


@register("stratified")
@dataclass(kw_only=True)
class StratifiedMethod(Keep):
    """Before the decoder, `keep` visual tokens: each image's grid cut into `keep` blocks, one seeded random
    token of each (jittered sampling; `selector=st3.Stratified(within=...)` for the other rules)."""

    selector: Selector | str | None = field(default_factory=Stratified)
    layer: int = 0


ST3Stratified = _st3_with(Stratified, "st3+stratified")
