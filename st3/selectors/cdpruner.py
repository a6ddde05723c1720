"""CDPruner (Zhang et al., arXiv 2506.10967): a conditional DPP over the visual tokens, relevance-weighted."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from st3.selectors.base import VARIANTS, Selector, View, check, features, register


@register("cdpruner")
@dataclass(kw_only=True)
class CDPruner(Selector):
    """The greedy MAP of a DPP whose kernel weighs feature similarity by relevance to the instruction.

    Rule, per sample: similarity S = cosine of the visual features (embeddings before the decoder, normalised
    in the model's dtype, then float32); relevance r = mean cosine of each visual token to the instruction's
    token embeddings, min-max normalised as `(r - min + 1e-6) / (max - min)` over the sample's own visual
    tokens (the official code normalises over the batch: a sample's choice then depends on its batch-mates;
    here it does not); the kept set is the greedy MAP of the DPP with kernel L (incremental Cholesky).

    - variant 'official' (the released code, Theia-4869/CDPruner @ 9541616, `llava/model/llava_arch.py:155-167`):
      relevance negated before the mean (`relevance = (-relevance).mean(-1)`: the tokens least similar to the
      instruction weigh most, as the authors say works with CLIP) and L = diag(r) S diag(r) (the exp weighting
      commented out, 164-166); `theta` is unused.
    - variant 'paper' (the paper's eq.): r as computed, L = diag(q) S diag(q), q = exp(theta r / (2 (1 - theta))).

    The official relevance reads CLIP's text tower on the question against CLIP's projected patch embeddings; st3
    reads the decoder's embeddings of the instruction rows against the visual features (no second tower).
    Without an instruction after the image, r = 1 (both variants).
    """

    reads: ClassVar[frozenset[str]] = frozenset({"features", "text"})
    theta: float = 0.5
    """Relevance vs diversity in the paper's kernel (default 0.5); in [0, 1); unused by variant 'official'."""
    variant: str = "official"
    """'official': negated relevance, kernel r S r (the released code); 'paper': exp(theta r / (2 (1 - theta)))."""

    def validate(self) -> None:
        check(0.0 <= self.theta < 1.0, "theta", f"must be in [0, 1), got {self.theta}")
        check(self.variant in VARIANTS, "variant", f"must be one of {VARIANTS}, got {self.variant!r}")

    def relevance(self, view: View, unit: torch.Tensor) -> torch.Tensor:
        text = view.text()
        hidden = view.hidden()
        if text is None or hidden is None or not bool(text.any()):
            return torch.ones(unit.shape[:2], device=unit.device)
        words = F.normalize(hidden, dim=-1).float()
        r = relevance(unit, words, text, view.candidates, negate=self.variant == "official")
        return torch.where(text.any(-1, keepdim=True), r, torch.ones_like(r))

    def select(self, view: View) -> torch.Tensor:
        hidden = view.hidden()  # normalised in the model's dtype, as the official code does
        unit = F.normalize(hidden if hidden is not None else features(view, "hidden"), dim=-1).float()
        return dpp_greedy(self.kernel(unit, self.relevance(view, unit)).double(), view.candidates, view.keep)

    def kernel(self, unit: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
        """L [B, S, S] from unit features [B, S, d] and relevance [B, S] (the variant's weighting)."""
        if self.variant == "official":
            quality = relevance
        else:
            quality = torch.exp(self.theta / (2.0 * (1.0 - self.theta)) * relevance)
        return quality[:, :, None] * (unit @ unit.transpose(1, 2)) * quality[:, None, :]


def relevance(
    image: torch.Tensor, words: torch.Tensor, word_rows: torch.Tensor, candidates: torch.Tensor, negate: bool
) -> torch.Tensor:
    """[B, S]: each slot's mean cosine to the word rows, negated if `negate`, min-max normalised over the
    candidates of its own sample as the released code does, `(r - min + 1e-6) / (max - min)`.

    image: [B, S, E] and words: [B, T, E] unit rows (float32); word_rows: BoolTensor [B, T], the rows to average.
    """
    cos = (image @ words.transpose(1, 2)).masked_fill(~word_rows[:, None, :], 0.0)
    cos = -cos if negate else cos
    r = cos.sum(-1) / word_rows.sum(-1, keepdim=True).clamp(min=1)
    low = r.masked_fill(~candidates, float("inf")).amin(-1, keepdim=True)
    high = r.masked_fill(~candidates, float("-inf")).amax(-1, keepdim=True)
    return (r - low + 1e-6) / (high - low).clamp(min=1e-6)


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
