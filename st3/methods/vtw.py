"""VTW, visual tokens withdrawal (Lin et al., AAAI 2025, arXiv 2405.05803).

Rule: after layer K - 1 every visual token leaves: from layer K on, the hidden states and KV caches hold
no visual token at all, during prefill and decoding. The paper observes that in deep layers the model
has already moved the visual information into the text tokens (and picks K per model with a KL
criterion); the default here is half the depth.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from st3.methods.base import Method, check, register


@register("vtw")
@dataclass(kw_only=True)
class VTW(Method):
    """Withdraw all visual tokens from layer K on."""

    selectable: ClassVar[bool] = False
    budget_knob: ClassVar[str] = "layer"

    layer: int | None = None
    """K: the first layer without visual tokens; None: half the model's depth."""

    def validate(self) -> None:
        if self.layer is not None:
            check(self.layer >= 0, "layer", f"must be >= 0, got {self.layer}")

    def validate_for(self, num_layers: int) -> None:
        if self.layer is not None:
            check(self.layer <= num_layers, "layer", f"{self.layer} is beyond the model's depth ({num_layers})")

    def withdrawal_layer(self, num_layers: int) -> int:
        return num_layers // 2 if self.layer is None else self.layer

    def prefill_keep(self, layer: int, num_layers: int, visual: torch.Tensor) -> torch.Tensor | None:
        return torch.zeros_like(visual) if layer == self.withdrawal_layer(num_layers) else None
