"""CDPruner (Zhang et al., arXiv 2506.10967): a conditional DPP over the visual tokens, relevance-weighted."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from st3.selectors.base import Selector, View, check, features, register


@register("cdpruner")
@dataclass(kw_only=True)
class CDPruner(Selector):
    """The greedy MAP of a DPP whose kernel weighs feature similarity by relevance to the instruction.

    Rule, per sample: similarity S = cosine of the visual features (embeddings before the decoder); relevance
    r = mean cosine of each visual token to the instruction's token embeddings, min-max normalised over the
    sample's own visual tokens (the official code normalises over the batch: a sample's choice then depends
    on its batch-mates; here it does not); kernel L = diag(q) S diag(q) with q = exp(theta r / (2 (1 - theta)));
    the kept set is the greedy MAP of the DPP (incremental Cholesky). theta = 0: diversity alone.
    Without an instruction after the image, r = 1.
    """

    reads: ClassVar[frozenset[str]] = frozenset({"features", "text"})
    theta: float = 0.5
    """Relevance vs diversity (paper default 0.5); in [0, 1)."""

    def validate(self) -> None:
        check(0.0 <= self.theta < 1.0, "theta", f"must be in [0, 1), got {self.theta}")

    def relevance(self, view: View, unit: torch.Tensor) -> torch.Tensor:
        text = view.text()
        hidden = view.hidden()
        if text is None or hidden is None or not bool(text.any()):
            return torch.ones(unit.shape[:2], device=unit.device)
        words = F.normalize(hidden.float(), dim=-1)
        cos = (unit @ words.transpose(1, 2)).masked_fill(~text[:, None, :], 0.0)
        r = cos.sum(-1) / text.sum(-1, keepdim=True).clamp(min=1)
        low = r.masked_fill(~view.candidates, float("inf")).amin(-1, keepdim=True)
        high = r.masked_fill(~view.candidates, float("-inf")).amax(-1, keepdim=True)
        r = (r - low) / (high - low).clamp(min=1e-6)
        return torch.where(text.any(-1, keepdim=True), r, torch.ones_like(r))

    def select(self, view: View) -> torch.Tensor:
        unit = F.normalize(features(view, "hidden"), dim=-1)
        alpha = self.theta / (2.0 * (1.0 - self.theta))
        quality = torch.exp(alpha * self.relevance(view, unit))
        kernel = quality[:, :, None] * (unit @ unit.transpose(1, 2)) * quality[:, None, :]
        return dpp_greedy(kernel.double(), view.candidates, view.keep)


def dpp_greedy(kernel: torch.Tensor, candidates: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Greedy MAP of a DPP per sample (Chen et al., 2018): add the item with the largest marginal gain.

    kernel: [B, S, S] positive semi-definite. Gains are the residual diagonal after projecting out the items
    chosen so far (kept as incremental Cholesky rows). Once a sample's kernel rank is spent (budgets above the
    feature width), every residual is ~0: the rest of its budget goes by the kernel's diagonal (quality).
    """
    batch, slots, _ = kernel.shape
    diagonal = torch.diagonal(kernel, dim1=1, dim2=2).clone()
    gains = diagonal.clone()
    rows: list[torch.Tensor] = []
    chosen = torch.zeros_like(candidates)
    index = torch.arange(batch, device=kernel.device)
    for step in range(int(keep.max()) if keep.numel() else 0):
        active = keep > step
        score = (gains.clamp(min=0) + 1e-9 * diagonal).masked_fill(~candidates | chosen, float("-inf"))
        pick = score.argmax(-1)
        chosen[index[active], pick[active]] = True
        picked_gain = gains[index, pick]
        spent = picked_gain <= 1e-9 * diagonal[index, pick]  # nothing left to project out
        row = kernel[index, pick]  # [B, S]
        for previous in rows:
            row = row - previous[index, pick][:, None] * previous
        row = row / picked_gain.clamp(min=1e-30).sqrt()[:, None]
        row = torch.where((active & ~spent)[:, None], row, torch.zeros_like(row))
        rows.append(row)
        gains = gains - row.pow(2)
    return chosen & candidates
