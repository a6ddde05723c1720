"""Rules that choose by place, not content: a seeded draw, every n-th patch, a lattice, one per block.

Random, `raster` and `lattice` ignore what the tokens hold (controls: attention-based scoring must beat them at
the same budget to earn its keep); `stratified` cuts each image into as many blocks as tokens kept and keeps
one token of each. Each picks by patch index or grid cell, so every sample of a batch keeps the same patches
whatever its padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from st3.selectors.base import FEATURES, Selector, View, check, features, quantised, register, seeded_draw
from st3.selectors.layout import lattice_cells, strata, tiles


@register("random")
@dataclass(kw_only=True)
class Random(Selector):
    """Seeded random patches: one draw per patch index, the same for every sample (batches do not matter)."""

    exact: ClassVar[bool] = True
    seed: int = 0
    """Seed of the draw."""

    def score(self, view: View) -> torch.Tensor:
        return seeded_draw(self.seed, view.patches)


@register("raster")
@dataclass(kw_only=True)
class Raster(Selector):
    """Evenly spaced patches in raster (prompt) order: every n-th visual token."""

    def select(self, view: View) -> torch.Tensor:
        return evenly_spaced(view.candidates, view.keep, view.patches)


def evenly_spaced(candidates: torch.Tensor, keep: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
    """BoolTensor [B, S]: keep[b] candidates evenly spaced in prompt order (by their index `patches`)."""
    n = candidates.sum(-1, keepdim=True).double()
    slots = torch.arange(int(keep.max()), device=keep.device).double()
    centres = torch.floor((slots + 0.5) * n / keep.clamp(min=1)[:, None])  # [B, keep]: evenly spaced patches
    centres = centres.masked_fill(slots >= keep[:, None], -1)
    return candidates & (patches[..., None] == centres[:, None, :]).any(-1)


@register("lattice")
@dataclass(kw_only=True)
class Lattice(Selector):
    """A lattice per image grid: the budget shared among a sample's images and frames by token counts, each
    grid's share on a lattice of about sqrt(keep * rows / cols) rows. Where the grids are unknown (or earlier
    layers dropped tokens), every n-th visual token in prompt order (`raster`)."""

    reads: ClassVar[frozenset[str]] = frozenset({"layout"})

    def select(self, view: View) -> torch.Tensor:
        candidates, keep, patches = view.candidates, view.keep, view.patches
        counts = candidates.sum(-1).tolist()
        if view.grids is None or not all(tiles(grids, n) for grids, n in zip(view.grids, counts)):
            return evenly_spaced(candidates, keep, patches)
        chosen = torch.zeros_like(candidates)
        for b, grids in enumerate(view.grids):
            cells = torch.tensor(lattice_cells(grids, int(keep[b])), dtype=patches.dtype, device=patches.device)
            chosen[b] = candidates[b] & torch.isin(patches[b], cells)
        return chosen


@register("stratified")
@dataclass(kw_only=True)
class Stratified(Selector):
    """Stratified spread: one token per block of an even tiling of each image, chosen by its content.

    A lattice keeps the token at the same offset in every block, so at low budgets it aliases with any regular
    structure of the image (objects centred on a grid are missed when every lattice point falls between them).
    Here each image's grid is cut into as many near-equal blocks as tokens kept (the lattice's blocks), and
    each block keeps one token: a seeded random one (`within='jitter'`, jittered sampling: spread like the
    lattice, unaligned like Random; measured best), its most salient one (`'salient'`: farthest, cosine, from
    the sample's mean visual feature), or the one farthest from the tokens already chosen (`'diverse'`: DivPrune
    inside the spatial strata). Needs the grids (else the blocks are runs of prompt order).
    """

    reads: ClassVar[frozenset[str]] = frozenset({"layout", "features"})
    within: str = "jitter"
    """Which token of each block: 'jitter' (seeded; measured best), 'salient' or 'diverse'."""
    features: str = "hidden"
    """Features for 'salient'/'diverse': 'hidden' (before the decoder, the visual embeddings) or 'keys'."""
    seed: int = 0
    """Seed of 'jitter' (a draw per patch index, as `random`: the same for every sample)."""

    WITHIN: ClassVar[tuple[str, ...]] = ("salient", "diverse", "jitter")

    def validate(self) -> None:
        check(self.within in self.WITHIN, "within", f"must be one of {self.WITHIN}, got {self.within!r}")
        check(self.features in FEATURES, "features", f"must be one of {FEATURES}, got {self.features!r}")

    def labels(self, view: View) -> torch.Tensor:
        """LongTensor [B, S]: each candidate's stratum (-1: none, and every non-candidate)."""
        candidates, keep = view.candidates, view.keep
        labels = torch.full(candidates.shape, -1, dtype=torch.long, device=candidates.device)
        for b in range(candidates.shape[0]):
            count = int(candidates[b].sum())
            grids = None if view.grids is None else view.grids[b]
            labels[b, candidates[b]] = torch.tensor(
                strata(grids, count, int(keep[b])), dtype=torch.long, device=candidates.device
            )
        return labels

    def score(self, view: View) -> torch.Tensor:
        """[B, S] (float64): higher wins its stratum; 'salient' quantised."""
        if self.within == "jitter":
            return seeded_draw(self.seed, view.patches, torch.float64)
        unit = F.normalize(features(view, self.features), dim=-1)
        mask = view.candidates[..., None].to(unit.dtype)
        mean = F.normalize((unit * mask).sum(1) / mask.sum(1).clamp(min=1), dim=-1)  # [B, d]
        return quantised(1.0 - (unit @ mean[:, :, None])[..., 0])

    def select(self, view: View) -> torch.Tensor:
        labels = self.labels(view)
        if self.within == "diverse":
            return self.diverse(view, labels)
        return best_per_stratum(self.score(view), labels)

    def diverse(self, view: View, labels: torch.Tensor) -> torch.Tensor:
        """Strata in order; each keeps its token farthest (cosine) from those chosen so far (the first: the most
        salient)."""
        unit = F.normalize(features(view, self.features), dim=-1)
        closest = self.score(view)  # the first stratum keeps its most salient token
        chosen = torch.zeros_like(view.candidates)
        rows = torch.arange(labels.shape[0], device=labels.device)
        for stratum in range(int(view.keep.max()) if view.keep.numel() else 0):
            inside = labels == stratum
            score = closest.masked_fill(~inside, float("-inf"))
            pick = score.argmax(-1)  # first position among equal (quantised) scores
            has = inside.any(-1)
            chosen[rows[has], pick[has]] = True
            distance = quantised(1.0 - (unit @ unit[rows, pick][:, :, None])[..., 0])
            closest = torch.where(has[:, None], torch.minimum(closest, distance), closest) if stratum else distance
        return chosen


def best_per_stratum(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """BoolTensor [B, S]: in each stratum (labels >= 0) the highest score, ties to the earlier position."""
    chosen = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    order = torch.sort(scores.masked_fill(labels < 0, float("-inf")), dim=-1, descending=True, stable=True).indices
    by_stratum = torch.sort(labels.gather(-1, order), dim=-1, stable=True)
    sorted_labels = by_stratum.values
    first = torch.ones_like(sorted_labels, dtype=torch.bool)
    first[:, 1:] = sorted_labels[:, 1:] != sorted_labels[:, :-1]
    first &= sorted_labels >= 0
    positions = order.gather(-1, by_stratum.indices)
    chosen.scatter_(-1, positions, first)
    return chosen
