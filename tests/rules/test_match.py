"""`st3.match` on the user's model and inputs, with an explicit target: a count of tokens, a share, or FLOPs.

What a matched method keeps on a real run equals what was asked (within the budget knob's step), on the
model and inputs it was matched on, whatever family; without them, the shape it assumed is said.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from cases import TINY

import st3
from st3.budget import AssumedShape
from st3.testing import tiny_qwen_inputs, tiny_qwen_vl

QWEN = ((3, 5, "image", (1, 8, 8)), (2, 7, "image", (1, 8, 12)), (4, 2, "image", (1, 12, 16)))  # 16, 24, 48 tokens


def kept_per_layer(model, inputs, method) -> float:
    with method(model), torch.no_grad():
        model(**inputs)
    return sum(method.trace.visual_per_layer) / len(method.trace.visual_per_layer)


@pytest.mark.parametrize("name", ["fastv", "st3", "spread", "pyramiddrop"])
def test_a_budget_matched_on_the_users_model_and_inputs_holds_on_them(name, model, inputs):
    with warnings.catch_warnings():
        warnings.simplefilter("error", AssumedShape)  # nothing is assumed: model and inputs say it all
        method = st3.match(name, budget=0.5, model=model, inputs=inputs)
    assert abs(kept_per_layer(model, inputs, method) - 18) <= 1.0  # half of the 36 visual tokens per layer


def test_a_qwen_batch_is_matched_on_its_own_token_counts():
    model = tiny_qwen_vl("qwen2.5-vl")
    inputs = tiny_qwen_inputs(model, QWEN)
    method = st3.match("fastv", tokens=20, model=model, inputs=inputs)
    assert abs(kept_per_layer(model, inputs, method) - 20) <= 1.0
    with pytest.raises(ValueError, match="^inputs: Qwen2_5_VLForConditionalGeneration's visual tokens depend on"):
        st3.match("fastv", tokens=20, model=model)


def test_matching_without_a_model_says_what_it_assumed(model, inputs):
    with pytest.warns(AssumedShape, match="LLaVA-1.5-7B's decoder \\(32 layers\\), 576 visual tokens per sample: pass "
                                          "model= and inputs="):  # fmt: skip
        fastv = st3.match("fastv", 192)
    assert fastv.ratio == pytest.approx(0.711, abs=1e-3)  # the README's figure, at LLaVA-1.5-7B's shape
    assert kept_per_layer(model, inputs, fastv) != pytest.approx(kept_per_layer(
        model, inputs, st3.match("fastv", tokens=192 * 36 / 576, model=model, inputs=inputs)), abs=1.0)  # fmt: skip


def test_a_share_is_never_read_as_a_token_count():
    with pytest.raises(ValueError, match=r"^target: 0.5 visual tokens per layer is at most one token; for a share of "
                                         r"the visual tokens pass budget=0.5"):  # fmt: skip
        st3.match("vtw", 0.5)
    vtw = st3.match("vtw", budget=0.5, shape=TINY, visual=36, text=10, tolerance=3.0)
    assert vtw.layer == 3  # half the depth: half the tokens per layer, not all dropped at layer 0
    with pytest.raises(ValueError, match="^budget: a share of the visual tokens, in \\(0, 1\\]; got 192"):
        st3.match("fastv", budget=192, shape=TINY, visual=36)
    with pytest.raises(ValueError, match="^target: give exactly one of"):
        st3.match("fastv", tokens=10, budget=0.5, shape=TINY, visual=36)


def test_the_older_spellings_still_work():
    shape = dict(shape=TINY, visual=36, text=10)
    assert st3.match("fastv", 18, **shape) == st3.match("fastv", tokens=18, **shape)
    old = st3.match("pyramiddrop", 0.5, metric="prefill_flops_ratio", **shape)
    assert old == st3.match("pyramiddrop", prefill_flops=0.5, **shape)
    with pytest.raises(ValueError, match="^metric: the target names its metric"):
        st3.match("fastv", tokens=18, metric="visual_per_layer", **shape)


def test_model_and_shape_are_not_both_given(model, inputs):
    with pytest.raises(ValueError, match="^shape: the model gives it"):
        st3.match("fastv", tokens=10, model=model, inputs=inputs, shape=TINY)
    with pytest.raises(ValueError, match="^inputs: pass model= too"):
        st3.match("fastv", tokens=10, inputs=inputs)


def test_a_budget_out_of_reach_in_st3_eval_points_at_the_spec():
    """st3 eval and the lmms-eval plugin match through `at_budget`: their note names what a user can change there
    (the method spec's knobs), not `tolerance=`, which neither takes."""
    from st3.budget import at_budget
    from st3.plan import LLAVA_15_7B

    with pytest.raises(ValueError) as error:
        at_budget("pyramiddrop", {}, 0.11, LLAVA_15_7B, 576, 60)
    assert "tolerance" not in str(error.value)
    assert str(error.value).endswith("change its other knobs in the method spec (pyramiddrop:knob=value,...)")


def test_at_budget_matches_a_batch_on_its_mean_visual_tokens():
    """`at_budget` with one count per sample (the lmms-eval plugin's batches) keeps the share of their mean."""
    from st3.budget import at_budget, batch_cost
    from st3.plan import LLAVA_15_7B

    visual = [100, 300]
    method = at_budget("fastv", {}, 0.5, LLAVA_15_7B, visual, [60, 60])
    assert batch_cost(method, "visual_per_layer", LLAVA_15_7B, visual, 60, 1) == pytest.approx(100, abs=1.0)
    alone = at_budget("fastv", {}, 0.5, LLAVA_15_7B, 100, 60)
    assert batch_cost(alone, "visual_per_layer", LLAVA_15_7B, [100], 60, 1) == pytest.approx(50, abs=1.0)


def test_a_knob_valid_nowhere_on_the_model_is_refused_at_once():
    """A method whose other knobs do not fit the model (FastV's layer beyond its depth) has no valid budget
    setting: `st3.match` says why, instead of stepping through a million candidate ratios."""
    with pytest.raises(ValueError, match="no value of ratio is valid on this model: layer: 40 is beyond"):
        shape = st3.accounting.Shape(6, 64, 128, 4, 2, 16)
        st3.match("fastv", 0.5, metric="prefill_flops_ratio", layer=40, shape=shape, visual=16, text=8)
