"""SparseVLM's rule (arXiv 2410.04417; official code Gumpest/SparseVLMs): text raters score the visual tokens.

Raters, once per prompt, from the decoder's input embeddings: the softmax over the text of each image token's
dot products with the text tokens (everything after the image), averaged over the image tokens; the raters
are the text tokens above the mean of that distribution. Each visual token's score is the attention the
raters give it at the scoring layer, heads and raters averaged (`View.attention(raters)`), and the top k stay.
Facts and line numbers: tests/fixtures/systems/README.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from st3.selectors.base import Selector, View, register


@register("sparsevlm")
@dataclass(kw_only=True)
class SparseVLM(Selector):
    """The visual tokens most attended by the text raters (the text tokens most related to the image)."""

    reads: ClassVar[frozenset[str]] = frozenset({"attention", "text"})
    exact: ClassVar[bool] = True

    def score(self, view: View) -> torch.Tensor:
        return view.attention(raters(view))


def raters(view: View) -> torch.Tensor | None:
    """BoolTensor [B, S]: the slots of each sample's raters; None where no text is known (decode).

    From the whole prompt's embeddings where the engine gives them (the raters do not change as visual tokens
    leave); else from the view's own rows (`hidden`, `text`: the embeddings before the decoder).
    """
    prompt = view.prompt()
    if prompt is None:
        embeds, visual, text = view.hidden(), view.candidates, view.text()
        if embeds is None or text is None:
            return None
        return _raters(embeds, visual, text)
    embeds, visual, valid = prompt
    columns = torch.arange(embeds.shape[1], device=embeds.device).expand_as(valid)
    image_end = torch.where(visual, columns, -1).amax(-1, keepdim=True)
    chosen = _raters(embeds, visual, valid & ~visual & (columns > image_end))
    slots = view.columns.clamp(min=0)
    return torch.gather(chosen, 1, slots) & (view.valid if view.valid is not None else True)


def _raters(embeds: torch.Tensor, visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """BoolTensor [B, L]: per sample (its own rows only), the text rows whose mean softmax share over the image
    tokens exceeds the mean share."""
    chosen = torch.zeros_like(text)
    for b in range(embeds.shape[0]):
        image, words = embeds[b, visual[b]].float(), embeds[b, text[b]].float()
        if len(image) == 0 or len(words) == 0:
            continue
        share = torch.softmax(image @ words.T, dim=-1).mean(0)  # [T]: how much the image relates to each word
        chosen[b, text[b].nonzero().squeeze(-1)[share > share.mean()]] = True
    return chosen
