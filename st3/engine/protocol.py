"""The engine's side of the seam with methods: what it calls, and nothing else (`st3.methods.Method` implements it)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from st3.selectors.view import View
    from st3.trace import Trace


class Policy(Protocol):
    """A method as the engine sees it: how many visual tokens each layer keeps, and which ones."""

    name: str
    record_positions: bool
    compresses_vision: bool
    #: Where the vision tower's [CLS] saliency starts (a slice start over its layers), None: the feature layer.
    saliency_start: int | None

    @property
    def label(self) -> str:
        """The name shown in a trace (with the selector where it is not the method's own)."""

    @property
    def accumulates(self) -> bool:
        """Whether decode views need the attention each slot received over the decode steps."""

    @property
    def evicts_exactly(self) -> bool:
        """Whether `evict` keeps exactly its budgets by construction (else the engine calls `check_counts`)."""

    def begin(self, trace: Trace) -> None:
        """A new prefill starts; `trace` is its record."""

    def prefill_keep(self, layer: int, num_layers: int, visual: torch.Tensor) -> torch.Tensor | None:
        """Visual tokens [B] to keep entering `layer`, given `visual` [B] held; None: keep all."""

    def chooses_before_decoder(self, num_layers: int) -> bool:
        """Whether the method only chooses visual tokens before the decoder (then the stock decoder may run)."""

    def choose(self, view: View) -> torch.Tensor:
        """Prefill: BoolTensor [B, S], the candidates of `view` to keep."""

    def merge_pruned(self, view: View, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Prefill, after `choose` kept `kept`: merged visual rows to add, (hidden [B, M, d], members [B, M, S]
        BoolTensor over the view's slots; a row without members is filler), or None."""

    def compress(
        self, saliency: torch.Tensor, keys: torch.Tensor, features: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Before the decoder, per image: (kept patches, rewritten patches, features after merging)."""

    def host_decode_budget(self, layer: int, step: int, visual_after_prefill: list[int]) -> list[int] | None:
        """Visual tokens per sample that `layer` may hold after decode forward `step` (1-based); None: no limit."""

    def evict(self, view: View) -> torch.Tensor:
        """Decode: BoolTensor [B, S], the cached visual entries of `view` to keep."""

    def check_counts(self, evictions: list[tuple[torch.Tensor, View]]) -> None:
        """Raise unless the (kept, view) pairs of one decode step keep exactly their budgets."""
