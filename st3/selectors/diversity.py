"""Diversity: keep the tokens farthest from each other (DivPrune), in feature and image space (Spread).

Both run one greedy max-min core (`max_min`): the first pick is the most unique token (whose nearest other token
is farthest), every later pick the token farthest from those already chosen. Spread runs it per image or frame.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from st3.selectors.base import FEATURES, Selector, View, check, features, quantised, register
from st3.selectors.layout import grid_layout


def max_min(distance: torch.Tensor, candidates: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Greedy max-min diversity per row: BoolTensor [N, S] of min(keep, candidates) chosen slots.

    distance: [N, S, S], symmetric. The first pick is the most unique candidate (whose nearest other candidate is
    farthest), every later one the candidate farthest from the picks so far. Ties go to the earlier position.
    """
    same = candidates[:, :, None] & candidates[:, None, :]
    eye = torch.eye(distance.shape[-1], dtype=torch.bool, device=distance.device)
    inf = torch.tensor(float("inf"), dtype=distance.dtype, device=distance.device)
    nearest = torch.where(same & ~eye, distance, inf).amin(-1)
    nearest = torch.where(torch.isinf(nearest), torch.zeros_like(nearest), nearest)  # a single candidate
    closest = torch.full_like(nearest, float("inf"))  # distance to the picks so far
    chosen = torch.zeros_like(candidates)
    rows = torch.arange(candidates.shape[0], device=candidates.device)
    for step in range(int(keep.max()) if keep.numel() else 0):
        open_ = candidates & ~chosen
        pick = (closest if step else nearest).masked_fill(~open_, float("-inf")).argmax(-1)
        active = (keep > step) & open_.any(-1)
        chosen[rows[active], pick[active]] = True
        closest = torch.minimum(closest, distance[rows, pick])
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
        # Each image or frame chooses within itself: distances are taken inside each (sample, group) block only,
        # so a video costs frames x (tokens per frame)^2, not (all its tokens)^2.
        sample, slots, inside, keep = group_blocks(groups, budgets)
        unit, coords = unit[sample[:, None], slots], coords[sample[:, None], slots]
        cosine = (unit @ unit.mT).double()  # float32 products: the rounding below is far coarser
        distance = quantised(1.0 - cosine + self.spatial * torch.cdist(coords, coords))
        picked = max_min(distance, inside, keep)
        chosen = torch.zeros_like(view.candidates)
        chosen[sample[:, None].expand_as(slots)[picked], slots[picked]] = True
        return chosen


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


def group_blocks(groups: torch.Tensor, budgets: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One row per (sample, group) with a budget: its sample [N], its slots [N, n] (in order, then filler),
    which of them are real [N, n], and its budget [N]."""
    rows = [(b, (groups[b] == g).nonzero().squeeze(-1), budget)
            for b, parts in enumerate(budgets.tolist()) for g, budget in enumerate(parts) if budget > 0]  # fmt: skip
    rows = [row for row in rows if row[1].numel()]
    device = groups.device
    if not rows:
        empty = torch.zeros(0, 1, dtype=torch.long, device=device)
        return empty[:, 0], empty, empty.bool(), empty[:, 0]
    slots = torch.nn.utils.rnn.pad_sequence([where for _, where, _ in rows], batch_first=True)
    sizes = torch.tensor([len(where) for _, where, _ in rows], device=device)
    inside = torch.arange(slots.shape[1], device=device) < sizes[:, None]
    sample = torch.tensor([b for b, _, _ in rows], device=device)
    return sample, slots, inside, torch.tensor([budget for *_, budget in rows], device=device)
