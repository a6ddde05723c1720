"""Ranking patches by the vision tower's [CLS] attention, before the projector: FasterVLM and VTC-CLS.

Both keep, per image, the `keep` patches the [CLS] query attends to most (heads averaged) and drop the rest
before the decoder; they differ in which tower layers vote. The saliency is the adapter's
(`vision_saliency`, the seam VisionZip uses), so they run where a tower has a [CLS] token (LLaVA) and are
refused, with the alternatives named, where it has none (Qwen-VL: `Adapter.check_method`).

Where st3 differs from the official code (facts in tests/fixtures/systems/README.md): the kept tokens keep
their original positions (the official code renumbers them contiguously; st3 never shifts a position, so
every run equals a masked reference of the unpruned model), and several images per prompt are ranked each
on its own (VTC-CLS's code assumes one image).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from st3.methods.base import Method, check, register


@register("fastervlm")
@dataclass(kw_only=True)
class FasterVLM(Method):
    """FasterVLM (arXiv 2412.01818): per image, the `keep` patches of highest [CLS] attention at the feature layer."""

    compresses_vision: ClassVar[bool] = True
    selectable: ClassVar[bool] = False
    budget_knob: ClassVar[str] = "keep"

    keep: int = 144
    """Patches kept per image (the official has no default; its README's 75 % reduction of 576 is 144)."""

    def validate(self) -> None:
        check(self.keep >= 0, "keep", f"must be >= 0 (0 drops every patch), got {self.keep}")

    def tokens_before_decoder(self, visual: int) -> int:
        return min(visual, self.keep)

    def compress(
        self, saliency: torch.Tensor, keys: torch.Tensor, features: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per image: (the top `keep` patches by saliency [N, P], none rewritten, the features unchanged)."""
        return cls_top(saliency, self.keep), torch.zeros_like(saliency, dtype=torch.bool), features


@register("vtccls")
@dataclass(kw_only=True)
class VTCCLS(FasterVLM):
    """VTC-CLS (arXiv 2412.05819): per image, the `keep` patches of highest [CLS] attention summed over the tower
    layers from `start` through the feature layer."""

    keep: int = 36
    """Patches kept per image (the official `--token_num` default)."""
    start: int = -8
    """First tower layer summed, a slice start (negative: from the end): -8 is the official `--layer 16` on
    CLIP-L's 24 layers, so layers 16..22 vote; on a shallower tower the sum starts at its first layer."""

    @property
    def saliency_start(self) -> int:  # type: ignore[override]
        return self.start


def cls_top(saliency: torch.Tensor, keep: int) -> torch.Tensor:
    """BoolTensor [N, P]: each image's `keep` patches of highest saliency (ties: the lower index, as a stable
    sort), as a mask so the kept patches stay in raster order."""
    order = torch.sort(saliency, dim=-1, descending=True, stable=True).indices[:, : min(keep, saliency.shape[-1])]
    return torch.zeros_like(saliency, dtype=torch.bool).scatter_(1, order, True)
