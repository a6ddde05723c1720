"""The model-free plan at real shapes (that it equals a real run, for every case, is in test_properties)."""

from __future__ import annotations

import pytest

import st3
from st3.plan import LLAVA_15_7B, plan


def test_defaults_meet_the_targets_at_llava_15_7b_shape():
    result = plan(st3.ST3(), LLAVA_15_7B, visual=576, text=60, new_tokens=64)
    assert result.prefill_flops_ratio <= 0.5
    assert result.kv_ratio <= 0.3


def test_match_takes_per_sample_visual_counts():
    from st3.budget import batch_cost

    counts = [256, 576, 1024]  # e.g. Qwen-VL images of three sizes
    method = st3.match("fastv", 200, visual=counts)
    achieved = batch_cost(method, "visual_per_layer", LLAVA_15_7B, counts, 60, 1)
    assert abs(achieved - 200) <= 1
    assert achieved == sum(plan(method, LLAVA_15_7B, visual=n, new_tokens=1).mean_visual_per_layer for n in counts) / 3
    one = plan(method, LLAVA_15_7B, visual=576, new_tokens=1)
    single_ratio = batch_cost(method, "prefill_flops_ratio", LLAVA_15_7B, [576], 60, 1)
    assert single_ratio == pytest.approx(one.prefill_flops_ratio)
    flops = st3.match("fastv", 0.6, metric="prefill_flops_ratio", visual=counts)
    assert abs(batch_cost(flops, "prefill_flops_ratio", LLAVA_15_7B, counts, 60, 1) - 0.6) <= 0.01
    with pytest.raises(ValueError, match="visual: needs"):
        st3.match("fastv", 10, visual=[])
