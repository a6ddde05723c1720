"""VisionZip (Yang et al., CVPR 2025, arXiv 2412.04467): "Longer is better but not necessary".

Rule, per image, before the language model: keep the dominant patches that the vision tower's [CLS]
token attends to most at the feature layer (heads averaged); of the other patches, take `contextual`
targets evenly spaced in raster order, assign every remaining patch to the target whose key (at the
same layer, heads averaged) is most cosine-similar, and replace each target by a merge of its group's
features (before the projector). Each kept token keeps its patch's original position and a contextual
token sits at its target's position (the official code shortens the sequence and renumbers positions).

variant 'official' (the released code, dvlab-research/VisionZip @ 3151f6d): `dominant` counts the [CLS]
token, as `visionzip(model, dominant, contextual)` passes `dominant - 1` to the tower (`visionzip/main.py:5-7`):
dominant - 1 patches are kept by attention (`clip_encoder.py:50-57`), and a contextual token is its target plus
the mean of the other patches of its group (`clip_encoder.py:73-80`). The one difference left: the official
code also feeds [CLS]'s feature through the projector to the decoder (`all_indices` starts with 0); LLaVA-1.5's
feature selection drops [CLS] before the projector, and st3 keeps its prompt's image slots, so the decoder sees
dominant - 1 + contextual tokens per image, one fewer than the official code.
variant 'paper' (st3's form before 0.2): `dominant` patches, a contextual token the mean of its whole group
(target included: the feature scale the projector was trained on).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from st3.methods.base import VARIANTS, Method, check, register


@register("visionzip")
@dataclass(kw_only=True)
class VisionZip(Method):
    """Dominant patches by [CLS] attention + a few contextual tokens merged by key similarity."""

    compresses_vision: ClassVar[bool] = True
    selectable: ClassVar[bool] = False
    budget_knob: ClassVar[str] = "dominant"

    dominant: int = 54
    """Dominant tokens per image, [CLS] included for 'official' (54 + 10 contextual: the paper's 64 tokens)."""
    contextual: int = 10
    """Tokens merged from the rest, per image (paper: 10 for a 64-token budget)."""
    variant: str = "official"
    """'official': `dominant` counts [CLS], contextual = target + mean of the others; 'paper': see the module."""

    def validate(self) -> None:
        check(self.variant in VARIANTS, "variant", f"must be one of {VARIANTS}, got {self.variant!r}")
        least = 1 if self.variant == "official" else 0
        check(self.dominant >= least, "dominant", f"must be >= {least} (variant {self.variant!r}), got {self.dominant}")
        check(self.contextual >= 0, "contextual", f"must be >= 0, got {self.contextual}")
        check(self.patches() + self.contextual > 0, "dominant", "dominant + contextual must keep at least one token")

    def patches(self) -> int:
        """Patches kept by [CLS] attention: `dominant` less the [CLS] token it counts ('official')."""
        return self.dominant - 1 if self.variant == "official" else self.dominant

    def tokens_before_decoder(self, visual: int) -> int:
        return min(visual, self.patches() + self.contextual)

    def compress(
        self, saliency: torch.Tensor, keys: torch.Tensor, features: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per image: (kept patches [N, P], rewritten patches [N, P], features [N, P, d_v] after merging)."""
        images, patches = saliency.shape
        keep = torch.zeros(images, patches, dtype=torch.bool, device=saliency.device)
        replaced = torch.zeros_like(keep)
        merged = features.clone()
        dominant = min(self.patches(), patches)
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
                members = others[group == slot]
                if self.variant == "paper":
                    merged[image, target] = features[image, torch.cat([target[None], members])].mean(0)
                elif len(members):  # the released code: the target plus the mean of the others (none: itself)
                    merged[image, target] = features[image, target] + features[image, members].mean(0)
            keep[image, targets] = True
            replaced[image, targets] = True
        return keep, replaced, merged
