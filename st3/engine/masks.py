"""Attention masks: evaluated from each layer's `MaskRule` over original columns, and shared between layers."""

from __future__ import annotations

import torch

from st3 import compat
from st3.engine.cache import PrunableLayer


def allowed(
    rule,
    query_columns: torch.Tensor,
    key_columns: torch.Tensor,
    key_valid: torch.Tensor | None,
    query_blocks: torch.Tensor | None = None,
    key_blocks: torch.Tensor | None = None,
) -> torch.Tensor:
    """BoolTensor [B, Q, K]: which keys each query row may see under `rule` (an adapter's `MaskRule`).

    Composed as transformers composes the model's own mask, but on ORIGINAL columns (query_columns [B, Q],
    key_columns [B, K]) rather than slot indices: (causal OR same image block) AND inside the window AND real.
    Blocks come with rows (-1: none); a pruned visual token is no key, so a block's survivors see each other only.
    """
    q, k = query_columns[:, :, None], key_columns[:, None, :]
    see = k <= q
    if rule.blocks and query_blocks is not None and key_blocks is not None:
        group = query_blocks[:, :, None]
        see = see | ((group == key_blocks[:, None, :]) & (group >= 0))
    if rule.window is not None:
        see = see & (k > q - rule.window)
    return see if key_valid is None else see & key_valid[:, None, :]


def rule_mask(adapter, rule, hidden: torch.Tensor, *args) -> torch.Tensor:
    """The backend's mask for `allowed(rule, *args)`."""
    return compat.mask_from_allowed(adapter.text_config, hidden, allowed(rule, *args))


class DecodeMasks:
    """Each layer's mask is built from its own cache (layers hold different slots after pruning); a layer laid
    out like an earlier one (the same padding tensor and count of appended slots, or no padding and the same
    length) reuses that mask. An unpadded one-row mask that transformers skips (None under sdpa) is skipped at
    every key length. Nothing here waits for the device.

    A layer whose rule is not plain causal (a window) gets its mask evaluated from its slots' columns; the new row
    is text (st3 decodes one token per forward), so image blocks play no part at decode."""

    def __init__(self, adapter, cache, rules: list) -> None:
        self.adapter, self.cache, self.rules = adapter, cache, rules  # rules: each layer's MaskRule
        self._masks: dict = {}
        self._skipped = False

    def __call__(self, index: int, hidden, layer: PrunableLayer):
        """Layer `index`'s mask for the one new row `hidden`."""
        rule = self.rules[index]
        if not rule.causal:
            return self._ruled(rule, hidden, layer)
        if not layer.padded and self._skipped:
            return None
        owner = layer._valid if layer.padded else None  # what the mask depends on besides the length
        key = (id(owner), layer.appended) if layer.padded else (None, layer.get_seq_length())
        hit = self._masks.get(key)
        if hit is None or hit[0] is not owner:
            hit = self._masks[key] = (owner, self.adapter.layer_mask(index, hidden, layer.valid_with(1), self.cache))
            self._skipped = self._skipped or (owner is None and hit[1] is None)
        return hit[1]

    def _ruled(self, rule, hidden, layer: PrunableLayer):
        # A sliding layer holds only what the new row may see (`PrunableLayer.slide`), so its mask depends on the
        # padding and the length alone, as a causal layer's: layers laid out alike share it.
        owner = layer._valid if layer.padded else None
        key = (rule, id(owner), layer.appended) if layer.padded else (rule, None, layer.get_seq_length())
        hit = self._masks.get(key)
        if hit is None or hit[0] is not owner:
            batch, device = hidden.shape[0], layer.keys.device
            column = torch.full((batch, 1), layer.next_column, device=device)
            new = torch.ones(batch, 1, dtype=torch.bool, device=device)
            valid = torch.cat([layer.valid, new], -1) if layer.padded else None
            hit = self._masks[key] = (owner, rule_mask(self.adapter, rule, hidden, column,
                                                       torch.cat([layer.columns, column], -1), valid))  # fmt: skip
        return hit[1]
