"""PyramidDrop (Xing et al., CVPR 2025, arXiv 2410.17247): visual redundancy reduction in stages.

Rule: the decoder is split into stages that end at fixed layers (default 8, 16 and 24 of 32, scaled to
the model's depth). Entering each stage boundary layer, a sample keeps ceil(lambda * n) of the n visual
tokens it still holds, those that the last instruction token (the last prompt token) attended to most at
the layer before, averaged over heads. The dropped tokens leave the hidden states and KV cache of that
layer and all later ones; nothing changes during decoding.

Difference from the official code: the official implementation renumbers positions after each drop
(survivors get consecutive positions, changing the rotary geometry the model was trained with); here,
as for every method in this engine, survivors keep their original positions. Its scoring re-projects
the last instruction token's query, as this engine does for all methods.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from st3.methods.base import Method, check, register, share


@register("pyramiddrop")
@dataclass(kw_only=True)
class PyramidDrop(Method):
    """Keep a fixed share of the remaining visual tokens at each stage boundary."""

    budget_knob: ClassVar[str] = "keep"

    keep: float = 0.5
    """lambda: share of the remaining visual tokens kept at each boundary (paper default 0.5)."""
    stages: tuple[int, ...] | None = None
    """Boundary layers; None: 8, 16 and 24 of 32 scaled to the model's depth (paper default)."""

    def validate(self) -> None:
        check(0.0 <= self.keep <= 1.0, "keep", f"must be in [0, 1], got {self.keep}")
        if self.stages is not None:
            self.stages = tuple(self.stages)
            check(len(self.stages) > 0, "stages", "must name at least one layer")
            check(all(s >= 1 for s in self.stages), "stages", f"layers must be >= 1, got {self.stages}")

    def validate_for(self, num_layers: int) -> None:
        bad = [s for s in self.boundaries(num_layers) if s >= num_layers]
        check(not bad, "stages", f"{bad} beyond the model's last layer ({num_layers - 1})")

    def boundaries(self, num_layers: int) -> tuple[int, ...]:
        if self.stages is not None:
            return self.stages
        return tuple(sorted({max(1, round(num_layers * s / 32)) for s in (8, 16, 24)}))

    def prefill_keep(self, layer: int, num_layers: int, visual: torch.Tensor) -> torch.Tensor | None:
        if layer not in self.boundaries(num_layers):
            return None
        return share(visual, self.keep, 0)
