"""Unit checks of the engine's building blocks and the cost formulas."""

from __future__ import annotations

import torch

from st3.accounting import Shape, decode_flops, prefill_flops
from st3.engine.cache import PrunableLayer, gather, pack_index
from st3.selectors import top_k_mask


def test_pack_index_keeps_order_and_left_pads():
    keep = torch.tensor([[True, False, True, True], [False, True, False, False]])
    index, valid = pack_index(keep)
    assert valid.tolist() == [[True, True, True], [False, False, True]]
    assert index[0].tolist() == [0, 2, 3] and index[1, -1].item() == 1
    values = torch.arange(8).view(2, 4) * 10
    assert gather(values, index, 1)[valid].tolist() == [0, 20, 30, 50]


def test_top_k_mask_takes_the_highest_scores_among_candidates():
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.7], [0.2, 0.8, 0.3, 0.1]])
    candidates = torch.tensor([[False, True, True, True], [True, True, True, True]])
    mask = top_k_mask(scores, candidates, torch.tensor([2, 1]))
    assert mask.tolist() == [[False, False, True, True], [False, True, False, False]]


def _layer(batch=3, slots=4):
    layer = PrunableLayer()
    keys = torch.arange(batch * slots, dtype=torch.float).view(batch, 1, slots, 1)
    layer.update(keys, keys.clone())
    columns = torch.arange(batch * slots).view(batch, slots)
    visual = columns % 2 == 0
    layer.end_prefill(columns, torch.ones(batch, slots, dtype=torch.bool), visual, [slots] * batch,
                      visual.sum(-1).tolist(), accumulate=True)  # fmt: skip
    return layer


def test_cache_bookkeeping_follows_batch_operations():
    for operation, argument in [
        ("reorder_cache", torch.tensor([2, 0, 0])),
        ("batch_select_indices", torch.tensor([1, 2])),
        ("batch_repeat_interleave", 2),
    ]:
        layer = _layer()
        getattr(layer, operation)(argument)
        # every slot still describes its own key: the key value equals its column by construction
        assert torch.equal(layer.keys[:, 0, :, 0].long(), layer.columns), operation
        assert layer.received.shape[0] == layer.keys.shape[0] == len(layer.held_after_prefill)


def test_keep_drops_entries_for_real():
    layer = _layer(batch=2)
    keep = torch.tensor([[True, False, True, False], [True, True, True, False]])
    layer.keep(keep)
    assert layer.keys.shape[2] == 3
    assert layer.valid.tolist() == [[False, True, True], [True, True, True]]
    assert torch.equal(layer.keys[:, 0, :, 0].long()[layer.valid], torch.tensor([0, 2, 4, 5, 6]))


def test_flops_match_a_hand_count_for_two_layers():
    shape = Shape(num_layers=2, hidden_size=8, intermediate_size=16, num_heads=2, num_kv_heads=1, head_dim=4)
    # q: 8x8, k and v: 8x4 each, o: 8x8, mlp: 3 x 8x16 -> 64 + 32 + 32 + 64 + 384 = 576 weights per layer
    assert shape.linear_params_per_layer == 576
    # prefill of 5 then 3 tokens: linear 2*5*576 + 2*3*576; attention 4*(2*4)*pairs, pairs 15 and 6
    assert prefill_flops(shape, [5, 3]) == 2 * 8 * 576 + 4 * 8 * (15 + 6)
    assert decode_flops(shape, [7, 4]) == 2 * 2 * 576 + 4 * 8 * (7 + 4)
    assert shape.kv_bytes_per_token(2) == 2 * 1 * 4 * 2
