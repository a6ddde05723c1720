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
