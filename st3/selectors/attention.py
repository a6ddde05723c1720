"""Rules that rank visual tokens by the attention they receive (FastV, ST3, PyramidDrop; VTA's evictions).

`attention` reads the scoring layer's attention from chosen query rows (in decode: the token being written);
the three decode rules also read `view.received`, the attention summed over the decode steps so far (the engine
accumulates it only when the eviction rule reads it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from st3.selectors.base import Selector, View, check, register, top_k_mask

QUERIES = ("last", "text", "all")
SCORED_AT = ("before", "own")


@register("attention")
@dataclass(kw_only=True)
class Attention(Selector):
    """The most attended visual tokens, heads averaged (in decode: by the token being written)."""

    reads: ClassVar[frozenset[str]] = frozenset({"attention"})
    exact: ClassVar[bool] = True
    query: str = "last"
    """Query rows at prefill: the 'last' prompt token, the 'text' rows after the image (mean), or 'all' rows."""
    scored_at: str = "before"
    """Prefill: 'before', the attention computed by the layer before (FastV's layer K-1); 'own', the attention
    the layer being entered gives its input rows (its own norm and q/k projections: PyramidDrop's released code)."""

    def validate(self) -> None:
        check(self.query in QUERIES, "query", f"must be one of {QUERIES}, got {self.query!r}")
        check(self.scored_at in SCORED_AT, "scored_at", f"must be one of {SCORED_AT}, got {self.scored_at!r}")

    def score(self, view: View) -> torch.Tensor:
        attention = view.attention
        if self.scored_at == "own" and not view.decoding:
            if view.own_attention is None:
                raise ValueError("Attention(scored_at='own') needs the layer's own projections, which this path "
                                 "does not provide; use scored_at='before'")
            attention = view.own_attention
        if view.decoding or self.query == "last":
            return attention(None)
        return attention(view.text() if self.query == "text" else view.valid)


@register("accumulated")
@dataclass(kw_only=True)
class Accumulated(Selector):
    """Decode: the visual tokens with the most attention summed over every decode step so far."""

    reads: ClassVar[frozenset[str]] = frozenset({"received"})
    exact: ClassVar[bool] = True

    def score(self, view: View) -> torch.Tensor:
        return view.received


@register("protected")
@dataclass(kw_only=True)
class Protected(Selector):
    """Decode: the `share` of the budget with the most accumulated attention, the rest by the current token's."""

    reads: ClassVar[frozenset[str]] = frozenset({"attention", "received"})
    exact: ClassVar[bool] = True  # two top-k masks with complementary counts
    share: float = 0.5
    """Share of each budget kept by accumulated attention."""

    def validate(self) -> None:
        check(0.0 <= self.share <= 1.0, "share", f"must be in [0, 1], got {self.share}")

    def select(self, view: View) -> torch.Tensor:
        return two_part(view, view.received, view.attention(None), self.share)


@register("coverage")
@dataclass(kw_only=True)
class Coverage(Selector):
    """Decode: the `share` of the budget the current token attends to most, the rest to the tokens with the
    *least* accumulated attention (not read yet: a caption's cells still to describe)."""

    reads: ClassVar[frozenset[str]] = frozenset({"attention", "received"})
    exact: ClassVar[bool] = True  # two top-k masks with complementary counts
    share: float = 0.5
    """Share of each budget kept by the current token's attention."""

    def validate(self) -> None:
        check(0.0 <= self.share <= 1.0, "share", f"must be in [0, 1], got {self.share}")

    def select(self, view: View) -> torch.Tensor:
        return two_part(view, view.attention(None), -view.received, self.share)


def two_part(view: View, first: torch.Tensor, rest: torch.Tensor, share: float) -> torch.Tensor:
    """The top floor(keep * share) candidates by `first`, then the rest of the budget by `rest` among the others
    (two top-k masks with complementary counts: exactly `keep`)."""
    chosen = top_k_mask(first, view.candidates, torch.floor(view.keep * share).long())
    return chosen | top_k_mask(rest, view.candidates & ~chosen, view.keep - chosen.sum(-1))
