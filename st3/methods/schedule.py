"""Explicit per-layer counts (`schedule`), and SparseVLM's counts with its text raters (`sparsevlm`).

    st3.get("schedule", counts=((2, 288), (8, 144), (16, 72)))   # entering layer 2 keep 288, ...
    st3.get("sparsevlm")                                          # v1.5: 300 / 200 / 110 entering 3 / 7 / 16

A count is visual tokens per sample (capped at what the sample holds), from that layer on; `scale` multiplies
every count (rounded up) and is what `st3.match` searches, so a schedule's shape can be fitted to a budget. A
G-Search schedule (arXiv 2412.00556) is such a list of counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from st3.methods.base import Method, check, register
from st3.selectors import Selector, View
from st3.selectors import SparseVLM as SparseVLMRule
from st3.selectors.base import top_k_mask
from st3.selectors.sparsevlm import recycle, recycled_counts

#: SparseVLM v1.5's counts per `RETAIN_TOKN` (its equivalent budget), kept leaving layers 2, 6, 15 of LLaVA-1.5-7B
#: (so entering 3, 7, 16) of its 576 visual tokens (official score.py:7-21, at commit 26a5f48).
SPARSEVLM_COUNTS: dict[int, tuple[int, int, int]] = {
    192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17),
}  # fmt: skip
SPARSEVLM_LAYERS = (3, 7, 16)


@register("schedule")
@dataclass(kw_only=True)
class Schedule(Method):
    """Explicit counts: entering each listed layer, keep at most that many visual tokens per sample (default rule:
    attention)."""

    budget_knob: ClassVar[str] = "scale"

    counts: tuple[tuple[int, int], ...] | str | None = None
    """(layer, visual tokens kept per sample) pairs, layers increasing, or the same as text without commas for a
    method spec ('3:300/7:200'); None: SparseVLM v1.5's (3, 300), (7, 200), (16, 110) for a 32-layer model, the
    layers scaled to the model's depth."""
    scale: float = 1.0
    """Multiplies every count (rounded up); what `st3.match` searches; 1: the counts as given."""

    def validate(self) -> None:
        check(self.scale >= 0.0, "scale", f"must be >= 0, got {self.scale}")
        if isinstance(self.counts, str):
            self.counts = parse_counts(self.counts)
        if self.counts is None:
            return
        check(len(self.counts) > 0, "counts", "must name at least one (layer, count) pair")
        check(all(len(pair) == 2 for pair in self.counts), "counts", f"must be (layer, count) pairs, got {self.counts}")
        layers = [layer for layer, _ in self.counts]
        check(all(layer >= 0 for layer in layers), "counts", f"layers must be >= 0, got {layers}")
        check(layers == sorted(set(layers)), "counts", f"layers must increase, got {layers}")
        check(all(n >= 0 for _, n in self.counts), "counts", f"counts must be >= 0, got {self.counts}")

    def validate_for(self, num_layers: int) -> None:
        bad = [layer for layer, _ in self.plan(num_layers) if layer >= num_layers]
        check(not bad, "counts", f"layers {bad} are beyond the model's last layer ({num_layers - 1})")

    def default_counts(self) -> tuple[tuple[int, int], ...]:
        """The counts of a 32-layer model when none are given."""
        return tuple(zip(SPARSEVLM_LAYERS, SPARSEVLM_COUNTS[192]))

    def plan(self, num_layers: int) -> tuple[tuple[int, int], ...]:
        """The (layer, count) pairs on a model of `num_layers` (the default's layers scaled, kept increasing)."""
        if self.counts is not None:
            return self.counts
        pairs, last = [], 0
        for layer, count in self.default_counts():
            last = max(last + 1, round(layer * num_layers / 32))
            pairs.append((last, count))
        return tuple(pairs)

    def prefill_keep(self, layer: int, num_layers: int, visual: torch.Tensor) -> torch.Tensor | None:
        for at, count in self.plan(num_layers):
            if at == layer:
                return visual.clamp(max=math.ceil(count * self.scale - 1e-9))
        return None


def parse_counts(text: str) -> tuple[tuple[int, int], ...]:
    """'3:300/7:200' -> ((3, 300), (7, 200)): the counts of a method spec, which cannot hold commas."""
    try:
        return tuple((int(layer), int(count)) for layer, count in (pair.split(":") for pair in text.split("/")))
    except ValueError:
        raise ValueError(f"counts: as text, 'layer:count/layer:count', got {text!r}") from None


def format_counts(counts: tuple[tuple[int, int], ...]) -> str:
    """((3, 300), (7, 200)) -> '3:300/7:200' (for `-m schedule:counts=...`)."""
    return "/".join(f"{layer}:{count}" for layer, count in counts)


@register("sparsevlm")
@dataclass(kw_only=True)
class SparseVLM(Schedule):
    """SparseVLM v1.5 (arXiv 2410.04417): text raters rank the visual tokens entering layers 3, 7 and 16, which
    keep the official counts for the budget `retain` (300 / 200 / 110 at 192); with `recycle`, part of the pruned
    tokens are merged into a few new visual rows (DPC-kNN clusters), as the official does."""

    retain: int = 192
    """The official equivalent budget (`RETAIN_TOKN`): 192, 128, 96 or 64 picks its counts (when `counts` is None)."""
    recycle: bool = False
    """Merge part of the pruned tokens into new rows placed before the instruction, as the official v1.5 does by
    default (the top 30 % of them by the raters' score, about one row per 10; docs/methods.md). LLaVA-style
    decoders only (1-D positions, plain causal masks)."""

    _scores: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)

    def validate(self) -> None:
        super().validate()
        allowed = sorted(SPARSEVLM_COUNTS)
        check(self.retain in allowed, "retain", f"must be one of {allowed}, got {self.retain}")
        check(
            not self.recycle or self.selector is None or isinstance(self.selector, SparseVLMRule),
            "recycle",
            "recycles by the raters' scores: leave selector unset (or st3.selectors.SparseVLM()) with recycle=True",
        )

    def choose(self, view: View) -> torch.Tensor:
        if not self.recycle:
            return super().choose(view)
        self._scores = self.rule.score(view)  # `merge_pruned`, called next, ranks the pruned tokens by them too
        return top_k_mask(self._scores, view.candidates, view.keep)

    def merge_pruned(self, view: View, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not self.recycle:
            return None
        scores, self._scores = self._scores, None
        return recycle(view.hidden(), scores, view.candidates & ~kept)

    def merged_rows(self, pruned: int) -> int:
        return recycled_counts(pruned)[1] if self.recycle else 0

    def chooses_before_decoder(self, num_layers: int) -> bool:
        return not self.recycle and super().chooses_before_decoder(num_layers)

    def default_counts(self) -> tuple[tuple[int, int], ...]:
        return tuple(zip(SPARSEVLM_LAYERS, SPARSEVLM_COUNTS[self.retain]))

    def default_selector(self) -> Selector:
        return SparseVLMRule()
