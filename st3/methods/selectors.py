"""Selectors: which visual tokens a schedule keeps, given how many (kvpress-style composition).

A method is a schedule (where, when and how many: `ST3`, `FastV`, `PyramidDrop`, a keep count at one layer,
plus an optional decode schedule `VTA`) times a selector (which ones). `st3.ST3(selector=st3.DivPrune())`
keeps ST3's progressive counts and chooses by diversity. The engine hands a selector a `View` of the layer
where it acts; everything in it is computed lazily, so a rule pays only for what it reads.

Every rule here is per sample: a sample's choice depends on its own tokens only, never on its batch-mates
(padding, other images), which the tests check for every selector.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from st3.engine.view import View
from st3.knobs import check_types

QUERY_ROWS = ("last", "text", "all")


def top_k_mask(scores: torch.Tensor, candidates: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """BoolTensor [B, S]: the k[b] highest-scoring candidates of each row (ties broken by position)."""
    masked = torch.where(candidates, scores, float("-inf"))
    order = torch.sort(masked, dim=-1, descending=True, stable=True).indices
    ranks = order.argsort(dim=-1)  # the inverse permutation: each slot's place in the order (6 ops in all)
    return candidates & (ranks < k[:, None])


def check(condition: bool, knob: str, message: str) -> None:
    """Raise a ValueError naming `knob` unless `condition` holds."""
    if not condition:
        raise ValueError(f"{knob}: {message}")


@dataclass(kw_only=True)
class Selector:
    """Base: `select(view)` returns BoolTensor [B, S], view.keep[b] of the candidates of each sample."""

    name: ClassVar[str] = "selector"
    #: Whether the rule reads attention (then a decoder layer must have run: not before the decoder).
    needs_attention: ClassVar[bool] = False

    def __post_init__(self) -> None:
        check_types(self)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the knob when a setting is out of range."""

    def select(self, view: View) -> torch.Tensor:
        raise NotImplementedError


@dataclass(kw_only=True)
class Attention(Selector):
    """The attention ranking of FastV/ST3/PyramidDrop: the most attended visual tokens, from `query` rows."""

    name: ClassVar[str] = "attention"
    needs_attention: ClassVar[bool] = True
    query: str = "last"
    """'last' prompt token, 'text' rows after the image (mean), or 'all' rows (mean)."""

    def validate(self) -> None:
        check(self.query in QUERY_ROWS, "query", f"must be one of {QUERY_ROWS}, got {self.query!r}")

    def select(self, view: View) -> torch.Tensor:
        return top_k_mask(view.attention("current" if view.decoding else self.query), view.candidates, view.keep)


@dataclass(kw_only=True)
class RandomPick(Selector):
    """Seeded random patches: the same draw for every sample (by patch index), so batches do not matter."""

    name: ClassVar[str] = "random"
    seed: int = 0

    def select(self, view: View) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed)
        draw = torch.rand(int(view.patches.max()) + 1, generator=generator).to(view.patches.device)
        return top_k_mask(draw[view.patches.clamp(min=0)], view.candidates, view.keep)


@dataclass(kw_only=True)
class UniformPick(Selector):
    """Evenly spaced patches in raster order (every n-th)."""

    name: ClassVar[str] = "uniform"

    def select(self, view: View) -> torch.Tensor:
        return evenly_spaced(view.candidates, view.keep, view.patches)


def evenly_spaced(candidates: torch.Tensor, keep: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
    """BoolTensor [B, S]: keep[b] candidates evenly spaced in prompt order (by their index `patches`)."""
    n = candidates.sum(-1, keepdim=True).double()
    slots = torch.arange(int(keep.max()), device=keep.device).double()
    centres = torch.floor((slots + 0.5) * n / keep.clamp(min=1)[:, None])  # [B, keep]: evenly spaced patches
    centres = centres.masked_fill(slots >= keep[:, None], -1)
    return candidates & (patches[..., None] == centres[:, None, :]).any(-1)


def lattice_blocks(rows: int, cols: int, keep: int) -> list[int]:
    """Block of each raster index of a rows x cols grid: `keep` blocks tile it, one per kept token, or -1.

    The grid is cut into r x c near-equal rectangles, r x c the lattice of `controls.lattice` (about
    sqrt(keep * rows / cols) rows); where r x c exceeds `keep`, the same evenly spread subset of blocks is used
    and the others' tokens get -1. Each block's token is then chosen by content, not at a fixed offset.
    """
    if keep <= 0:
        return [-1] * (rows * cols)
    if keep >= rows * cols:
        return list(range(rows * cols))
    r = min(rows, max(1, round(math.sqrt(keep * rows / cols))))
    c = min(cols, math.ceil(keep / r))
    r = min(rows, math.ceil(keep / c))
    used = {math.floor((s + 0.5) * r * c / keep): s for s in range(keep)}
    return [used.get((y * r // rows) * c + x * c // cols, -1) for y in range(rows) for x in range(cols)]


def apportion(total: int, sizes: list[int]) -> list[int]:
    """Split `total` over parts of `sizes` in proportion (largest remainder), never above a part's size."""
    whole = sum(sizes)
    if total >= whole:
        return list(sizes)
    exact = [total * size / whole for size in sizes]
    parts = [math.floor(x) for x in exact]
    for i in sorted(range(len(sizes)), key=lambda i: parts[i] - exact[i])[: total - sum(parts)]:
        parts[i] += 1
    return parts


def strata(grids: list | None, count: int, keep: int) -> list[int]:
    """Stratum of each of a sample's `count` candidates (prompt order), `keep` strata in all, -1 for none.

    With grids (images, video frames) the budget is shared by token counts (as `Uniform` shares it) and each
    grid is cut by `lattice_blocks`; without them (or once earlier layers dropped tokens) the candidates are
    cut into `keep` equal runs of prompt order.
    """
    if not tiles(grids, count):
        return [min(i * keep // max(count, 1), keep - 1) for i in range(count)] if keep > 0 else [-1] * count
    labels, offset = [], 0
    for grid, frame_part in zip(frames(grids), frame_budgets(grids, keep)):
        blocks = lattice_blocks(grid.rows, grid.cols, frame_part)
        labels += [b + offset if b >= 0 else -1 for b in blocks]
        offset += frame_part
    return labels


def tiles(grids: list | None, count: int) -> bool:
    """Whether a sample's grids lay out exactly its `count` candidates (not once earlier layers dropped some)."""
    return grids is not None and sum(g.tokens for g in grids) == count


def frames(grids: list) -> list:
    """The grid of each image and video frame, in prompt order (a video's grid once per frame)."""
    return [grid for grid in grids for _ in range(grid.frames)]


def frame_budgets(grids: list, keep: int) -> list[int]:
    """`keep` shared among a sample's images by token counts, then each image's share among its frames."""
    return [
        frame_part
        for grid, part in zip(grids, apportion(keep, [g.tokens for g in grids]))
        for frame_part in apportion(part, [grid.rows * grid.cols] * grid.frames)
    ]


def quantised(scores: torch.Tensor, resolution: float = 1e-4) -> torch.Tensor:
    """Scores rounded to `resolution` before ranking: ~1e-7 differences (eager vs sdpa, padded vs alone) then
    leave the rounded values equal, and ties go to the earlier position, so the choice does not flip."""
    return torch.round(scores.double() / resolution)


def _features(view: View, source: str) -> torch.Tensor:
    """[B, S, d] float features of the slots: 'hidden' states (embeddings before the decoder) or 'keys'."""
    if source == "hidden":
        hidden = view.hidden()
        if hidden is not None:
            return hidden.float()
    keys = view.keys()
    return keys.transpose(1, 2).flatten(2).float()  # [B, S, kv_heads * D]


def max_min_diverse(features: torch.Tensor, candidates: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Greedy max-min diversity (DivPrune's solver): add the candidate farthest (cosine) from the chosen set.

    The first pick is the candidate whose nearest other candidate is farthest (the most unique token).
    """
    unit = F.normalize(features, dim=-1)
    distance = 1.0 - unit @ unit.transpose(1, 2)  # [B, S, S]
    pair = candidates[:, :, None] & candidates[:, None, :]
    eye = torch.eye(distance.shape[-1], dtype=torch.bool, device=distance.device)
    inf = torch.tensor(float("inf"), device=distance.device)
    nearest = torch.where(pair & ~eye, distance, inf).amin(-1)  # [B, S]
    nearest = torch.where(torch.isinf(nearest), torch.zeros_like(nearest), nearest)
    chosen = torch.zeros_like(candidates)
    closest = torch.full_like(nearest, float("inf"))  # distance of each candidate to the chosen set
    rows = torch.arange(candidates.shape[0], device=candidates.device)
    for step in range(int(keep.max()) if keep.numel() else 0):
        active = keep > step
        score = nearest if step == 0 else closest
        score = score.masked_fill(~candidates | chosen, float("-inf"))
        pick = score.argmax(-1)
        chosen[rows[active], pick[active]] = True
        closest = torch.minimum(closest, distance[rows, pick])
    return chosen & candidates


@dataclass(kw_only=True)
class DivPrune(Selector):
    """DivPrune (Alvar et al., CVPR 2025, arXiv 2503.02175): the max-min diverse subset of the visual tokens.

    Rule: cosine distance between the tokens' features; greedily add the token whose distance to the nearest
    token already chosen is largest. No attention, no instruction: before the decoder it reads the visual
    embeddings (the projector's outputs), at a decoder layer the hidden states entering it.
    """

    name: ClassVar[str] = "divprune"
    features: str = "hidden"
    """'hidden' (the paper: the visual tokens' features) or 'keys' (the layer's keys)."""

    def validate(self) -> None:
        check(self.features in ("hidden", "keys"), "features", f"must be 'hidden' or 'keys', got {self.features!r}")

    def select(self, view: View) -> torch.Tensor:
        return max_min_diverse(_features(view, self.features), view.candidates, view.keep)


@dataclass(kw_only=True)
class Stratified(Selector):
    """Stratified spread: one token per block of an even tiling of each image, chosen by its content.

    A regular lattice (`UniformPick`, `st3.Uniform`) keeps the token at the same offset in every block, so at
    low budgets it aliases with any regular structure of the image (objects centred on a grid are missed
    when every lattice point falls between them). Here each image's grid is cut into as many near-equal
    blocks as tokens kept (the lattice's blocks), and each block keeps one token: a seeded random one
    (`within='jitter'`, jittered sampling: spread like the lattice, unaligned like Random; measured best),
    its most salient one (`'salient'`: farthest, cosine, from the sample's mean visual feature), or the one
    farthest from the tokens already chosen (`'diverse'`: DivPrune inside the spatial strata). Needs the
    grids (the engine passes them where the adapter knows them; else the blocks are runs of prompt order).
    """

    name: ClassVar[str] = "stratified"
    within: str = "jitter"
    """Which token of each block: 'jitter' (seeded; measured best), 'salient' or 'diverse'."""
    features: str = "hidden"
    """Features for 'salient'/'diverse': 'hidden' (before the decoder, the visual embeddings) or 'keys'."""
    seed: int = 0
    """Seed of 'jitter' (a draw per patch index, as `RandomPick`: the same for every sample)."""

    WITHIN: ClassVar[tuple[str, ...]] = ("salient", "diverse", "jitter")

    def validate(self) -> None:
        check(self.within in self.WITHIN, "within", f"must be one of {self.WITHIN}, got {self.within!r}")
        check(self.features in ("hidden", "keys"), "features", f"must be 'hidden' or 'keys', got {self.features!r}")

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

    def scores(self, view: View, labels: torch.Tensor) -> torch.Tensor:
        """[B, S] (float64, quantised): higher wins its stratum."""
        if self.within == "jitter":
            generator = torch.Generator().manual_seed(self.seed)
            draw = torch.rand(int(view.patches.max()) + 1, generator=generator, dtype=torch.float64)
            return draw.to(view.patches.device)[view.patches.clamp(min=0)]
        unit = F.normalize(_features(view, self.features), dim=-1)
        mask = view.candidates[..., None].to(unit.dtype)
        mean = F.normalize((unit * mask).sum(1) / mask.sum(1).clamp(min=1), dim=-1)  # [B, d]
        return quantised(1.0 - (unit @ mean[:, :, None])[..., 0])

    def select(self, view: View) -> torch.Tensor:
        labels = self.labels(view)
        if self.within == "diverse":
            return self.diverse(view, labels)
        return best_per_stratum(self.scores(view, labels), labels)

    def diverse(self, view: View, labels: torch.Tensor) -> torch.Tensor:
        """Strata in order; each keeps its token farthest (cosine) from those chosen so far (the first: the most
        salient)."""
        unit = F.normalize(_features(view, self.features), dim=-1)
        closest = self.scores(view, labels)  # the first stratum keeps its most salient token
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


def grid_layout(grids: list | None, count: int, keep: int) -> tuple[list[int], list[tuple[float, float]], list[int]]:
    """Of a sample's `count` candidates (prompt order): each one's group (one per image or video frame) and its
    (row, col) divided by its grid's diagonal (so distances across a grid are at most 1); and each group's
    share of `keep` (`frame_budgets`, as `strata` shares it).

    Without grids (or once earlier layers dropped tokens, so they no longer tile) the candidates are one group
    along prompt order, at positions i / count.
    """
    if not tiles(grids, count):
        return [0] * count, [(0.0, i / max(count, 1)) for i in range(count)], [keep]
    groups: list[int] = []
    coords: list[tuple[float, float]] = []
    for index, grid in enumerate(frames(grids)):
        diagonal = math.hypot(grid.rows, grid.cols)
        groups += [index] * (grid.rows * grid.cols)
        coords += [(y / diagonal, x / diagonal) for y in range(grid.rows) for x in range(grid.cols)]
    return groups, coords, frame_budgets(grids, keep)


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

    name: ClassVar[str] = "spread"
    spatial: float = 2.0
    """Weight of the grid distance (a share of the diagonal) against the cosine distance; 0 is DivPrune's rule
    within each image (up to the rounding of near-ties). Chosen on validation (docs/methods.md): 1 to 4 alike."""
    features: str = "hidden"
    """'hidden' (before the decoder: the visual embeddings; at a decoder layer its input) or 'keys'."""

    def validate(self) -> None:
        check(0 <= self.spatial <= 1e6, "spatial", f"must be in [0, 1e6] (a lattice long before), got {self.spatial}")
        check(self.features in ("hidden", "keys"), "features", f"must be 'hidden' or 'keys', got {self.features!r}")

    def layout(self, view: View) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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

    def select(self, view: View) -> torch.Tensor:
        candidates, keep = view.candidates, view.keep
        groups, coords, budgets = self.layout(view)
        unit = F.normalize(_features(view, self.features), dim=-1)
        cosine = (unit @ unit.transpose(1, 2)).double()  # float32 products: the rounding below is far coarser
        distance = quantised(1.0 - cosine + self.spatial * torch.cdist(coords, coords))
        same = (groups[:, :, None] == groups[:, None, :]) & (groups[:, :, None] >= 0)
        eye = torch.eye(distance.shape[-1], dtype=torch.bool, device=distance.device)
        inf = torch.tensor(float("inf"), dtype=distance.dtype, device=distance.device)
        nearest = torch.where(same & ~eye, distance, inf).amin(-1)
        nearest = torch.where(torch.isinf(nearest), torch.zeros_like(nearest), nearest)
        # Until a group has a pick, its tokens rank by uniqueness above any distance (at most 2 + spatial).
        closest = nearest + quantised(torch.tensor(2.0 + self.spatial)).item() + 1
        chosen = torch.zeros_like(candidates)
        taken = torch.zeros_like(budgets)
        rows = torch.arange(candidates.shape[0], device=candidates.device)
        group = groups.clamp(min=0)
        for step in range(int(keep.max()) if keep.numel() else 0):
            room = budgets.gather(-1, group) > taken.gather(-1, group)
            score = closest.masked_fill(~candidates | chosen | ~room, float("-inf"))
            pick = score.argmax(-1)  # first position among equal (quantised) scores
            active = (keep > step) & torch.isfinite(score.amax(-1))
            chosen[rows[active], pick[active]] = True
            taken[rows[active], group[rows, pick][active]] += 1
            closest = torch.minimum(closest, torch.where(same[rows, pick], distance[rows, pick], inf))
        return chosen & candidates


@dataclass(kw_only=True)
class DART(Selector):
    """DART (Wen et al., EMNLP 2025, arXiv 2502.11494): keep the tokens least duplicated by a few pivots.

    Rule, per sample: the `pivots` visual tokens with the largest key norm at the layer (L2 over the kv heads'
    keys) are kept; every other token is scored by its largest cosine similarity (hidden states entering the
    layer) to any pivot, and the least similar fill the rest of the budget. No attention map is needed.
    (The paper splits the budget evenly among pivots; the max-similarity score here is its union form.)
    """

    name: ClassVar[str] = "dart"
    pivots: int = 8
    """Pivot tokens per sample (paper default 8); never more than the budget."""

    def validate(self) -> None:
        check(self.pivots >= 1, "pivots", f"must be >= 1, got {self.pivots}")

    def select(self, view: View) -> torch.Tensor:
        candidates, keep = view.candidates, view.keep
        norms = view.keys().float().norm(dim=-1).pow(2).sum(1).sqrt()  # [B, S]
        # Relative norms, rounded: models with a norm on the keys (Qwen3's k_norm) give every token nearly the
        # same key norm, and ~1e-7 noise would pick the pivots; rounded, equal norms go to the first positions.
        top = norms.masked_fill(~candidates, 0.0).amax(-1, keepdim=True).clamp(min=1e-12)
        pivots = top_k_mask(quantised(norms / top), candidates, keep.clamp(max=self.pivots))
        unit = F.normalize(_features(view, "hidden"), dim=-1)
        similarity = unit @ unit.transpose(1, 2)  # [B, S, S]
        duplication = similarity.masked_fill(~pivots[:, None, :], float("-inf")).amax(-1)
        rest = top_k_mask(-quantised(duplication), candidates & ~pivots, keep - pivots.sum(-1))
        return pivots | rest


@dataclass(kw_only=True)
class CDPruner(Selector):
    """CDPruner (Zhang et al., arXiv 2506.10967): a conditional DPP over visual tokens, relevance-weighted.

    Rule, per sample: similarity S = cosine of the visual features (embeddings before the decoder); relevance
    r = mean cosine of each visual token to the instruction's token embeddings, min-max normalised over the
    sample's own visual tokens (the official code normalises over the batch: a sample's choice then depends
    on its batch-mates; here it does not); kernel L = diag(q) S diag(q) with q = exp(theta r / (2 (1 - theta)));
    the kept set is the greedy MAP of the DPP (incremental Cholesky). theta = 0: diversity alone.
    Without an instruction after the image, r = 1.
    """

    name: ClassVar[str] = "cdpruner"
    theta: float = 0.5
    """Relevance vs diversity (paper default 0.5); in [0, 1)."""

    def validate(self) -> None:
        check(0.0 <= self.theta < 1.0, "theta", f"must be in [0, 1), got {self.theta}")

    def relevance(self, view: View, unit: torch.Tensor) -> torch.Tensor:
        text = view.text()
        hidden = view.hidden()
        if text is None or hidden is None or not bool(text.any()):
            return torch.ones(unit.shape[:2], device=unit.device)
        words = F.normalize(hidden.float(), dim=-1)
        cos = (unit @ words.transpose(1, 2)).masked_fill(~text[:, None, :], 0.0)
        r = cos.sum(-1) / text.sum(-1, keepdim=True).clamp(min=1)
        low = r.masked_fill(~view.candidates, float("inf")).amin(-1, keepdim=True)
        high = r.masked_fill(~view.candidates, float("-inf")).amax(-1, keepdim=True)
        r = (r - low) / (high - low).clamp(min=1e-6)
        return torch.where(text.any(-1, keepdim=True), r, torch.ones_like(r))

    def select(self, view: View) -> torch.Tensor:
        candidates, keep = view.candidates, view.keep
        unit = F.normalize(_features(view, "hidden"), dim=-1)
        alpha = self.theta / (2.0 * (1.0 - self.theta))
        quality = torch.exp(alpha * self.relevance(view, unit))
        kernel = quality[:, :, None] * (unit @ unit.transpose(1, 2)) * quality[:, None, :]
        return dpp_greedy(kernel.double(), candidates, keep)


def dpp_greedy(kernel: torch.Tensor, candidates: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Greedy MAP of a DPP per sample (Chen et al., 2018): add the item with the largest marginal gain.

    kernel: [B, S, S] positive semi-definite. Gains are the residual diagonal after projecting out the items
    chosen so far (kept as incremental Cholesky rows). Once a sample's kernel rank is spent (budgets above the
    feature width), every residual is ~0: the rest of its budget goes by the kernel's diagonal (quality).
    """
    batch, slots, _ = kernel.shape
    diagonal = torch.diagonal(kernel, dim1=1, dim2=2).clone()
    gains = diagonal.clone()
    rows: list[torch.Tensor] = []
    chosen = torch.zeros_like(candidates)
    index = torch.arange(batch, device=kernel.device)
    for step in range(int(keep.max()) if keep.numel() else 0):
        active = keep > step
        score = (gains.clamp(min=0) + 1e-9 * diagonal).masked_fill(~candidates | chosen, float("-inf"))
        pick = score.argmax(-1)
        chosen[index[active], pick[active]] = True
        picked_gain = gains[index, pick]
        spent = picked_gain <= 1e-9 * diagonal[index, pick]  # nothing left to project out
        row = kernel[index, pick]  # [B, S]
        for previous in rows:
            row = row - previous[index, pick][:, None] * previous
        row = row / picked_gain.clamp(min=1e-30).sqrt()[:, None]
        row = torch.where((active & ~spent)[:, None], row, torch.zeros_like(row))
        rows.append(row)
        gains = gains - row.pow(2)
    return chosen & candidates


# --------------------------------------------------------------------------------- decode: VTA
EVICTION = ("current", "accumulated", "protected", "coverage", "diverse")
CURVES = ("linear", "cosine", "exponential")


def anneal(curve: str, final: float, steps: int, t: int) -> float:
    """a(t): 1 at t = 0, `final` from t = steps on, non-increasing in between."""
    x = min(t / steps, 1.0)
    if curve == "linear":
        return 1.0 - (1.0 - final) * x
    if curve == "cosine":
        return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * x))
    return final**x  # exponential: a constant factor per step


@dataclass(kw_only=True)
class VTA:
    """Visual token annealing (ST3's decode schedule), applicable to any prefill schedule.

    Layer l's budget for decode forward t is max(min_keep, round(n_l * a(t - delay))) (a = 1 before `delay`),
    n_l its visual tokens after prefill; every `every` steps a layer above budget evicts by `evict`:
    'current' (the paper): least attended by the current token; 'accumulated': least attention summed over
    every decode step so far; 'protected': the `protect` share of the budget goes to the tokens with the most
    accumulated attention, the rest to those the current token attends to most; 'coverage': the `protect`
    share to the tokens the current token attends to most, the rest to those with the *least* accumulated
    attention (not read yet: a caption's cells still to describe); 'diverse': the max-min diverse subset of
    the cached keys (no attention).
    """

    curve: str = "cosine"
    final: float = 0.3
    steps: int = 32
    every: int = 4
    min_keep: int = 4
    evict: str = "current"
    protect: float = 0.5
    """'protected': share of each budget kept by accumulated attention; 'coverage': by the current token's."""
    delay: int = 0
    """Decode steps before annealing starts (an answer's first words are written with every token)."""

    def __post_init__(self) -> None:
        check_types(self)
        self.validate()

    def validate(self) -> None:
        check(self.curve in CURVES, "curve", f"must be one of {CURVES}, got {self.curve!r}")
        check(0.0 < self.final <= 1.0, "final", f"must be in (0, 1], got {self.final}")
        check(self.steps >= 1, "steps", f"must be >= 1, got {self.steps}")
        check(self.every >= 1, "every", f"must be >= 1, got {self.every}")
        check(self.min_keep >= 0, "min_keep", f"must be >= 0, got {self.min_keep}")
        check(self.evict in EVICTION, "evict", f"must be one of {EVICTION}, got {self.evict!r}")
        check(0.0 <= self.protect <= 1.0, "protect", f"must be in [0, 1], got {self.protect}")
        check(self.delay >= 0, "delay", f"must be >= 0, got {self.delay}")

    @property
    def accumulates(self) -> bool:
        """Whether the engine must sum each decode step's attention into the cache."""
        return self.final < 1.0 and self.evict in ("accumulated", "protected", "coverage")

    def budget(self, step: int, visual_after_prefill: torch.Tensor) -> torch.Tensor | None:
        if self.final == 1.0 or step % self.every or step <= self.delay:
            return None
        a = anneal(self.curve, self.final, self.steps, step - self.delay)
        budget = torch.round(visual_after_prefill.double() * a).long().clamp(min=self.min_keep)
        return torch.minimum(budget, visual_after_prefill)

    def select(self, view: View) -> torch.Tensor:
        if self.evict == "current":
            return top_k_mask(view.attention("current"), view.candidates, view.keep)
        if self.evict == "accumulated":
            return top_k_mask(view.received, view.candidates, view.keep)
        if self.evict == "diverse":
            return max_min_diverse(_features(view, "keys"), view.candidates, view.keep)
        share = torch.floor(view.keep * self.protect).long()
        if self.evict == "coverage":
            attended = top_k_mask(view.attention("current"), view.candidates, share)
            unread = top_k_mask(-view.received, view.candidates & ~attended, view.keep - attended.sum(-1))
            return attended | unread
        protected = top_k_mask(view.received, view.candidates, share)
        rest = top_k_mask(view.attention("current"), view.candidates & ~protected, view.keep - protected.sum(-1))
        return protected | rest


SELECTORS: dict[str, type[Selector]] = {
    cls.name: cls for cls in (Attention, RandomPick, UniformPick, Stratified, Spread, DivPrune, DART, CDPruner)
}


def selector(spec: Selector | str | None) -> Selector | None:
    """A selector from an instance or a name (for specs such as `st3:selector=divprune`)."""
    if spec is None or isinstance(spec, Selector):
        return spec
    try:
        return SELECTORS[str(spec).lower()]()
    except KeyError:
        raise ValueError(f"selector: unknown {spec!r}; available: {', '.join(sorted(SELECTORS))}") from None
