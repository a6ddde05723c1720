"""G-Search (st3/search.py) finds the fewest tokens per layer under its assumption (needs that never grow with
depth), and its result is a schedule that runs."""

from __future__ import annotations

import pytest

import st3
from st3.search import as_schedule, g_search
from st3.testing import tiny_inputs, tiny_llava


def _needs(need: list[int]):
    """A score that passes (1) exactly when every layer holds at least what it needs, and counts its calls."""
    calls = []

    def score(counts: list[int]) -> float:
        calls.append(list(counts))
        return float(all(c >= n for c, n in zip(counts, need)))

    return score, calls


@pytest.mark.parametrize(
    ("need", "first"),
    [([36, 30, 30, 12, 5, 0], 1), ([20, 20, 9, 9, 9, 2], 0), ([36, 36, 36, 36, 36, 36], 1), ([36, 0, 0, 0, 0, 0], 1)],
)
def test_g_search_recovers_the_fewest_tokens_each_layer_needs(need, first):
    score, calls = _needs(need)
    settled = []
    schedule = g_search(score, num_layers=6, visual=36, target=1.0, first=first,
                        progress=lambda layer, count: settled.append((layer, count)))  # fmt: skip
    counts = [36] * 6
    for layer, count in schedule.counts:
        counts[layer:] = [min(c, count) for c in counts[layer:]]
    assert counts == [max(n, 36 * (layer < first)) for layer, n in enumerate(need)]
    assert [layer for layer, _ in settled] == list(range(first, 6))
    assert len(calls) <= (6 - first) * 6  # a bisection per layer: log2(37) < 6 calls each


def test_g_search_result_runs_as_a_method():
    score, _ = _needs([36, 24, 24, 10, 10, 4])
    schedule = g_search(score, num_layers=6, visual=36, target=1.0)
    assert isinstance(schedule, st3.Schedule) and schedule.counts == ((1, 24), (3, 10), (5, 4))
    model = tiny_llava()
    inputs = tiny_inputs(model)
    with schedule(model):
        model(**inputs)
    assert [len(p[0]) for p in schedule.trace.prefill_visual_positions] == [36, 24, 24, 10, 10, 4]


def test_g_search_refuses_bad_arguments():
    with pytest.raises(ValueError, match="^first: must be in"):
        g_search(lambda counts: 1.0, num_layers=4, visual=8, target=1.0, first=4)
    with pytest.raises(ValueError, match="^counts: must not grow with depth"):
        as_schedule([8, 4, 6], 8)


@pytest.mark.parametrize(("midpoint", "steepness", "floor", "start_layer"), [(0.5, 10.0, 0.0, 2), (0.3, 4.0, 0.2, 1)])
def test_psigmoid_keeps_about_n_times_the_sigmoid_share(midpoint, steepness, floor, start_layer):
    """Each layer holds ceil-rounded n * s(l), s(l) = floor + (1 - floor) * sigmoid(steepness * (midpoint - l / L)),
    within one token per pruning layer so far (each ceil can leave one more), and never more than the layer before."""
    import math

    model = tiny_llava()
    inputs = tiny_inputs(model)
    method = st3.PSigmoid(midpoint=midpoint, steepness=steepness, floor=floor, start_layer=start_layer)
    with method(model):
        model(**inputs)
    held = [len(p[0]) for p in method.trace.prefill_visual_positions]
    n, layers = 36, len(held)
    for layer, count in enumerate(held):
        if layer < start_layer:
            assert count == 36
            continue
        share = floor + (1 - floor) / (1 + math.exp(-steepness * (midpoint - layer / layers)))
        assert n * share - 1e-9 <= count <= math.ceil(n * share) + (layer - start_layer)
    assert held == sorted(held, reverse=True) and held[-1] < 36


def test_psigmoid_midpoint_is_matched_to_a_budget():
    """`midpoint` is the budget knob: a lower budget moves the fall earlier, and the planner's mean is the target."""
    from st3.accounting import Shape

    shape = Shape(num_layers=32, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2, head_dim=16)
    half = st3.match("psigmoid", budget=0.5, shape=shape, visual=576, text=60)
    third = st3.match("psigmoid", budget=0.33, shape=shape, visual=576, text=60)
    assert 0.0 < third.midpoint < half.midpoint < 1.0
    with pytest.raises(ValueError, match="cannot reach"):
        st3.match("psigmoid", budget=0.05, shape=shape, visual=576, text=60)
