"""The rows of a prefill, and everything that travels with each row when rows leave."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from st3.engine.cache import gather, pack_index


@dataclass
class Counts:
    """Per sample: visual rows on the device, and on the host the real and visual rows (read with one sync)."""

    visual: torch.Tensor
    real: list[int]
    held: list[int]
    padded: bool
    """Whether any row is padding (then masks need the padding)."""


@dataclass
class Rows:
    """The rows of a prefill and everything that travels with each row, all [B, S, ...]."""

    hidden: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    position_ids: torch.Tensor  # [..., B, S]
    columns: torch.Tensor
    valid: torch.Tensor
    visual: torch.Tensor
    carried: dict[str, torch.Tensor]
    """Per-row decoder inputs the adapter names (e.g. Qwen3-VL's deepstack features)."""
    image_end: torch.Tensor | None = None
    """[B, 1]: the prompt's last visual column, fixed when the prefill starts (text tokens between images, e.g.
    Mistral3's [IMG_BREAK], never become the instruction when the visual rows after them leave)."""
    blocks: torch.Tensor | None = None
    """Per row, its image block (-1: none) for masks with bidirectional image blocks; None where none."""

    def __post_init__(self) -> None:
        if self.image_end is None:
            self.image_end = torch.where(self.visual, self.columns, -1).amax(-1, keepdim=True)

    def keep(self, keep: torch.Tensor) -> Rows:
        """The rows where `keep` [B, S] holds, per sample in order, left-padded with invalid filler."""
        index, filled = pack_index(keep)
        return Rows(
            hidden=gather(self.hidden, index, 1),
            cos=gather(self.cos, index, 1),
            sin=gather(self.sin, index, 1),
            position_ids=gather(self.position_ids, index, -1),
            columns=gather(self.columns, index, 1),
            valid=gather(self.valid, index, 1) & filled,
            visual=gather(self.visual, index, 1) & filled,
            carried={name: gather(value, index, 1) for name, value in self.carried.items()},
            image_end=self.image_end,
            blocks=None if self.blocks is None else gather(self.blocks, index, 1),
        )

    def to(self, device: torch.device) -> Rows:
        """These rows on `device` (a model split over devices: the rows follow the hidden states)."""
        move = (self.hidden, self.cos, self.sin, self.position_ids, self.columns, self.valid, self.visual)
        return Rows(
            *(t.to(device) for t in move),
            carried={name: value.to(device) for name, value in self.carried.items()},
            image_end=self.image_end.to(device),
            blocks=None if self.blocks is None else self.blocks.to(device),
        )

    def insert_merged(self, hidden: torch.Tensor, valid: torch.Tensor, columns: torch.Tensor, source: tuple) -> Rows:
        """These rows plus merged visual rows (`hidden` [B, M, d], the real ones `valid` [B, M], first), each
        sample's placed right before its instruction (after its visual rows and earlier merged rows), in order.

        columns [B, M]: their ids (negative: no prompt column); `source`: (cos, sin, position_ids) of one row per
        sample ([B, 1, ...], [..., B, 1]) whose position they take (`source_row`). Filler rows go first, as in `keep`.
        """
        batch, slots = self.valid.shape
        width = hidden.shape[1]
        at = slots - (self.text().sum(-1, keepdim=True))  # each sample's first instruction slot
        stride = width + 1
        order = torch.arange(slots, device=at.device) * stride + width  # existing slot s, after anything put at s
        order = order.expand(batch, slots)
        new = torch.arange(width, device=at.device)
        new = torch.where(valid, at * stride + new, new - stride)  # before slot `at`; filler: first of all
        index = torch.sort(torch.cat([order, new], -1), dim=-1, stable=True).indices

        def grown(old: torch.Tensor, added: torch.Tensor, dim: int = 1) -> torch.Tensor:
            return gather(torch.cat([old, added.to(old.dtype)], dim), index, dim)

        cos, sin, positions = source
        expand = (batch, width, *cos.shape[2:])
        return Rows(
            hidden=grown(self.hidden, hidden),
            cos=grown(self.cos, cos.expand(expand)),
            sin=grown(self.sin, sin.expand(expand)),
            position_ids=grown(self.position_ids, positions.expand(*positions.shape[:-1], width), -1),
            columns=grown(self.columns, columns),
            valid=grown(self.valid, valid),
            visual=grown(self.visual, valid),
            carried={},
            image_end=self.image_end,
        )

    def source_row(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(cos, sin, position_ids) of each sample's last visual row, one row each (its first where it has none);
        read before any row leaves, while slots are columns."""
        at = self.image_end.clamp(min=0)
        return gather(self.cos, at, 1), gather(self.sin, at, 1), gather(self.position_ids, at, -1)

    def without_visual(self, kept: torch.Tensor) -> Rows:
        """Drop the visual rows not in `kept` (and padding)."""
        return self.keep((self.valid & ~self.visual) | kept)

    def counts(self) -> Counts:
        held = self.visual.sum(-1)
        real, host_held = torch.stack([self.valid.sum(-1), held]).tolist()
        return Counts(held, real, host_held, any(r < self.valid.shape[-1] for r in real))

    def last(self) -> torch.Tensor:
        """BoolTensor [B, S]: the last prompt token of each sample (the last column: prompts are left-padded)."""
        last = torch.zeros_like(self.valid)
        last[:, -1] = True
        return last

    def text(self) -> torch.Tensor:
        """BoolTensor [B, S]: the real rows after the prompt's last visual row (the instruction)."""
        return self.valid & ~self.visual & (self.columns > self.image_end)
