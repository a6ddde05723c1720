"""Unit checks of the engine's building blocks and the cost formulas."""

from __future__ import annotations

import torch

from st3.accounting import Shape, decode_flops, prefill_flops
from st3.engine.cache import PrunableLayer, cache_bytes, gather, pack_index
from st3.selectors import top_k_mask
from st3.trace import Trace


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


def test_a_sliding_layer_holds_exactly_what_later_tokens_can_see():
    """Checked after prefill and every decode forward against the window's rule over original columns (k > next -
    window), with padding, pruned gaps, visual slots, a beam reordering and an eviction in between."""
    window = 8
    layer = PrunableLayer(window)
    columns = torch.tensor([[0, 1, 3, 4, 6, 7, 9], [0, 2, 3, 5, 6, 8, 9]])  # pruned columns are missing
    valid = torch.tensor([[False, False, True, True, True, True, True], [True] * 7])  # sample 0: 2 padding slots
    visual = torch.tensor([[0, 0, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    held = {b: {int(c): bool(v) for c, v, ok in zip(columns[b], visual[b], valid[b]) if ok} for b in range(2)}
    keys = columns[:, None, :, None].float()  # each key remembers its column
    layer.update(keys, keys.clone())
    layer.end_prefill(columns, valid, visual, [5, 7], [3, 4], False, width=10)
    layer.slide()
    for step in range(12):
        edge = layer.next_column - window
        held = {b: {c: v for c, v in h.items() if c > edge} for b, h in held.items()}
        for b in range(2):
            real = layer.valid[b]
            assert layer.columns[b][real].tolist() == sorted(held[b])
            assert layer.keys[b, 0, :, 0][real].tolist() == sorted(held[b])  # keys moved with their columns
            assert layer.visual[b][real].tolist() == [held[b][c] for c in sorted(held[b])]
        assert layer.real == [len(h) for h in held.values()] and layer.held == [sum(h.values()) for h in held.values()]
        assert layer.keys.shape[-2] == max(layer.real) <= window - 1  # nothing held that no later token sees
        assert layer.padded == (min(layer.real) < max(layer.real))
        if step == 1:  # beams swap: the host bookkeeping follows
            layer.reorder_cache(torch.tensor([1, 0]))
            held = {0: held[1], 1: held[0]}
        if step == 2:  # an eviction repacks: the host reads the columns again at the next slide
            assert layer.held == [3, 1]
            layer.evict(layer.valid & layer.visual & (layer.columns == 8), [1, 0])
            held = {b: {c: v for c, v in h.items() if not v or c == 8} for b, h in held.items()}
        new = torch.full((2, 1, 1, 1), float(layer.next_column))
        held = {b: h | {layer.next_column: False} for b, h in held.items()}
        layer.update(new, new.clone())
        layer.step()
        layer.slide()


def test_a_cache_whose_data_st3_cannot_read_is_not_measured():
    from transformers.cache_utils import DynamicCache, DynamicLayer, QuantizedLayer

    cache = DynamicCache()
    cache.layers[:] = [DynamicLayer(), PrunableLayer()]
    for layer in cache.layers:
        layer.update(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4))
    assert cache_bytes(cache) == 2 * 2 * 24 * 4  # two layers, keys and values, fp32
    class Quantized(QuantizedLayer):  # holds its data outside `keys` and `values`
        _quantize = _dequantize = None

    cache.layers.append(Quantized.__new__(Quantized))
    assert cache_bytes(cache) is None
    shape = Shape(num_layers=3, hidden_size=8, intermediate_size=16, num_heads=2, num_kv_heads=2, head_dim=4)
    trace = Trace(method="m", shape=shape, batch_size=1, prompt_columns=3, prompt_tokens=[3], visual_tokens=[0],
                  dtype_bytes=4)  # fmt: skip
    for _ in range(3):
        trace.log_prefill_layer(torch.arange(3)[None], torch.ones(1, 3, dtype=torch.bool), torch.zeros(1, 3).bool())
    trace.log_kv(cache_bytes(cache))
    assert trace.kv_bytes is None and trace.kv_bytes_peak is None and trace.summary()["kv_ratio"] is None
