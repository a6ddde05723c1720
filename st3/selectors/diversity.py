"""Diversity: keep the tokens farthest from each other (DivPrune), in feature and image space (Spread).

Both run one greedy max-min core (`max_min`): the first pick of each group is its most unique token (whose
nearest other token is farthest), every later pick the token farthest from those already chosen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from st3.selectors.base import FEATURES, Selector, View, check, features, quantised, register
from st3.selectors.layout import grid_layout


def max_min(
    distance: torch.Tensor,
    candidates: torch.Tensor,
    keep: torch.Tensor,
    groups: torch.Tensor | None = None,
    budgets: torch.Tensor | None = None,
) -> torch.Tensor:
    """Greedy max-min diversity per sample: BoolTensor [B, S] of min(keep, candidates) chosen slots.

    distance: [B, S, S], symmetric. With `groups` [B, S] (-1: none) and `budgets` [B, G], each group is chosen
    within itself and takes at most its budget: a group without a pick yet goes first (by its most unique
    token), then the token farthest from the picks of its own group wins. Ties go to the earlier position.
    """
    if groups is None:
        groups = torch.where(candidates, 0, -1)
        budgets = keep[:, None]
    same = (groups[:, :, None] == groups[:, None, :]) & (groups[:, :, None] >= 0)
    eye = torch.eye(distance.shape[-1], dtype=torch.bool, device=distance.device)
    inf = torch.tensor(float("inf"), dtype=distance.dtype, device=distance.device)
    nearest = torch.where(same & ~eye, distance, inf).amin(-1)
    nearest = torch.where(torch.isinf(nearest), torch.zeros_like(nearest), nearest)  # a group of one token
    closest = torch.full_like(nearest, float("inf"))  # distance to the picks of the token's own group
    chosen = torch.zeros_like(candidates)
    taken = torch.zeros_like(budgets)
    started = torch.zeros_like(budgets, dtype=torch.bool)
    rows = torch.arange(candidates.shape[0], device=candidates.device)
    group = groups.clamp(min=0)
    for step in range(int(keep.max()) if keep.numel() else 0):
        open_ = candidates & ~chosen & (budgets.gather(-1, group) > taken.gather(-1, group))
        fresh = open_ & ~started.gather(-1, group)
        first = fresh.any(-1, keepdim=True)  # a group without a pick goes first, by its most unique token
        score = torch.where(first, nearest, closest).masked_fill(~torch.where(first, fresh, open_), float("-inf"))
        pick = score.argmax(-1)
        active = (keep > step) & open_.any(-1)
        picked = group[rows, pick]
        chosen[rows[active], pick[active]] = True
        taken[rows[active], picked[active]] += 1
        started[rows[active], picked[active]] = True
        closest = torch.minimum(closest, torch.where(same[rows, pick], distance[rows, pick], inf))
    return chosen


@register("divprune")
@dataclass(kw_only=True)
class DivPrune(Selector):
    """DivPrune (Alvar et al., CVPR 2025, arXiv 2503.02175): the max-min diverse subset of the visual tokens.

    Rule: cosine distance between the tokens' features; greedily add the token whose distance to the nearest
    token already chosen is largest (the first: the most unique token). No attention, no instruction: before
    the decoder it reads the visual embeddings (the projector's outputs), at a decoder layer the hidden states
    entering it, in decode the cached keys.
    """

    reads: ClassVar[frozenset[str]] = frozenset({"features"})
    features: str = "hidden"
    """'hidden' (the paper: the visual tokens' features) or 'keys' (the layer's keys)."""

    def validate(self) -> None:
        check(self.features in FEATURES, "features", f"must be one of {FEATURES}, got {self.features!r}")

    def select(self, view: View) -> torch.Tensor:
        unit = F.normalize(features(view, self.features), dim=-1)
        return max_min(1.0 - unit @ unit.transpose(1, 2), view.candidates, view.keep)


@register("spread")
@dataclass(kw_only=True)
class Spread(Selector):
    """Spread (ours; st3's best rule on its benchmark): the max-min diverse subset in feature *and* image space.

    DivPrune's greedy max-min, over a distance that adds to the tokens' cosine distance `spatial` times their
    distance on the image grid (as a share of the grid's diagonal). Feature distance alone (DivPrune) piles
    the budget onto a few distinct patterns and leaves whole regions unseen; space alone is a lattice, which
    aliases with regular content and spends tokens on background. Together, the first picks land on what is
    distinct and every later pick is pushed away from the regions already covered, so objects get tokens and
    no region goes unseen. The budget is shared among a sample's images and video frames by token counts, and
    each runs its own max-min (its first pick: its most unique token). Needs the grids for the space term (the
    engine passes them where the adapter knows them); without them, positions along prompt order.
    """

    reads: ClassVar[frozenset[str]] = frozenset({"features", "layout"})
    spatial: float = 2.0
    """Weight of the grid distance (a share of the diagonal) against the cosine distance; 0 is DivPrune's rule
    within each image (up to the rounding of near-ties). Chosen on validation (docs/methods.md): 1 to 4 alike."""
    features: str = "hidden"
    """'hidden' (before the decoder: the visual embeddings; at a decoder layer its input) or 'keys'."""

    def validate(self) -> None:
        check(0 <= self.spatial <= 1e6, "spatial", f"must be in [0, 1e6] (a lattice long before), got {self.spatial}")
        check(self.features in FEATURES, "features", f"must be one of {FEATURES}, got {self.features!r}")

    def select(self, view: View) -> torch.Tensor:
        groups, coords, budgets = layout(view)
        unit = F.normalize(features(view, self.features), dim=-1)
        cosine = (unit @ unit.transpose(1, 2)).double()  # float32 products: the rounding below is far coarser
        distance = quantised(1.0 - cosine + self.spatial * torch.cdist(coords, coords))
        return max_min(distance, view.candidates, view.keep, groups, budgets)


def layout(view: View) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """groups [B, S] (-1: not a candidate), coords [B, S, 2], budgets [B, G]: each group's share of keep."""
    candidates, keep = view.candidates, view.keep
    batch, slots = candidates.shape
    groups = torch.full((batch, slots), -1, dtype=torch.long)
    coords = torch.zeros(batch, slots, 2, dtype=torch.float64)
    per_sample = []
    for b in range(batch):
        where = candidates[b].nonzero().squeeze(-1).cpu()
        group, coord, budget = grid_layout(None if view.grids is None else view.grids[b], len(where), int(keep[b]))
        groups[b, where] = torch.tensor(group, dtype=torch.long)
        coords[b, where] = torch.tensor(coord, dtype=torch.float64).reshape(-1, 2)
        per_sample.append(budget)
    budgets = torch.zeros(batch, max(len(p) for p in per_sample), dtype=torch.long)
    for b, parts in enumerate(per_sample):
        budgets[b, : len(parts)] = torch.tensor(parts, dtype=torch.long)
    device = candidates.device
    return groups.to(device), coords.to(device), budgets.to(device)
