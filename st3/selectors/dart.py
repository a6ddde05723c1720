"""DART (Wen et al., EMNLP 2025, arXiv 2502.11494): keep the tokens least duplicated by a few pivot tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from st3.selectors.base import Selector, View, check, features, quantised, register, top_k_mask


@register("dart")
@dataclass(kw_only=True)
class DART(Selector):
    """Duplication-aware: pivots by key norm, then the tokens least similar to any pivot.

    Rule, per sample: the `pivots` visual tokens with the largest key norm at the layer (L2 over the kv heads'
    keys) are kept; every other token is scored by its largest cosine similarity (hidden states entering the
    layer) to any pivot, and the least similar fill the rest of the budget. No attention map is needed.
    (The paper splits the budget evenly among pivots; the max-similarity score here is its union form.)
    """

    reads: ClassVar[frozenset[str]] = frozenset({"keys", "features"})
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
        unit = F.normalize(features(view, "hidden"), dim=-1)
        similarity = unit @ unit.transpose(1, 2)  # [B, S, S]
        duplication = similarity.masked_fill(~pivots[:, None, :], float("-inf")).amax(-1)
        rest = top_k_mask(-quantised(duplication), candidates & ~pivots, keep - pivots.sum(-1))
        return pivots | rest
