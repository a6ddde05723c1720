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


#: The official's recycling (v1.5 modelling_sparse_llama.py:275-307): of the tokens a layer prunes, the top 30 % by
#: the raters' score (plus one) are clustered, about one cluster per 10 recycled tokens.
RECYCLED_SHARE = 0.3
PER_CLUSTER = 10


def recycled_counts(pruned: int) -> tuple[int, int]:
    """(recycled tokens, clusters) when a layer prunes `pruned` tokens of a sample: int(0.3 n) + 1 and
    int(recycled / 10) + 1; none when nothing is pruned."""
    if pruned <= 0:
        return 0, 0
    recycled = int(pruned * RECYCLED_SHARE) + 1
    return recycled, int(recycled / PER_CLUSTER) + 1


def recycle(hidden: torch.Tensor, scores: torch.Tensor, pruned: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseVLM's merged tokens: (hidden [B, M, d], members BoolTensor [B, M, S]).

    Per sample, of its `pruned` [B, S] slots the `recycled_counts` highest `scores` [B, S] (ties: the earlier
    slot) are clustered by DPC-kNN (`dpc_knn`, on their float32 `hidden` [B, S, d]); each cluster becomes the
    mean of its members. A sample's clusters come first, in the order of their centres' scores; rows past its
    count have no members (filler, zeros). M = the largest count of the batch (0 when nothing is pruned).
    """
    batch, slots = pruned.shape
    groups: list[list[torch.Tensor]] = []
    for b in range(batch):
        candidates = pruned[b].nonzero().squeeze(-1)
        recycled, clusters = recycled_counts(len(candidates))
        if not recycled:
            groups.append([])
            continue
        order = torch.sort(scores[b, candidates].float(), descending=True, stable=True).indices[:recycled]
        chosen = candidates[order]  # slots, highest score first
        groups.append([chosen[members] for members in dpc_knn(hidden[b, chosen].float(), clusters)])
    width = max(map(len, groups), default=0)
    members = torch.zeros(batch, width, slots, dtype=torch.bool, device=pruned.device)
    for b, sample in enumerate(groups):
        for m, slots_of in enumerate(sample):
            members[b, m, slots_of] = True
    weights = members.float()
    merged = weights @ hidden.float() / (weights.sum(-1, keepdim=True) + 1e-6)
    return merged.to(hidden.dtype), members


def dpc_knn(x: torch.Tensor, clusters: int) -> list[torch.Tensor]:
    """Density-peak clustering with k-nearest-neighbour density (the official `cluster_and_merge`): the rows of
    `x` [N, d] in `clusters` groups, as index tensors, in the order of their centres' scores.

    Distance: L2 / sqrt(d). Density: exp(-mean squared distance to the `clusters` nearest rows, itself included),
    plus 1e-6 * (N - i) / N so that ties go to the earlier row (the official adds an unseeded 1e-6 * rand). A
    row's delta: its distance to the nearest denser row (the densest: the largest distance of all). Centres: the
    `clusters` largest delta x density; every row joins its nearest centre (ties: the earlier centre), each
    centre its own cluster.
    """
    n = x.shape[0]
    distance = torch.cdist(x[None], x[None], compute_mode="donot_use_mm_for_euclid_dist")[0] / x.shape[1] ** 0.5
    nearest = distance.topk(clusters, dim=-1, largest=False).values
    ramp = torch.arange(n, 0, -1, dtype=x.dtype, device=x.device) / n
    density = (-(nearest**2).mean(-1)).exp() + 1e-6 * ramp
    denser = density[None, :] > density[:, None]  # [i, j]: j is denser than i
    delta = torch.where(denser, distance, distance.max()).min(-1).values
    centres = torch.sort(delta * density, descending=True, stable=True).indices[:clusters]
    assigned = distance[centres].argmin(0)
    assigned[centres] = torch.arange(clusters, device=x.device)
    return [(assigned == c).nonzero().squeeze(-1) for c in range(clusters)]
