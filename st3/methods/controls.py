"""Controls: keep visual tokens by a rule that ignores attention, on FastV's schedule.

If attention-based scoring earns its keep, FastV/ST3 must beat these at the same keep count. Both pick
patches by their index in the image (raster order), so every sample of a batch keeps the same patches
whatever its padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from st3.methods.base import Method, check, register


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
    """Keep `keep` visual tokens evenly spaced over the image in raster order (every n-th patch)."""

    def select(self, scores, candidates: torch.Tensor, keep: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        n = candidates.sum(-1, keepdim=True).double()
        slots = torch.arange(int(keep.max()), device=keep.device).double()
        centres = torch.floor((slots + 0.5) * n / keep.clamp(min=1)[:, None])  # [B, keep]: evenly spaced patches
        centres = centres.masked_fill(slots >= keep[:, None], -1)
        return candidates & (patches[..., None] == centres[:, None, :]).any(-1)
