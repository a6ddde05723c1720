"""FastV (Chen et al., ECCV 2024, arXiv 2403.06764): "An image is worth 1/2 tokens after layer 2".

Rule: when entering layer K, each sample keeps round((1 - R) * n) of its n visual tokens, those that
received the most attention at layer K - 1, averaged over heads; the others leave the hidden states and
the KV cache of layer K and every later layer. Nothing changes during decoding (the cache of layers >= K
simply never had the dropped tokens). The official code scores from the last token's attention row;
the paper's text averages over all query rows: both are selectable. The count is the official code's
`round(576 * (1 - R))` (pkunlp-icler/FastV @ d165972, llava-hf `modeling_llama.py:1082`; Python's round, half
to even); `variant="paper"` keeps ceil((1 - R) * n), st3's count before 0.2 (the paper states no rounding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from st3.methods.base import VARIANTS, Method, check, register, share
from st3.selectors import Attention, Selector


@register("fastv")
@dataclass(kw_only=True)
class FastV(Method):
    """Prune once, at layer K, by the attention the visual tokens received at layer K - 1."""

    budget_knob: ClassVar[str] = "ratio"

    layer: int = 2
    """K: the layer from which on the dropped tokens are gone (paper default 2)."""
    ratio: float = 0.5
    """R: share of the visual tokens dropped (paper default 50%)."""
    query: str = "last"
    """'last': the last token's attention (official code); 'all': mean over all query rows (paper text)."""
    variant: str = "official"
    """Keep count: 'official' round((1 - R) n), half to even (the released code); 'paper' ceil((1 - R) n)."""

    def validate(self) -> None:
        check(self.layer >= 0, "layer", f"must be >= 0, got {self.layer}")
        check(0.0 <= self.ratio <= 1.0, "ratio", f"must be in [0, 1], got {self.ratio}")
        check(self.query in ("last", "all"), "query", f"must be 'last' or 'all', got {self.query!r}")
        check(self.variant in VARIANTS, "variant", f"must be one of {VARIANTS}, got {self.variant!r}")

    def validate_for(self, num_layers: int) -> None:
        check(self.layer < num_layers, "layer", f"{self.layer} is beyond the model's last layer ({num_layers - 1})")

    def default_selector(self) -> Selector:
        return Attention(query=self.query)

    def depth_knobs(self) -> dict[str, int]:
        return {"layer": self.layer}

    def prefill_keep(self, layer: int, num_layers: int, visual: torch.Tensor) -> torch.Tensor | None:
        if layer != self.layer:
            return None
        if self.variant == "paper":
            return share(visual, 1.0 - self.ratio, 0)
        return torch.minimum(torch.round(visual.double() * (1.0 - self.ratio)).long(), visual)
