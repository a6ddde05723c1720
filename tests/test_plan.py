"""The model-free plan agrees with what a real run does, so the README's arithmetic is what users get."""

from __future__ import annotations

import pytest
import torch
from conftest import single

import st3
from st3.adapters import adapter_for
from st3.plan import LLAVA_15_7B, plan


@pytest.mark.parametrize(
    "knobs", [{}, {"start_layer": 1, "stride": 2, "ratio": 0.5, "anneal_steps": 4, "anneal_every": 1}]
)
def test_plan_matches_a_real_run(knobs, model, inputs):
    sample = single(inputs, 0)
    method = st3.ST3(**knobs, min_keep=2)
    with torch.no_grad(), method(model):
        model.generate(**sample, max_new_tokens=10, do_sample=False)
    trace = method.trace
    visual = trace.visual_tokens[0]
    expected = plan(
        method, adapter_for(model).shape, visual=visual, text=trace.prompt_tokens[0] - visual, new_tokens=10
    )
    assert trace.visual_per_layer == expected.prefill_visual
    assert [[layer[0] for layer in step] for step in trace.decode_visual_counts] == expected.decode_visual
    summary = trace.summary()
    assert summary["prefill_flops_ratio"] == pytest.approx(expected.prefill_flops_ratio)
    assert summary["total_flops_ratio"] == pytest.approx(expected.total_flops_ratio)
    assert summary["kv_ratio"] == pytest.approx(expected.kv_ratio)


def test_defaults_meet_the_targets_at_llava_15_7b_shape():
    result = plan(st3.ST3(), LLAVA_15_7B, visual=576, text=60, new_tokens=64)
    assert result.prefill_flops_ratio <= 0.5
    assert result.kv_ratio <= 0.3
