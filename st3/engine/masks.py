"""Attention masks of one decode forward, shared by the layers that hold the same slots."""

from __future__ import annotations

from st3.engine.cache import PrunableLayer


class DecodeMasks:
    """Each layer's mask is built from its own cache (layers hold different slots after pruning); a layer laid
    out like an earlier one (the same padding tensor and count of appended slots, or no padding and the same
    length) reuses that mask. An unpadded one-row mask that transformers skips (None under sdpa) is skipped at
    every key length. Nothing here waits for the device."""

    def __init__(self, adapter, cache) -> None:
        self.adapter, self.cache = adapter, cache
        self._masks: dict = {}
        self._skipped = False

    def __call__(self, index: int, hidden, layer: PrunableLayer):
        """Layer `index`'s mask for the one new row `hidden`."""
        if not layer.padded and self._skipped:
            return None
        owner = layer._valid if layer.padded else None  # what the mask depends on besides the length
        key = (id(owner), layer.appended) if layer.padded else (None, layer.get_seq_length())
        hit = self._masks.get(key)
        if hit is None or hit[0] is not owner:
            hit = self._masks[key] = (owner, self.adapter.layer_mask(index, hidden, layer.valid_with(1), self.cache))
            self._skipped = self._skipped or (owner is None and hit[1] is None)
        return hit[1]
