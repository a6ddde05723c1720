"""What the engine shows a selector where it chooses tokens: the candidates, the budget and lazy reads.

The engine builds a `View` at each pruning layer and eviction (the vLLM plugin builds one from an image's
embeddings); selectors read only it, so the engine knows nothing of selectors and a selector nothing of the
engine's state. Everything that costs work is a function, computed only if a selector calls it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class View:
    """What a selector may read where it acts. Tensors are [B, S] over the slots the layer holds.

    attention(rows): attention each slot received at the scoring layer (the layer before, in prefill), heads
    averaged, from the query `rows` [B, S] (mean over them; a sample without any is scored by its default
    row), or from the default row when None: the last prompt token in prefill, the token being written in
    decode.
    hidden(): the slots' hidden states entering the layer [B, S, H] (before the decoder: the embeddings), or
    None where they are gone (decode).
    keys(): the slots' keys at the layer [B, kv_heads, S, D] (rotated; norms and cosines do not depend on it).
    text(): BoolTensor [B, S], the instruction's rows (after the image), or None where they are gone (decode).
    received: attention accumulated over decode steps [B, S] (None outside decode, or when no rule reads it).
    prompt(): the whole prompt's input embeddings, visual and valid columns (SparseVLM's raters read them).
    """

    layer: int
    candidates: torch.Tensor
    keep: torch.Tensor
    attention: Callable[[torch.Tensor | None], torch.Tensor]
    hidden: Callable[[], torch.Tensor | None]
    keys: Callable[[], torch.Tensor]
    text: Callable[[], torch.Tensor | None] = lambda: None
    valid: torch.Tensor | None = None
    """BoolTensor [B, S]: the real (not padding) slots; None where every slot is real."""
    received: torch.Tensor | None = None
    decoding: bool = False
    grids: list | None = None
    """Per sample, the image/frame grids (`st3.adapters.Grid`) the candidates tile in raster order, or None."""
    patches: torch.Tensor | None = None
    """LongTensor [B, S]: each candidate's index among its sample's candidates (-1 elsewhere); computed from
    `candidates` on first read when not given (most eviction rules never read it: four operations saved)."""
    previous_keys: Callable[[], torch.Tensor] | None = None
    """The slots' keys at the layer before [B, kv_heads, S, D] (rotated; in prefill, where that layer ran on
    the same rows: DART's official rule reads layer K-1's), or None where the engine has none."""
    normed: Callable[[], torch.Tensor] | None = None
    """The hidden states entering the layer through the model's final norm [B, S, H] (prefill; DART's official
    features), or None."""
    columns: torch.Tensor | None = None
    """LongTensor [B, S]: each slot's column in the prompt (prefill), or None where not given."""
    prompt: Callable[[], tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None] = lambda: None
    """(embeddings [B, L, H], visual [B, L], valid [B, L]): the decoder's inputs for the whole prompt before any
    row left (prefill; `columns` places the slots in it), or None where not given (decode)."""
    own_attention: Callable[[torch.Tensor | None], torch.Tensor] | None = None
    """As `attention`, but scored at the layer being entered, by its own norm and q/k projections applied to its
    input rows (prefill; PyramidDrop's released scoring), or None where the engine has none."""


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
