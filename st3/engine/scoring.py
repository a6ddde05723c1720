"""Attention received by each key, recomputed from a few re-projected query rows.

Attention backends such as sdpa and FlashAttention never return their weights, and an L x L matrix is
what pruning wants to avoid. The engine therefore re-projects only the query rows it needs (usually one
per sample) and multiplies them with the keys the layer has cached: the same softmax the layer computed,
for those rows, at a cost of R x S per head.
"""

from __future__ import annotations

import torch


def attention_received(
    queries: torch.Tensor,
    keys: torch.Tensor,
    scaling: float,
    visible: torch.Tensor,
    row_weight: torch.Tensor,
) -> torch.Tensor:
    """Mean attention probability each key receives from the query rows.

    queries: [B, heads, R, D] rotated query rows; keys: [B, kv_heads, S, D] rotated cached keys;
    visible: BoolTensor [B, R, S], which keys each row may see (causality and padding);
    row_weight: [B, R], the weight of each row in the mean (0 for filler rows).
    Returns FloatTensor [B, S]: softmax over the visible keys, averaged over heads and weighted rows.
    """
    batch, heads, rows, dim = queries.shape
    kv_heads = keys.shape[1]
    groups = heads // kv_heads
    # Head h reads kv head h // groups (as repeat_kv lays them out): group the query heads instead of
    # materialising repeated keys.
    q = queries.reshape(batch, kv_heads, groups * rows, dim)
    logits = torch.matmul(q, keys.transpose(-1, -2)).float() * scaling
    logits = logits.view(batch, kv_heads, groups, rows, -1)
    logits = logits.masked_fill(~visible[:, None, None], float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # a row that sees nothing contributes nothing
    weights = row_weight.float() / row_weight.float().sum(-1, keepdim=True).clamp(min=1e-9)
    return torch.einsum("bkgrs,br->bs", probs, weights) / (kv_heads * groups)


def attention_of_one_row(
    query: torch.Tensor, keys: torch.Tensor, scaling: float, visible: torch.Tensor | None
) -> torch.Tensor:
    """`attention_received` for a single query row (a decode step), in a few operations.

    query: [B, heads, 1, D]; keys: [B, kv_heads, S, D]; visible: BoolTensor [B, S], or None when every
    key is visible. The row always sees at least its own key, so no row is empty.
    """
    batch, heads, _, dim = query.shape
    kv_heads = keys.shape[1]
    q = query.reshape(batch, kv_heads, heads // kv_heads, dim)
    logits = torch.matmul(q, keys.mT)  # [B, kv_heads, groups, S]; .mT is a view, no operation
    logits = (logits if logits.dtype == torch.float32 else logits.float()) * scaling
    if visible is not None:
        logits = logits.masked_fill(~visible[:, None, None], float("-inf"))
    return torch.softmax(logits, dim=-1).mean((1, 2))
