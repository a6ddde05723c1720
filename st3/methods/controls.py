"""Controls: keep visual tokens by a rule that ignores attention, on FastV's schedule.

If attention-based scoring earns its keep, FastV/ST3 must beat these at the same keep count. Both pick
patches by their place in the image (Random by raster index, Uniform on the image's patch grid), so every
sample of a batch keeps the same patches whatever its padding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from st3.methods.base import Method, check, register
from st3.methods.selectors import evenly_spaced, frame_budgets, frames, tiles


@dataclass(kw_only=True)
class _KeepCount(Method):
    """Keep `keep` visual tokens when entering `layer`."""

    needs_scores: ClassVar[bool] = False
    budget_knob: ClassVar[str] = "keep"

    keep: int = 192
    """Visual tokens kept (192 of 576: the first budget of the VisionZip/VScan comparison tables)."""
    layer: int = 2
    """The layer from which on only the kept tokens remain (FastV's default; 0: before the decoder)."""

    def validate(self) -> None:
        check(self.keep >= 0, "keep", f"must be >= 0, got {self.keep}")
        check(self.layer >= 0, "layer", f"must be >= 0, got {self.layer}")

    def validate_for(self, num_layers: int) -> None:
        check(self.layer < num_layers, "layer", f"{self.layer} is beyond the model's last layer ({num_layers - 1})")

    def prefill_keep(self, layer: int, num_layers: int, visual: torch.Tensor) -> torch.Tensor | None:
        return visual.clamp(max=self.keep) if layer == self.layer else None


@register("random")
@dataclass(kw_only=True)
class Random(_KeepCount):
    """Keep `keep` visual tokens drawn at random (seeded: the same patches for every sample)."""

    seed: int = 0
    """Seed of the draw."""

    def select(self, scores, candidates: torch.Tensor, keep: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed)
        draw = torch.rand(int(patches.max()) + 1, generator=generator).to(patches.device)
        return super().select(draw[patches.clamp(min=0)], candidates, keep, patches)


@register("uniform")
@dataclass(kw_only=True)
class Uniform(_KeepCount):
    """Keep `keep` visual tokens spread evenly over each image's patch grid (a lattice per image / frame).

    The budget is shared among a sample's images (and a video's frames) by their token counts; inside a
    grid of rows x cols the kept cells form a lattice of about sqrt(keep * rows / cols) rows. Where the
    model's adapter gives no grid layout, every n-th visual token in prompt order is kept instead.
    """

    def select(self, scores, candidates: torch.Tensor, keep: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        layout = self.trace.image_grids
        counts = candidates.sum(-1).tolist()
        if layout is not None and all(tiles(grids, n) for grids, n in zip(layout, counts)):
            chosen = torch.zeros_like(candidates)
            for b, grids in enumerate(layout):
                cells = torch.tensor(uniform_cells(grids, int(keep[b])), dtype=patches.dtype, device=patches.device)
                chosen[b] = candidates[b] & torch.isin(patches[b], cells)
            return chosen
        return evenly_spaced(candidates, keep, patches)


def lattice(rows: int, cols: int, keep: int) -> list[int]:
    """`keep` raster indices of a rows x cols grid, spread as a lattice over both axes."""
    if keep >= rows * cols:
        return list(range(rows * cols))
    if keep == 0:
        return []
    r = min(rows, max(1, round(math.sqrt(keep * rows / cols))))
    c = min(cols, math.ceil(keep / r))
    r = min(rows, math.ceil(keep / c))
    points = [math.floor((i + 0.5) * rows / r) * cols + math.floor((j + 0.5) * cols / c)
              for i in range(r) for j in range(c)]  # fmt: skip
    return sorted(points[math.floor((s + 0.5) * len(points) / keep)] for s in range(keep))


def uniform_cells(grids: list, keep: int) -> list[int]:
    """Indices (over the sample's visual tokens, in prompt order) of `keep` cells spread over its grids."""
    cells, offset = [], 0
    for grid, part in zip(frames(grids), frame_budgets(grids, keep)):
        cells += [offset + i for i in lattice(grid.rows, grid.cols, part)]
        offset += grid.rows * grid.cols
    return cells
