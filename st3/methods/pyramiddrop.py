"""PyramidDrop (Xing et al., CVPR 2025, arXiv 2410.17247): visual redundancy reduction in stages.

Rule: the decoder is split into stages that end at fixed layers (default 8, 16 and 24 of 32, scaled to
the model's depth). Entering the s-th stage boundary layer, a sample keeps int(lambda^s * n0) of its n0
original visual tokens (the released code's count, Cooperx521/PyramidDrop @ 6444f30,
`llava/model/modeling_llama_pdrop.py:1306-1307`, with the scripts' ratio list [lambda, lambda^2, lambda^3]),
those that the last instruction token (the last prompt token) attends to most, heads averaged, in the boundary
layer's own attention: its input norm and q/k projections applied to its input rows (1321-1340).
`variant="paper"` is st3's form before 0.2: ceil(lambda * n) of the n tokens still held, ranked by the
attention the layer before computed (as FastV).
The dropped tokens leave the hidden states and KV cache of that layer and all later ones; nothing changes
during decoding.

Difference from the official code: the official implementation renumbers positions after each drop
(survivors get consecutive positions, changing the rotary geometry the model was trained with); here,
as for every method in this engine, survivors keep their original positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from st3.methods.base import VARIANTS, Method, check, register, share
from st3.selectors import Attention, Selector


@register("pyramiddrop")
@dataclass(kw_only=True)
class PyramidDrop(Method):
    """Keep a fixed share of the remaining visual tokens at each stage boundary."""

    budget_knob: ClassVar[str] = "keep"

    keep: float = 0.5
    """lambda: share of the remaining visual tokens kept at each boundary (paper default 0.5)."""
    stages: tuple[int, ...] | None = None
    """Boundary layers; None: 8, 16 and 24 of 32 scaled to the model's depth (paper default)."""
    variant: str = "official"
    """Counts: 'official' int(lambda^s n0) of the original n0 (released code); 'paper' ceil(lambda n) of those held."""

    _original: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)

    def validate(self) -> None:
        check(0.0 <= self.keep <= 1.0, "keep", f"must be in [0, 1], got {self.keep}")
        if self.stages is not None:
            self.stages = tuple(self.stages)
            check(len(self.stages) > 0, "stages", "must name at least one layer")
            check(all(s >= 1 for s in self.stages), "stages", f"layers must be >= 1, got {self.stages}")
        check(self.variant in VARIANTS, "variant", f"must be one of {VARIANTS}, got {self.variant!r}")

    def default_selector(self) -> Selector:
        return Attention(scored_at="before" if self.variant == "paper" else "own")

    def validate_for(self, num_layers: int) -> None:
        bad = [s for s in self.boundaries(num_layers) if s >= num_layers]
        check(not bad, "stages", f"{bad} beyond the model's last layer ({num_layers - 1})")

    def boundaries(self, num_layers: int) -> tuple[int, ...]:
        if self.stages is not None:
            return self.stages
        return tuple(sorted({max(1, round(num_layers * s / 32)) for s in (8, 16, 24)}))

    def prefill_keep(self, layer: int, num_layers: int, visual: torch.Tensor) -> torch.Tensor | None:
        boundaries = sorted(self.boundaries(num_layers))
        if layer not in boundaries:
            return None
        if self.variant == "paper":
            return share(visual, self.keep, 0)
        stage = boundaries.index(layer) + 1
        if stage == 1:
            self._original = visual.clone()  # the first boundary sees every visual token: the counts' base
        elif self._original is None or self._original.shape != visual.shape:
            raise RuntimeError("PyramidDrop: a later stage was asked its count before the first boundary's")
        count = torch.floor(self._original.double() * self.keep**stage).long()
        return torch.minimum(count.to(visual.device), visual)
