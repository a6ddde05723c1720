"""A KV-cache layer whose slots can be removed, and the packing that removes them.

Each slot of a `PrunableLayer` remembers the prompt column it came from, whether it is real (not
padding) and whether it is visual. That bookkeeping lives in the cache layer itself so that every batch
operation transformers applies to the cache (beam reordering, repeats, selection) moves it along with the
keys and values.

Decoding is host-bound on a GPU at batch 1, so the per-step bookkeeping costs no device operation: the
slots appended by decode forwards are all real, non-visual and numbered consecutively, so they are kept
as a count (`appended`) and only materialised (`columns`, `valid`, `visual`) when something reads them, e.g.
an eviction. The per-sample counts of real and visual slots are mirrored on the host (`real`, `held`),
so budgets, packing widths and padding are decided without waiting for the device.
"""

from __future__ import annotations

from bisect import bisect_right

import torch
from transformers import cache_utils

from st3.compat import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer


def pack_index(
    keep: torch.Tensor, width: int | None = None, counts: list[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Indices that gather the kept slots of each row, in order, left-padded to a common width.

    keep: BoolTensor [B, S]; width: the largest kept count when the caller knows it on the host (else it
    is read from the device); counts: each row's kept count, when the host knows them (then width is their
    maximum). Returns (index [B, S'], valid [B, S']) with S' that width; a row with fewer kept slots starts
    with `valid == False` filler (pointing at arbitrary slots). With `counts` all equal, no row has filler
    and valid is None (what the host knows costs no operation).
    """
    kept = None
    if counts is not None:
        width = max(counts, default=0)
    elif width is None:
        kept = keep.sum(-1)
        width = int(kept.max()) if keep.numel() else 0
    # A stable sort on the keep flag puts dropped slots first and kept slots last, both in order.
    order = torch.sort(keep.to(torch.int8), dim=-1, stable=True).indices
    index = order[:, keep.shape[-1] - width :]
    if counts is not None and all(c == width for c in counts):
        return index, None
    if kept is None:
        kept = keep.sum(-1)
    valid = torch.arange(width, device=keep.device) >= (width - kept)[:, None]
    return index, valid


def gather(x: torch.Tensor, index: torch.Tensor, dim: int, flat: torch.Tensor | None = None) -> torch.Tensor:
    """Gather along `dim` with a per-sample index [B, S'] (batch is dim 0, or -2 of position ids).

    One `index_select` over the rows of a flattened view, whatever the batch size: a contiguous result,
    a constant number of operations (no per-sample loop), and no broadcast index arithmetic per element
    (what made `take_along_dim` slow on CPU). `flat`: `flat_index(x, index, dim)`, to share between
    tensors of one shape (keys and values).
    """
    if dim == -1:  # position ids [..., B, S]: small, gather directly
        return x.gather(-1, index.expand(*x.shape[:-2], *index.shape))
    if flat is None:
        flat = flat_index(x, index, dim)
    lead, trail = x.shape[1:dim], x.shape[dim + 1 :]
    rows = x.reshape(-1, trail.numel()).index_select(0, flat)
    return rows.view(x.shape[0], *lead, index.shape[-1], *trail)


def flat_index(x: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """The rows of `x` flattened up to `dim` that `gather(x, index, dim)` takes, in order."""
    # Each (sample, leading index) pair is a block of `length` rows: block g starts at g * length.
    return torch.add(index[:, None, :], _blocks(x.shape[:dim], index.device), alpha=x.shape[dim]).reshape(-1)


#: (shape up to the gathered dim, device) -> block numbers [B, groups, 1], shared by every layer of that shape.
_BLOCKS: dict = {}


def _blocks(lead: torch.Size, device: torch.device) -> torch.Tensor:
    """LongTensor [B, prod(lead[1:]), 1]: 0, 1, ... the number of each block; built once per shape."""
    key = (tuple(lead), device)
    blocks = _BLOCKS.get(key)
    if blocks is None:
        if len(_BLOCKS) >= 32:  # a few shapes per run (batch, heads); forget those of earlier runs
            _BLOCKS.clear()
        with torch.inference_mode(False):  # usable inside and outside inference mode
            blocks = _BLOCKS[key] = torch.arange(lead.numel(), device=device).view(lead[0], -1, 1)
    return blocks


#: Cache layer types whose `keys` and `values` tensors are all the data they hold (a quantized layer's are not).
_MEASURED = tuple(
    getattr(cache_utils, name)
    for name in ("DynamicLayer", "DynamicSlidingWindowLayer", "StaticLayer", "StaticSlidingWindowLayer")
    if hasattr(cache_utils, name)
)


def cache_bytes(cache) -> int | None:
    """Bytes the key and value tensors of `cache` occupy (a static layer: its whole buffer, used or not); None
    where a layer keeps data elsewhere (quantized, or a kind st3 does not know): not measured, rather than a
    figure that reads as one."""
    layers = getattr(cache, "layers", None)
    if layers is None or any(not isinstance(layer, PrunableLayer) and type(layer) not in _MEASURED for layer in layers):
        return None
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in layers if getattr(layer, "keys", None) is not None)


def make_prunable(cache: DynamicCache, windows: list[int | None]) -> None:
    """Give an empty cache one `PrunableLayer` per decoder layer, with that layer's sliding window (None: full
    attention); refuse layer kinds st3 cannot prune (offloaded, quantized, static)."""
    if any(type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer) for layer in cache.layers):
        raise TypeError("st3 supports DynamicCache layers only (full or sliding-window; no offloading or quantizing)")
    cache.layers[:] = [PrunableLayer(window) for window in windows]


class PrunableLayer(DynamicLayer):
    """A `DynamicLayer` whose entries carry (column, valid, visual) bookkeeping and can be dropped.

    `get_seq_length()` is the number of slots this layer holds (padding included), not the logical
    length of the sequence: after pruning, layers hold different numbers of slots, and layer 0's count
    is smaller than the tokens seen whenever layer 0 prunes. The engine never derives positions from it;
    generate() only uses it to slice off the prompt on later steps, which is right since st3 refuses
    to continue a pruned cache with more than one new token.
    """

    is_croppable = False  # generate() (5.24+) consults this before cropping; a pruned cache cannot be cropped

    def __init__(self, window: int | None = None) -> None:
        super().__init__()
        # A sliding-window layer counts its window in ORIGINAL columns (as the model's mask does), not in slots: a
        # slot at column k is visible from column q iff k > q - window. `slide` removes, after prefill and after
        # every decode forward, the slots no later token can see, so it holds at most window - 1 real slots per
        # sample (what transformers' own sliding layer keeps) and everything it holds is visible to the next token.
        self.window = window
        self.is_sliding = window is not None
        # The recorded slots [B, S0]; the `appended` decode slots after them are implied (see the module doc).
        self._columns: torch.Tensor | None = None
        self._valid: torch.Tensor | None = None
        self._visual: torch.Tensor | None = None
        self.appended = 0  # decode slots appended after the recorded ones: real, non-visual, consecutive columns
        self.appended_start = 0  # column of the first of them
        self._full: tuple | None = None  # materialised (columns, valid, visual), valid while `appended` is unchanged
        self.received: torch.Tensor | None = None  # [B, S] attention summed over decode steps (if a rule reads it)
        # Host mirrors, per sample: real slots (padding excluded) and real visual slots; and whether any
        # slot is padding. Kept exact by every operation below, so no decision needs a device sync.
        self.real: list[int] = []
        self.held: list[int] = []
        self.held_after_prefill: list[int] = []
        self.padded = False
        self.next_column = 0  # the column of the next token fed
        self.steps = 0  # decode forwards since prefill
        # Sliding layers: per sample, the (columns, visual flags) of its real recorded slots, in order, and how many
        # of them left the window; None when unknown (after any repacking). `oldest`: no real slot held is older.
        self._sight: list[tuple[tuple[int, ...], tuple[bool, ...]]] | None = None
        self._gone: list[int] = []
        self.oldest = 0

    # ------------------------------------------------------------------------------------ the run
    def end_prefill(
        self,
        columns: torch.Tensor,
        valid: torch.Tensor,
        visual: torch.Tensor,
        real: list[int],
        held: list[int],
        accumulate: bool,
        width: int | None = None,
    ) -> None:
        """After this layer's prefill: describe the slots it holds (host counts `real`, `held`), and start decoding.

        accumulate: keep the attention each slot receives while decoding (`receive`), for rules that read it.
        width: the prompt's columns (default: the slots'), so that decode slots get their true columns even in a
        layer that holds fewer slots (windows and the next token's position count columns).
        """
        self.record(columns, valid, visual, real=real, held=held)
        self.held_after_prefill = held
        self.next_column, self.steps = columns.shape[-1] if width is None else width, 0
        self.received = torch.zeros(valid.shape, device=valid.device) if accumulate else None

    def step(self) -> None:
        """One decode forward appended one real, non-visual slot (the token fed) to every sample: count it."""
        if self.appended == 0:
            self.appended_start = self.next_column
        self.appended += 1
        self.real = [r + 1 for r in self.real]
        if self.received is not None:
            self.received = torch.cat([self.received, self.received.new_zeros(self.received.shape[0], 1)], -1)
        self.next_column += 1
        self.steps += 1

    def receive(self, attention: torch.Tensor) -> None:
        """Add one decode step's attention [B, S] to what each slot received."""
        self.received = self.received + attention

    def slide(self) -> bool:
        """Sliding window: remove the slots the next token (and so every later one) cannot see, columns <=
        next_column - window; return whether any slot was removed or moved. Exact: windows only move forward.

        Decided on the host: each sample's recorded columns are read once (`drop_outside_window`, one sync), then
        at most one column leaves per forward and the host knows whether a sample holds it. A sample's real slots
        are its last ones (left padding, `pack_index`), so the removed ones become padding and the leading slots
        that are padding in every sample are sliced off (a view, as transformers' own sliding layer keeps).
        """
        if self.window is None:
            return False
        edge = self.next_column - self.window  # the newest column no later token sees
        if edge < self.oldest:
            return False
        if self._sight is None:
            return self.drop_outside_window()
        gone = [bisect_right(columns, edge, lo) for (columns, _), lo in zip(self._sight, self._gone)]
        leaving = max(0, min(self.appended, edge - self.appended_start + 1))  # decode slots: real in every sample
        self.oldest = edge + 1
        if not leaving and gone == self._gone:
            return False
        self.held = [h - sum(flags[lo:hi]) for h, (_, flags), lo, hi in zip(self.held, self._sight, self._gone, gone)]
        self.real = [r - (hi - lo) - leaving for r, lo, hi in zip(self.real, self._gone, gone)]
        self._gone = gone
        recorded, width = self._columns.shape[-1], max(self.real, default=0)
        lead = recorded + self.appended - width  # leading slots that are padding in every sample
        self.padded = any(r < width for r in self.real)
        if self.padded:  # else every slot kept is real (each sample's real slots are its last)
            self._valid = self._valid & (self._columns > edge)
        if lead:
            cut = min(lead, recorded)
            self._columns, self._valid, self._visual = (t[:, cut:] for t in (self._columns, self._valid, self._visual))
            self.keys, self.values = self.keys[:, :, lead:], self.values[:, :, lead:]
            if self.received is not None:
                self.received = self.received[:, lead:]
        self.appended, self.appended_start = self.appended - leaving, self.appended_start + leaving
        self._full = None
        return True

    def drop_outside_window(self) -> bool:
        """`slide` when the host does not know the columns held (after prefill or a repacking): remove what left
        the window by the columns read from the device (one sync), pack each sample's real slots last, and keep
        those columns on the host for the forwards that follow."""
        columns, valid, _ = self._materialise()
        inside = valid & (columns > self.next_column - self.window)
        moved = self.padded or not bool(inside.all())
        if moved:
            self.keep(inside)
        rows = zip(self._columns.tolist(), self._valid.tolist(), self._visual.tolist())
        self._sight = [(tuple(c for c, ok in zip(cs, oks) if ok), tuple(v for v, ok in zip(vs, oks) if ok))
                       for cs, oks, vs in rows]  # fmt: skip
        self._gone = [0] * len(self._sight)
        firsts = [cs[0] if cs else self.appended_start if self.appended else self.next_column for cs, _ in self._sight]
        self.oldest = min(firsts, default=self.next_column)
        return moved

    def evict(self, selected: torch.Tensor, budget: list[int]) -> None:
        """Keep the visual slots where `selected` [B, S] holds (min(held, budget) per sample) and every other slot."""
        held = [min(h, b) for h, b in zip(self.held, budget)]
        real = [r - h + k for r, h, k in zip(self.real, self.held, held)]
        self.keep((self.valid & ~self.visual) | selected, real=real, held=held)

    # ------------------------------------------------------------------------------------ bookkeeping
    def record(
        self,
        columns: torch.Tensor,
        valid: torch.Tensor,
        visual: torch.Tensor,
        real: list[int] | None = None,
        held: list[int] | None = None,
    ) -> None:
        """Describe the slots the last `update` appended (prefill: all of them; `visual` real ones only).

        `real` / `held`: the per-sample counts of real and visual slots when the caller knows them on the
        host; otherwise they are read from the device.
        """
        if self._columns is not None:  # appending to recorded slots: rare outside prefill, counts re-read
            old = self._materialise()
            columns, valid, visual = (torch.cat(pair, dim=-1) for pair in zip(old, (columns, valid, visual)))
            real = held = None
        self._set(columns, valid, visual, real, held)

    def _set(self, columns, valid, visual, real: list[int] | None, held: list[int] | None) -> None:
        """Make (columns, valid, visual) [B, S] the description of every slot held."""
        self._columns, self._valid, self._visual = columns, valid, visual
        self.appended, self._full = 0, None
        self._sight, self._gone, self.oldest = None, [], 0  # the columns held are the device's until read again
        self.real = real if real is not None else valid.sum(-1).tolist()
        self.held = held if held is not None else (valid & visual).sum(-1).tolist()
        self.padded = any(r < valid.shape[-1] for r in self.real)

    def _materialise(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.appended == 0:
            return self._columns, self._valid, self._visual
        if self._full is not None and self._full[0] == self.appended:
            return self._full[1]
        batch, device = self._columns.shape[0], self._columns.device
        new = torch.arange(self.appended_start, self.appended_start + self.appended, device=device).expand(batch, -1)
        ones = torch.ones(batch, self.appended, dtype=torch.bool, device=device)
        full = (
            torch.cat([self._columns, new], -1),
            torch.cat([self._valid, ones], -1),
            torch.cat([self._visual, ~ones], -1),
        )
        self._full = (self.appended, full)
        return full

    @property
    def columns(self) -> torch.Tensor:
        """LongTensor [B, S]: the prompt column (or generated index) of each slot."""
        return self._materialise()[0]

    @property
    def valid(self) -> torch.Tensor:
        """BoolTensor [B, S]: False for padding slots."""
        return self._materialise()[1]

    @property
    def visual(self) -> torch.Tensor:
        """BoolTensor [B, S]: True for visual tokens."""
        return self._materialise()[2]

    def valid_with(self, new: int) -> torch.Tensor | None:
        """[B, S + new]: which slots are real once `new` real slots are appended; None when none is padding."""
        if not self.padded:
            return None
        ones = torch.ones(self._valid.shape[0], self.appended + new, dtype=torch.bool, device=self._valid.device)
        return torch.cat([self._valid, ones], -1)

    def keep(self, keep: torch.Tensor, real: list[int] | None = None, held: list[int] | None = None) -> None:
        """Remove, for real, every slot where `keep` [B, S] is False.

        `real` / `held`: the per-sample counts of kept real and visual slots when the caller knows them on
        the host (then nothing waits for the device); otherwise they are read from the device.
        """
        columns, valid, visual = self._materialise()
        index, filled = pack_index(keep, counts=real) if real else pack_index(keep)
        flat = flat_index(self.keys, index, 2)  # keys and values share [B, heads, S]: one index for both
        shared = flat if self.values.shape[:3] == self.keys.shape[:3] else None  # compared before keys shrink
        self.keys = gather(self.keys, index, 2, flat)
        self.values = gather(self.values, index, 2, shared)
        columns, valid, visual = (t.gather(1, index) for t in (columns, valid, visual))
        if self.received is not None:
            self.received = self.received.gather(1, index)
        self._set(columns, valid if filled is None else valid & filled, visual, real, held)

    # ----------------------------------------------------------------- batch operations of generate()
    def _batch(self, fn, host) -> None:
        for name in ("_columns", "_valid", "_visual", "received"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, fn(value))
        self._full = None
        for name in ("real", "held", "held_after_prefill", "_sight", "_gone"):
            if getattr(self, name):  # empty until recorded
                setattr(self, name, host(getattr(self, name)))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        order = _host_index(beam_idx)
        self._batch(lambda t: t.index_select(0, beam_idx.to(t.device)), lambda v: [v[i] for i in order])

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._batch(lambda t: t.repeat_interleave(repeats, dim=0), lambda v: [x for x in v for _ in range(repeats)])

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        order = _host_index(indices)
        self._batch(lambda t: t[indices.to(t.device)], lambda v: [v[i] for i in order])

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a pruned KV cache cannot be cropped; run the prompt again instead")


# (tensor, host copy): the cache reorders every layer with the same index tensor, and generate makes a new
# one for each step (it never edits one in place; inference tensors have no version counter to check).
_LAST_INDEX: list = [None, None]


def _host_index(index: torch.Tensor) -> list[int]:
    """`index.tolist()`, read once per index tensor (one sync per beam step, not one per layer)."""
    if _LAST_INDEX[0] is not index:
        rows = index.nonzero().squeeze(-1) if index.dtype == torch.bool else index
        _LAST_INDEX[:] = [index, rows.tolist()]
    return _LAST_INDEX[1]
