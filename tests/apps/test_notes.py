"""What a trace says about itself: why a method pruned nothing (or nothing for some samples), and which rule chose.

A method asked to keep more visual tokens than an image has, or set to remove none, runs unpruned for those
samples: `trace.note` says so and names the knob, instead of a silent no-op (the README promises it).
"""

from __future__ import annotations

import pytest
import torch

import st3
from st3.testing import tiny_qwen_inputs, tiny_qwen_vl

#: Qwen2.5-VL images of 16, 24 and 48 visual tokens after the 2x2 merge.
QWEN = ((3, 5, "image", (1, 8, 8)), (2, 7, "image", (1, 8, 12)), (4, 2, "image", (1, 12, 16)))


@pytest.fixture(scope="module")
def qwen():
    model = tiny_qwen_vl("qwen2.5-vl")
    return model, tiny_qwen_inputs(model, QWEN)


def run(model, inputs, method, new_tokens: int = 2):
    with method(model), torch.no_grad():
        model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
    return method.trace


@pytest.mark.parametrize(
    ("method", "note"),
    [
        (st3.get("spread", keep=1000), "nothing pruned: keep=1000 on 36 visual tokens removes none"),
        (st3.FastV(ratio=0.0), "nothing pruned: ratio=0.0 on 36 visual tokens removes none"),
        (st3.VTW(layer=6), "nothing pruned: layer=6 on 36 visual tokens removes none (the model has 6 layers)"),
        (
            st3.ST3(ratio=0.0, anneal_final=1.0),
            "nothing pruned: ratio=0.0 on 36 visual tokens removes none, and anneal_final=1.0 evicts none while "
            "decoding",
        ),
        (
            st3.ST3(ratio=0.0),
            "nothing pruned during prefill: ratio=0.0 on 36 visual tokens removes none; only the decode schedule "
            "(VTA) evicts, while generating",
        ),
        (st3.ST3(ratio=0.5, min_keep=40), "ratio=0.5 on 36 visual tokens removes none (min_keep=40)"),
    ],
    ids=["keep-above", "ratio-0", "vtw-past-the-end", "st3-noop", "st3-prefill-noop", "min-keep"],
)
def test_a_method_that_prunes_nothing_says_why(method, note, model, inputs):
    trace = run(model, inputs, method)
    assert note in trace.note and trace.summary()["note"] == trace.note


def test_samples_smaller_than_the_budget_are_named(qwen):
    """keep=24 on images of 16, 24 and 48 tokens: the first two keep every token, the third is pruned."""
    trace = run(*qwen, st3.get("spread", keep=24))
    assert trace.visual_tokens == [16, 24, 48] and trace.pruned
    assert trace.note == "samples 0, 1 kept every visual token during prefill: keep=24 on 16 and 24 visual tokens " \
        "removes none"  # fmt: skip


def test_the_default_keep_on_a_small_qwen_image_is_a_noted_noop(qwen):
    model, _ = qwen
    trace = run(model, tiny_qwen_inputs(model, QWEN[:1]), st3.get("spread"))
    assert not trace.pruned and trace.note == "nothing pruned: keep=192 on 16 visual tokens removes none"


def test_a_method_that_prunes_leaves_no_note(model, inputs):
    assert run(model, inputs, st3.get("spread", keep=10)).note == ""


@pytest.mark.parametrize(
    ("method", "name"),
    [
        (st3.ST3(selector=st3.selectors.DivPrune()), "st3+divprune"),
        (st3.get("st3+divprune"), "st3+divprune"),
        (st3.FastV(decode=st3.VTA(steps=2, every=1)), "fastv+vta"),
        (st3.PyramidDrop(selector=st3.selectors.DART(pivots=2), decode="vta"), "pyramiddrop+dart+vta"),
        (st3.get("spread", keep=10, selector=st3.selectors.Spread(spatial=1.0)), "spread"),
        (st3.Keep(keep=10, layer=1, selector=st3.selectors.Stratified()), "keep+stratified"),
    ],
)
def test_a_composed_methods_trace_names_its_selector(method, name, model, inputs):
    assert method.label == name
    assert run(model, inputs, method).method == name
