"""Selectors: which visual tokens to keep, given how many (one contract, one registry).

A method is a schedule (where, when and how many) composed with a selector (which ones):
`st3.ST3(selector=st3.selectors.DivPrune())` keeps ST3's progressive counts and chooses by diversity, and
`st3.VTA(evict=st3.selectors.Accumulated())` evicts by attention summed over decoding. `st3.selectors.get(name)`
builds one by name; `names()` lists them.
"""

from st3.selectors.attention import Accumulated, Attention, Coverage, Protected
from st3.selectors.base import READS, SELECTORS, Selector, check, top_k_mask
from st3.selectors.cdpruner import CDPruner
from st3.selectors.dart import DART
from st3.selectors.diversity import DivPrune, Spread
from st3.selectors.sparsevlm import SparseVLM
from st3.selectors.spatial import Lattice, Random, Raster, Stratified
from st3.selectors.view import View

SELECTORS.rename("uniform", "raster")


def names() -> list[str]:
    """The registered selector names."""
    return SELECTORS.names()


def get(name: str, **knobs) -> Selector:
    """The selector registered as `name`, built with `knobs`."""
    return SELECTORS.get(name, **knobs)


__all__ = [
    "READS", "Accumulated", "Attention", "CDPruner", "Coverage", "DART", "DivPrune", "Lattice", "Protected",
    "Random", "Raster", "Selector", "SparseVLM", "Spread", "Stratified", "View", "check", "get", "names", "top_k_mask",
]  # fmt: skip
