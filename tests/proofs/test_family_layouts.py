"""The image layouts of the families with tiles, newline tokens and text between image rows, checked against the
models' own feature counts, and what each family refuses.

`test_families.py` proves the pruned runs exact on every family; here: the layout an adapter reads (the grids that
the spatial selectors spread over) is the one the model builds, whether it comes from the processor's inputs (a
plain forward) or from the images generate encoded before the prefill (which drops `image_sizes`).
"""

from __future__ import annotations

import pytest
import torch
from cases import generate

import st3
from st3.adapters import Grid, adapter_for
from st3.selectors.layout import grid_layout, lattice_cells, strata
from st3.testing import (
    tiny_idefics3,
    tiny_idefics3_inputs,
    tiny_internvl,
    tiny_internvl_inputs,
    tiny_llava_next,
    tiny_llava_onevision,
    tiny_mistral3,
    tiny_mistral3_inputs,
    tiny_next_inputs,
    tiny_onevision_inputs,
)


def visual_of(model, inputs: dict) -> torch.Tensor:
    return adapter_for(model).visual_mask(inputs["input_ids"])


def generate_layout(model, inputs: dict) -> list:
    """The layout the engine read during a generate (pre-encoded images): a lattice run's trace."""
    method = st3.Lattice(keep=6, layer=1)
    generate(model, inputs, method, max_new_tokens=1)
    return method.trace.image_grids


# ------------------------------------------------------------------------------------- layout arithmetic
def test_newline_tokens_take_budget_only_beyond_every_patch():
    grids = [Grid(1, 2, 2), Grid(1, 3, 4, newline=True)]  # 4 + 3 x (4 + 1) = 19 tokens; newlines at 8, 13, 18
    assert grids[1].tokens == 15 and grids[1].width == 5
    newlines = {4 + 4, 4 + 9, 4 + 14}
    for keep in range(1, 17):
        cells = lattice_cells(grids, keep)
        assert len(cells) == keep == len(set(cells))
        assert not newlines & set(cells)  # 16 patches: no newline kept
    assert newlines <= set(lattice_cells(grids, 19))
    labels = strata(grids, 19, 6)
    assert sorted(set(labels) - {-1}) == list(range(6)) and all(labels[i] == -1 for i in newlines)
    groups, coords, budgets = grid_layout(grids, 19, 6)
    assert groups == [0] * 4 + [1] * 15 and sum(budgets) == 6
    assert coords[8] == pytest.approx((0.0, 4 / 5))  # the first row's newline: just after its last patch


# --------------------------------------------------------------------------------------------- LLaVA-NeXT
def test_llava_next_layout_is_base_grid_then_unpadded_tiles_with_newlines():
    model = tiny_llava_next(layers=2)
    inputs = tiny_next_inputs(model, ((4, 6, (12, 24)), (2, 9, (16, 24)), (5, 3, (24, 24))))
    visual = visual_of(model, inputs)
    expected = [[Grid(1, 3, 3), Grid(1, rows, 6, newline=True)] for rows in (3, 4, 6)]  # 12 x 24 -> 3 rows, ...
    assert adapter_for(model).image_layout(inputs, visual, None) == expected
    assert generate_layout(model, inputs) == expected
    assert [sum(g.tokens for g in grids) for grids in expected] == visual.sum(-1).tolist()


def test_llava_next_lattice_keeps_patches_not_newlines():
    model = tiny_llava_next(layers=2)
    inputs = tiny_next_inputs(model, ((4, 6, (24, 24)),))
    method = st3.Lattice(keep=20, layer=1)
    with torch.no_grad(), method(model):
        model(**inputs)
    columns = visual_of(model, inputs)[0].nonzero().squeeze(-1)
    newlines = {int(columns[9 + y * 7 + 6]) for y in range(6)}  # base 3 x 3, then 6 rows of 6 + newline
    kept = set(method.trace.prefill_visual_positions[1][0].tolist())
    assert len(kept) == 20 and not kept & newlines


# ---------------------------------------------------------------------------------------- LLaVA-OneVision
def test_llava_onevision_layout_of_images_and_videos():
    model = tiny_llava_onevision(layers=2)
    inputs = tiny_onevision_inputs(model, ((4, 6, "image", (12, 24)), (2, 9, "image", (24, 24)), (5, 3, "video", 4)))
    newline = Grid(1, 1, 0, newline=True)
    expected = [
        [Grid(1, 3, 3), Grid(1, 3, 6, newline=True)],
        [Grid(1, 3, 3), Grid(1, 4, 4, newline=True)],  # 6 x 6 tiles shrunk by anyres_max_2
        [Grid(4, 2, 2), newline],  # 4 frames pooled 2 x 2, then one newline
    ]
    visual = visual_of(model, inputs)
    assert adapter_for(model).image_layout(inputs, visual, None) == expected
    assert generate_layout(model, inputs) == expected


def test_llava_onevision_multi_image_samples_are_base_grids_and_a_newline():
    model = tiny_llava_onevision(layers=2)
    inputs = tiny_onevision_inputs(model, ((4, 6, "image", (12, 24)),))
    adapter = adapter_for(model)
    assert adapter.image_grids((12, 24), patched=False) == [Grid(1, 3, 3), Grid(1, 1, 0, newline=True)]
    features = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"],
                                              batch_num_images=torch.tensor([2])).pooler_output  # fmt: skip
    assert [adapter.grids_of_features(f) for f in features] == [[Grid(1, 3, 3), Grid(1, 1, 0, newline=True)]]


# ----------------------------------------------------------------------------------- InternVL, Idefics3
def test_internvl_layout_is_one_grid_per_image_its_tiles_as_frames():
    model = tiny_internvl(layers=2)
    inputs = tiny_internvl_inputs(model, ((4, 6, [1]), (2, 9, [3]), (5, 3, [1, 1])))
    expected = [[Grid(1, 4, 4)], [Grid(3, 4, 4)], [Grid(1, 4, 4), Grid(1, 4, 4)]]
    assert adapter_for(model).image_layout(inputs, visual_of(model, inputs), None) == expected
    assert generate_layout(model, inputs) == expected


@pytest.mark.parametrize("smolvlm", [False, True], ids=["idefics3", "smolvlm"])
def test_idefics3_and_smolvlm_prune_exactly_on_the_text_model(smolvlm):
    model = tiny_idefics3(layers=3, smolvlm=smolvlm)
    inputs = tiny_idefics3_inputs(model, ((4, 6, 1), (2, 9, 3)))
    assert adapter_for(model).language_model is model.model.text_model
    expected = [[Grid(1, 4, 4)], [Grid(1, 4, 4)] * 3]
    assert adapter_for(model).image_layout(inputs, visual_of(model, inputs), None) == expected
    original = generate(model, inputs)
    noop = generate(model, inputs, st3.ST3(ratio=0.0, anneal_final=1.0))
    assert torch.equal(original.sequences, noop.sequences)
    for a, b in zip(original.logits, noop.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert generate_layout(model, inputs) == expected
    assert "forward" not in model.model.text_model.__dict__  # the engine's forward is gone again


# ------------------------------------------------------------------------------------------------- Mistral3
def test_mistral3_layout_reads_rows_between_image_breaks():
    model = tiny_mistral3(layers=2)
    inputs = tiny_mistral3_inputs(model, ((4, 6, (32, 48)), (2, 9, (48, 48)), (5, 3, (64, 40))))
    expected = [[Grid(1, 4, 6)], [Grid(1, 6, 6)], [Grid(1, 8, 5)]]
    assert adapter_for(model).image_layout(inputs, visual_of(model, inputs), None) == expected
    assert generate_layout(model, inputs) == expected


@pytest.mark.slow
def test_mistral3_with_a_sliding_window_shorter_than_its_prompts_is_exact():
    """The stock config's window (4096) declared as LLaVA's Mistral declares it, here 16 columns: several windows."""
    from test_families import MISTRAL3_BATCH
    from test_windows import _equals_masked_reference

    model = tiny_mistral3(sliding_window=16)
    inputs = tiny_mistral3_inputs(model, MISTRAL3_BATCH)
    assert all(adapter_for(model).mask_rule(i).window == 16 for i in range(6))
    for method in (st3.get("spread", keep=10), st3.get("stratified", keep=10)):
        _equals_masked_reference(model, inputs, method)
    with pytest.raises(ValueError, match="never computed"):  # every layer slides: attention scoring is undefined
        _equals_masked_reference(model, inputs, st3.ST3())


@pytest.mark.parametrize(
    "build,phrase",
    [
        (lambda: tiny_llava_next(layers=2), "LLaVA-NeXT"),
        (lambda: tiny_llava_onevision(layers=2), "no \\[CLS\\] token"),
        (lambda: tiny_internvl(layers=2), "pixel shuffle"),
        (lambda: tiny_idefics3(layers=2), "no \\[CLS\\] token"),
        (lambda: tiny_mistral3(layers=2), "no \\[CLS\\] token"),
    ],
    ids=["llava-next", "llava-onevision", "internvl", "idefics3", "mistral3"],
)
def test_compression_before_the_decoder_is_refused_naming_the_model_and_alternatives(build, phrase):
    model = build()
    with pytest.raises(ValueError, match=phrase) as error:
        st3.VisionZip(dominant=4, contextual=2)(model)
    assert type(model).__name__ in str(error.value) and "st3 methods" in str(error.value)


def test_kept_patches_of_a_grid_with_newlines_leave_the_newlines_out():
    from st3.trace import Trace
    from st3.viz import kept_grid

    trace = Trace(method="m", shape=None, batch_size=1, prompt_columns=20, prompt_tokens=[20], visual_tokens=[15],
                  dtype_bytes=4)  # fmt: skip
    columns = torch.arange(5, 20)  # 3 rows of 4 patches + a newline each
    trace.log_prefill_layer(columns[None], torch.ones(1, 15, dtype=torch.bool), torch.ones(1, 15, dtype=torch.bool))
    three = torch.ones(1, 3, dtype=torch.bool)
    trace.log_prefill_layer(torch.tensor([[5, 9, 15]]), three, three)
    kept = kept_grid(trace, columns, 1, grid=Grid(1, 3, 4, newline=True))
    assert kept.tolist() == [[True] + [False] * 3, [False] * 4, [True] + [False] * 3]  # 9 is row 0's newline
