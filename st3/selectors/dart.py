"""DART (Wen et al., EMNLP 2025, arXiv 2502.11494): keep the tokens least duplicated by a few pivot tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from st3.selectors.base import Selector, View, check, features, quantised, register, top_k_mask

DART_VARIANTS = ("official", "union")


@register("dart")
@dataclass(kw_only=True)
class DART(Selector):
    """Duplication-aware: pivots by key norm, then, pivot after pivot, the tokens least similar to it.

    variant 'official' (the released code, ZichenWen1/DART at the author's last commit 5a19452,
    `llava/model/language_model/modeling_llama_self.py:337-449`), per sample:
    - reads layer K-1's keys (rotary applied) and layer K-1's output through the model's final norm (where the
      view has them: `View.previous_keys`, `View.normed`; else the layer's own keys and hidden states);
    - pivots: the `pivots` visual tokens and the `text_pivots` tokens after the image with the largest L1 key
      norm (all heads), in the model's dtype;
    - the pivots are visited in the order of a Python set of their positions in the sample (the official loop
      iterates `list(set(...))`); each takes its share of the budget: the visual tokens, not yet taken and not
      image pivots, least cosine-similar to it (`F.cosine_similarity` in the model's dtype, ties to the earlier
      token);
    - keeps the image pivots and every pick. With a budget of `pivots + P * m` (P pivots in all, what the `dart`
      method asks for a knob k: m = k // P), each pivot takes m, as the official code does; another budget is
      met exactly, the first pivots in the visit order taking one more.

    variant 'union' (st3's rule before 0.2): `pivots` image pivots by L2 key norm at the layer itself, every
    other token scored by its largest cosine similarity (raw hidden states) to any pivot, the least similar fill
    the budget: exactly the budget, no text pivots, no order.
    """

    reads: ClassVar[frozenset[str]] = frozenset({"keys", "features", "text"})
    exact: ClassVar[bool] = True
    pivots: int = 4
    """Image pivots per sample (official default 4; the union form used 8); never more than the budget."""
    text_pivots: int = 4
    """Pivots among the tokens after the image (official default 4; 'official' only)."""
    variant: str = "official"
    """'official': the released rule (per-pivot shares, text pivots, layer K-1's keys and normed states);
    'union': st3's former max-similarity form at the layer itself."""

    def validate(self) -> None:
        check(self.pivots >= 1, "pivots", f"must be >= 1, got {self.pivots}")
        check(self.text_pivots >= 0, "text_pivots", f"must be >= 0, got {self.text_pivots}")
        check(self.variant in DART_VARIANTS, "variant", f"must be one of {DART_VARIANTS}, got {self.variant!r}")

    def kept_for(self, budget: int) -> int:
        """Tokens kept for a budget knob k: the image pivots plus k // P per pivot ('official'), or k ('union')."""
        if self.variant == "union" or budget < self.pivots:
            return budget
        return self.pivots + (self.pivots + self.text_pivots) * (budget // (self.pivots + self.text_pivots))

    def select(self, view: View) -> torch.Tensor:
        return self._union(view) if self.variant == "union" else self._official(view)

    def _official(self, view: View) -> torch.Tensor:
        keys = view.previous_keys() if view.previous_keys is not None else view.keys()
        normed = view.normed() if view.normed is not None else None
        normed = normed if normed is not None else view.hidden()
        normed = normed if normed is not None else keys.transpose(1, 2).flatten(2)
        norms = torch.norm(keys.transpose(1, 2).flatten(2), p=1, dim=-1)  # [B, S], the model's dtype
        # Relative norms rounded (as in the union form): with a norm on the keys (Qwen3's k_norm) every token has
        # nearly the same key norm and ~1e-7 noise (eager vs sdpa, padded vs alone) would move the pivots.
        norms = quantised(norms.float() / norms.float().amax(-1, keepdim=True).clamp(min=1e-12))
        text = view.text()
        text = text if text is not None else torch.zeros_like(view.candidates)
        valid = view.valid if view.valid is not None else torch.ones_like(view.candidates)
        positions = valid.long().cumsum(-1) - 1  # each row's position in its own sample
        keep = view.keep.tolist()
        chosen = torch.zeros_like(view.candidates)
        for b, (candidates, count) in enumerate(zip(view.candidates, keep, strict=True)):
            chosen[b] = self._one(normed[b], norms[b], candidates, text[b], positions[b], count)
        return chosen

    def _one(self, normed, norms, candidates, text, positions, count: int) -> torch.Tensor:
        """One sample: BoolTensor [S], min(count, candidates) of its candidates."""
        chosen = torch.zeros_like(candidates)
        image_pivots = top(norms, candidates, min(self.pivots, count))
        chosen[image_pivots] = True
        pivots = image_pivots + top(norms, text, self.text_pivots)
        left = count - len(image_pivots)
        if left <= 0 or not pivots:
            return chosen
        at = positions[pivots].tolist()
        # The official visit order: a set built from the list (a set built from a dict is presized and orders
        # its items differently).
        order = [pivots[at.index(p)] for p in set(at)]
        share, extra = divmod(left, len(order))
        pool = candidates & ~chosen
        for turn, pivot in enumerate(order):
            rows = pool.nonzero().squeeze(-1)
            take = min(share + (turn < extra), len(rows))
            if take == 0:
                continue
            similarity = F.cosine_similarity(normed[pivot], normed[rows], dim=-1)
            picked = rows[torch.sort(-similarity, descending=True, stable=True).indices[:take]]
            chosen[picked] = True
            pool[picked] = False
        return chosen

    def _union(self, view: View) -> torch.Tensor:
        candidates, keep = view.candidates, view.keep
        norms = view.keys().float().norm(dim=-1).pow(2).sum(1).sqrt()  # [B, S]
        # Relative norms, rounded: models with a norm on the keys (Qwen3's k_norm) give every token nearly the
        # same key norm, and ~1e-7 noise would pick the pivots; rounded, equal norms go to the first positions.
        top_norm = norms.masked_fill(~candidates, 0.0).amax(-1, keepdim=True).clamp(min=1e-12)
        pivots = top_k_mask(quantised(norms / top_norm), candidates, keep.clamp(max=self.pivots))
        unit = F.normalize(features(view, "hidden"), dim=-1)
        similarity = unit @ unit.transpose(1, 2)  # [B, S, S]
        duplication = similarity.masked_fill(~pivots[:, None, :], float("-inf")).amax(-1)
        rest = top_k_mask(-quantised(duplication), candidates & ~pivots, keep - pivots.sum(-1))
        return pivots | rest


def top(scores: torch.Tensor, rows: torch.Tensor, count: int) -> list[int]:
    """The `count` rows (of BoolTensor `rows`) with the largest scores, ties to the earlier row."""
    index = rows.nonzero().squeeze(-1)
    order = torch.sort(scores[index], descending=True, stable=True).indices[: min(count, len(index))]
    return index[order].tolist()
