"""Each method follows its own rule; the registry finds them all; the budget matcher hits its targets."""

from __future__ import annotations

import math

import pytest
import torch

import st3
from st3.compat import cache_of
from st3.plan import LLAVA_15_7B, plan


def prefill(method, model, inputs):
    with torch.no_grad(), method(model):
        model.generate(**inputs, max_new_tokens=4, do_sample=False)
    return method.trace


def test_the_registry_lists_every_method():
    assert set(st3.methods()) >= {"fastv", "pyramiddrop", "random", "st3", "lattice", "visionzip", "vtw"}
    assert set(st3.methods()) >= {"divprune", "dart", "cdpruner", "keep", "st3+dart", "fastv+vta", "pyramiddrop+vta"}
    for name in st3.methods():
        method = st3.get(name)
        assert method.name == name and method.__doc__


def test_fastv_keeps_ceil_half_from_layer_k_on(model, inputs):
    trace = prefill(st3.FastV(layer=2, ratio=0.5), model, inputs)
    n = 36
    assert trace.visual_per_layer == [n, n] + [math.ceil(0.5 * n)] * 4
    assert all(counts == [18] * 3 for step in trace.decode_visual_counts for counts in step[2:])


def test_pyramiddrop_halves_at_each_stage_boundary(model, inputs):
    method = st3.PyramidDrop(keep=0.5)
    assert method.boundaries(6) == (2, 3, 4)  # 8/16/24 of 32 scaled to 6 layers
    assert method.boundaries(32) == (8, 16, 24)
    trace = prefill(method, model, inputs)
    assert trace.visual_per_layer == [36, 36, 18, 9, 4, 4]  # int(36 * 0.5^s) of the original 36 (official)
    paper = prefill(st3.PyramidDrop(keep=0.5, variant="paper"), model, inputs)
    assert paper.visual_per_layer == [36, 36, 18, 9, 5, 5]  # ceil(0.5 * n) of the n still held


def test_vtw_holds_no_visual_key_from_layer_k_on(model, inputs):
    method = st3.VTW(layer=3)
    with torch.no_grad(), method(model):
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    assert method.trace.visual_per_layer == [36, 36, 36, 0, 0, 0]
    assert all(step[layer] == [0, 0, 0] for step in method.trace.decode_visual_counts for layer in (3, 4, 5))
    for layer in cache_of(out).layers[3:]:
        assert not (layer.visual & layer.valid).any()
    assert st3.VTW().withdrawal_layer(32) == 16


def test_lattice_keeps_evenly_spaced_patches_and_random_is_seeded(model, inputs):
    image_start = [row.tolist().index(3) for row in inputs["input_ids"]]
    trace = prefill(st3.Lattice(keep=6, layer=1), model, inputs)
    for b, start in enumerate(image_start):
        assert (trace.prefill_visual_positions[1][b] - start).tolist() == [7, 9, 11, 25, 27, 29]  # a 2 x 3 lattice
    first = prefill(st3.Random(keep=6, layer=1, seed=1), model, inputs)
    again = prefill(st3.Random(keep=6, layer=1, seed=1), model, inputs)
    other = prefill(st3.Random(keep=6, layer=1, seed=2), model, inputs)
    patches = [(first.prefill_visual_positions[1][b] - s).tolist() for b, s in enumerate(image_start)]
    assert patches[0] == patches[1] == patches[2] and len(patches[0]) == 6
    assert all(torch.equal(a, b) for a, b in zip(first.prefill_visual_positions[1], again.prefill_visual_positions[1]))
    assert first.prefill_visual_positions[1][0].tolist() != other.prefill_visual_positions[1][0].tolist()


@pytest.mark.parametrize(
    ("knob", "value", "name"),
    [
        ("ratio", 1.5, "fastv"),
        ("keep", -0.1, "pyramiddrop"),
        ("layer", -1, "vtw"),
        ("keep", -1, "random"),
        ("query", "text", "fastv"),
        ("stages", (), "pyramiddrop"),
    ],
)
def test_peer_knobs_are_validated(knob, value, name):
    with pytest.raises(ValueError, match=knob):
        st3.get(name, **{knob: value})


@pytest.mark.parametrize("name", ["st3", "fastv", "pyramiddrop", "random", "lattice", "visionzip"])
@pytest.mark.parametrize("target", [288, 192, 160])
def test_matched_budgets_hit_the_target_within_one_token_per_layer(name, target):
    method = st3.match(name, tokens=target, shape=LLAVA_15_7B, visual=576)
    assert abs(plan(method, LLAVA_15_7B, new_tokens=1).mean_visual_per_layer - target) <= 1


def test_matched_budget_on_a_real_run(model, inputs):
    shape = st3.adapters.adapter_for(model).shape
    method = st3.match("fastv", 20, shape=shape, visual=36, text=10)
    trace = prefill(method, model, inputs)
    assert abs(sum(trace.visual_per_layer) / len(trace.visual_per_layer) - 20) <= 1


def test_matching_a_flops_ratio_and_unreachable_targets():
    method = st3.match("pyramiddrop", 0.5, metric="prefill_flops_ratio")
    assert abs(plan(method, LLAVA_15_7B, new_tokens=1).prefill_flops_ratio - 0.5) <= 0.01
    with pytest.raises(ValueError, match="closest is 72"):
        st3.match("vtw", 64)
    assert st3.match("vtw", 64, tolerance=10).layer == 4
    with pytest.raises(ValueError, match="metric"):
        st3.match("st3", 100, metric="speed")
