"""VisionZip (Yang et al., CVPR 2025, arXiv 2412.04467): "Longer is better but not necessary".

Rule, per image, before the language model: keep the `dominant` patches that the vision tower's [CLS]
token attends to most at the feature layer (heads averaged); of the other patches, take `contextual`
targets evenly spaced in raster order, assign every remaining patch to the target whose key (at the
same layer, heads averaged) is most cosine-similar, and replace each target by the mean of its group's
features (before the projector). The decoder then sees dominant + contextual tokens per image at every
layer. Unlike the official code, which shortens the sequence and renumbers positions, each kept token
keeps its patch's original position and a contextual token sits at its target's position. The official
code adds the target to the mean of its assigned patches; st3 averages the whole group, which keeps the
feature scale the projector was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from st3.methods.base import Method, check, register


@register("visionzip")
@dataclass(kw_only=True)
class VisionZip(Method):
    """Dominant patches by [CLS] attention + a few contextual tokens merged by key similarity."""

    compresses_vision: ClassVar[bool] = True
    selectable: ClassVar[bool] = False
    budget_knob: ClassVar[str] = "dominant"

    dominant: int = 54
    """Patches kept by [CLS] attention, per image (paper: 54 for a 64-token budget)."""
    contextual: int = 10
    """Tokens merged from the rest, per image (paper: 10 for a 64-token budget)."""

    def validate(self) -> None:
        check(self.dominant >= 0, "dominant", f"must be >= 0, got {self.dominant}")
        check(self.contextual >= 0, "contextual", f"must be >= 0, got {self.contextual}")
        check(self.dominant + self.contextual > 0, "dominant", "dominant + contextual must keep at least one token")

    def tokens_before_decoder(self, visual: int) -> int:
        return min(visual, self.dominant + self.contextual)

    def compress(
        self, saliency: torch.Tensor, keys: torch.Tensor, features: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per image: (kept patches [N, P], rewritten patches [N, P], features [N, P, d_v] after merging)."""
        images, patches = saliency.shape
        keep = torch.zeros(images, patches, dtype=torch.bool, device=saliency.device)
        replaced = torch.zeros_like(keep)
        merged = features.clone()
        dominant = min(self.dominant, patches)
        keep.scatter_(1, saliency.topk(dominant, dim=-1).indices, True)
        for image in range(images):
            rest = (~keep[image]).nonzero().squeeze(-1)
            count = min(self.contextual, len(rest))
            if count == 0:
                continue
            targets = rest[:: max(1, len(rest) // count)][:count]
            others = rest[~torch.isin(rest, targets)]
            unit = F.normalize(keys[image].float(), dim=-1)
            group = (unit[others] @ unit[targets].T).argmax(-1)  # each other patch joins its most similar target
            for slot, target in enumerate(targets):
                members = torch.cat([target[None], others[group == slot]])
                merged[image, target] = features[image, members].mean(0)
            keep[image, targets] = True
            replaced[image, targets] = True
        return keep, replaced, merged
