"""What the engine shows a method where it chooses tokens: the candidates, the budget and lazy reads.

The engine builds a `View` at each pruning layer and eviction; selectors and eviction rules read only it, so
the engine knows nothing of methods and a method nothing of the engine's state.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class View:
    """What a selector may read where it acts. Tensors are [B, S] over the slots the layer holds.

    attention(rows): attention each slot received from the query rows ('last', 'text', 'all'; in decode only
    'current', the token being written), heads averaged, at the scoring layer (the layer before, in prefill).
    hidden(): the slots' hidden states entering the layer [B, S, H] (before the decoder: the embeddings).
    keys(): the slots' keys at the layer [B, kv_heads, S, D] (rotated; norms and cosines do not depend on it).
    text(): BoolTensor [B, S], the instruction's rows (after the image), or None where they are gone (decode).
    received: attention accumulated over decode steps [B, S] (None outside decode).
    """

    layer: int
    candidates: torch.Tensor
    keep: torch.Tensor
    attention: Callable[[str], torch.Tensor]
    hidden: Callable[[], torch.Tensor | None]
    keys: Callable[[], torch.Tensor]
    text: Callable[[], torch.Tensor | None] = lambda: None
    received: torch.Tensor | None = None
    decoding: bool = False
    grids: list | None = None
    """Per sample, the image/frame grids (`st3.adapters.Grid`) the candidates tile in raster order, or None."""
    patches: torch.Tensor | None = None
    """LongTensor [B, S]: each candidate's index among its sample's candidates (-1 elsewhere); computed from
    `candidates` on first read when not given (most eviction rules never read it: four operations saved)."""


def _patches(view: View) -> torch.Tensor:
    if view._patches is None:
        view._patches = patch_index(view.candidates)
    return view._patches


def _set_patches(view: View, value: torch.Tensor | None) -> None:
    view._patches = value


# The dataclass's __init__ assigns `patches` through this property (a lazily computed field).
View.patches = property(_patches, _set_patches)


def patch_index(candidates: torch.Tensor) -> torch.Tensor:
    """LongTensor [B, S]: each candidate's index among its sample's candidates (-1 elsewhere)."""
    return torch.where(candidates, candidates.long().cumsum(-1) - 1, -1)
