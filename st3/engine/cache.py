"""A KV-cache layer whose slots can be removed, and the packing that removes them.

Each slot of a `PrunableLayer` remembers the prompt column it came from, whether it is real (not
padding) and whether it is visual. That bookkeeping lives in the cache layer itself so that every batch
operation transformers applies to the cache (beam reordering, repeats, selection) moves it along with the
keys and values.
"""

from __future__ import annotations

import torch

from st3.compat import DynamicLayer


def pack_index(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices that gather the kept slots of each row, in order, left-padded to a common width.

    keep: BoolTensor [B, S]. Returns (index [B, S'], valid [B, S']) with S' the largest kept count; a
    row with fewer kept slots starts with `valid == False` filler (pointing at arbitrary slots).
    """
    counts = keep.sum(-1)
    width = int(counts.max()) if keep.numel() else 0
    # A stable sort on the keep flag puts dropped slots first and kept slots last, both in order.
    order = torch.sort(keep.to(torch.int8), dim=-1, stable=True).indices
    index = order[:, keep.shape[-1] - width :]
    valid = torch.arange(width, device=keep.device) >= (width - counts)[:, None]
    return index, valid


def gather(x: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """Gather along `dim` with a per-sample index [B, S'] (batch is dim 0, or -2 of position ids).

    One `index_select` per sample: contiguous results, and several times faster on CPU than
    `take_along_dim`, whose broadcast index arithmetic dominated eviction time at batch 8.
    """
    if dim == -1:  # position ids [..., B, S]
        return torch.stack([x[..., b, :].index_select(-1, index[b]) for b in range(index.shape[0])], dim=-2)
    return torch.stack([x[b].index_select(dim - 1, index[b]) for b in range(index.shape[0])])


class PrunableLayer(DynamicLayer):
    """A `DynamicLayer` whose entries carry (column, valid, visual) bookkeeping and can be dropped.

    `get_seq_length()` is the number of slots this layer holds (padding included), not the logical
    length of the sequence: after pruning, layers hold different numbers of slots, and layer 0's count
    is smaller than the tokens seen whenever layer 0 prunes. The engine never derives positions from it;
    generate() only uses it to slice off the prompt on later steps, which is right since st3 refuses
    to continue a pruned cache with more than one new token.
    """

    is_croppable = False  # generate() (5.24+) consults this before cropping; a pruned cache cannot be cropped

    def __init__(self) -> None:
        super().__init__()
        self.columns: torch.Tensor | None = None  # [B, S] prompt column (or generated index) per slot
        self.valid: torch.Tensor | None = None  # [B, S] False for padding slots
        self.visual: torch.Tensor | None = None  # [B, S] True for visual tokens
        self.visual_after_prefill: torch.Tensor | None = None  # [B] visual slots held when prefill ended
        self.padded = False  # whether any slot is padding; kept on the host so masks need no device sync
        self.received: torch.Tensor | None = None  # [B, S] attention summed over decode steps (if a rule reads it)

    # ------------------------------------------------------------------------------------ bookkeeping
    def record(self, columns: torch.Tensor, valid: torch.Tensor, visual: torch.Tensor) -> None:
        """Describe the slots the last `update` appended (after prefill, only real tokens are appended)."""
        if self.columns is None:
            self.columns, self.valid, self.visual = columns, valid, visual
            self.padded = not bool(valid.all())
        else:
            self.columns = torch.cat([self.columns, columns], dim=-1)
            self.valid = torch.cat([self.valid, valid], dim=-1)
            self.visual = torch.cat([self.visual, visual], dim=-1)
            if self.received is not None:
                self.received = torch.cat([self.received, self.received.new_zeros(visual.shape)], dim=-1)

    @property
    def visual_held(self) -> torch.Tensor:
        """LongTensor [B]: real visual slots per sample."""
        return (self.valid & self.visual).sum(-1)

    def keep(self, keep: torch.Tensor) -> None:
        """Remove, for real, every slot where `keep` [B, S] is False."""
        index, valid = pack_index(keep)
        self.keys = gather(self.keys, index, dim=2)
        self.values = gather(self.values, index, dim=2)
        self.columns = gather(self.columns, index, dim=1)
        self.valid = gather(self.valid, index, dim=1) & valid
        self.visual = gather(self.visual, index, dim=1)
        if self.received is not None:
            self.received = gather(self.received, index, dim=1)
        self.padded = not bool(self.valid.all())

    # ----------------------------------------------------------------- batch operations of generate()
    def _batch(self, fn) -> None:
        for name in ("columns", "valid", "visual", "visual_after_prefill", "received"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, fn(value))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._batch(lambda t: t[indices])

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a pruned KV cache cannot be cropped; run the prompt again instead")
