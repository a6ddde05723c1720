"""The kept-patches picture: the grid is exactly the trace's kept set; the PNG is written."""

from __future__ import annotations

import torch
from PIL import Image

import st3
from st3.viz import kept_grid, plot_kept_patches, stage_layers


def test_kept_grid_and_plot(model, inputs, tmp_path):
    method = st3.Lattice(keep=6, layer=2)
    with torch.no_grad(), method(model):
        model(**inputs)
    columns = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().squeeze(-1)
    full, kept = kept_grid(method.trace, columns, 1), kept_grid(method.trace, columns, 2)
    assert full.shape == (6, 6) and full.all()
    assert kept.flatten().nonzero().squeeze(-1).tolist() == [7, 9, 11, 25, 27, 29]  # Uniform's 2 x 3 lattice
    assert stage_layers(method.trace) == [0, 2, 5]
    image = Image.fromarray((torch.rand(48, 48, 3) * 255).byte().numpy())
    path = tmp_path / "kept.png"
    assert plot_kept_patches(image, method.trace, columns, str(path)) == [0, 2, 5]
    assert Image.open(path).size[0] > 300


def test_kept_grid_of_a_non_square_image():
    from types import SimpleNamespace

    from st3.adapters import Grid

    trace = SimpleNamespace(prefill_visual_positions=[[torch.tensor([10, 12, 15])]])
    columns = torch.arange(10, 16)
    grid = kept_grid(trace, columns, 0, grid=Grid(1, 2, 3))
    assert grid.tolist() == [[True, False, True], [False, False, True]]


def test_the_picture_shows_the_evictions_made_while_decoding(model, inputs, tmp_path):
    """With record_positions=True a second row shows each layer at the last decode step: what VTA evicted after
    prefill (red) is exactly the prefill set minus the decode-time set."""
    from st3.viz import decoded_grid

    method = st3.ST3(start_layer=1, stride=2, ratio=0.3, min_keep=2, anneal_steps=4, anneal_every=1,
                     record_positions=True)  # fmt: skip
    with torch.no_grad(), method(model):
        model.generate(**inputs, max_new_tokens=6, do_sample=False)
    columns = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().squeeze(-1)
    after = decoded_grid(method.trace, columns, 5)
    before = kept_grid(method.trace, columns, 5)
    assert (after <= before).all() and int(after.sum()) < int(before.sum())
    expected = set(method.trace.decode_visual_positions[-1][5][0].tolist())
    assert set(columns[after.flatten()].tolist()) == expected
    image = Image.fromarray((torch.rand(48, 48, 3) * 255).byte().numpy())
    two_rows, one_row = tmp_path / "decode.png", tmp_path / "prefill.png"
    plot_kept_patches(image, method.trace, columns, str(two_rows))
    prefill_only = st3.ST3(start_layer=1, stride=2, ratio=0.3, min_keep=2, anneal_final=1.0, record_positions=True)
    with torch.no_grad(), prefill_only(model):
        model.generate(**inputs, max_new_tokens=6, do_sample=False)
    plot_kept_patches(image, prefill_only.trace, columns, str(one_row))  # nothing evicted: one row
    assert Image.open(two_rows).size[1] > 1.8 * Image.open(one_row).size[1]


def test_an_image_of_several_parts_gets_one_row_per_part(tmp_path):
    """A base image and its tiles (LLaVA-NeXT's layout: two grids, the tiles' rows ending in newline tokens) are
    drawn part by part, each part's map exactly the trace's kept columns of that part."""
    from st3.adapters import Grid
    from st3.trace import Trace
    from st3.viz import image_parts

    grids = [Grid(1, 2, 2), Grid(1, 2, 3, newline=True)]  # 4 base tokens, then 2 rows of 3 patches + a newline
    columns = torch.arange(3, 15)
    trace = Trace(method="m", shape=None, batch_size=1, prompt_columns=16, prompt_tokens=[16], visual_tokens=[12],
                  dtype_bytes=4)  # fmt: skip
    every = torch.ones(1, 12, dtype=torch.bool)
    trace.log_prefill_layer(columns[None], every, every)
    kept = torch.tensor([[3, 6, 7, 12]])
    four = torch.ones(1, 4, dtype=torch.bool)
    trace.log_prefill_layer(kept, four, four)
    parts = image_parts(columns, grids=grids)
    assert [label for label, _, _ in parts] == ["part 0: 2x2", "part 1: 2x3"]
    assert kept_grid(trace, parts[0][1], 1, grid=parts[0][2]).tolist() == [[True, False], [False, True]]
    assert kept_grid(trace, parts[1][1], 1, grid=parts[1][2]).tolist() == [[True, False, False], [False, True, False]]
    [(label, part_columns, grid)] = image_parts(columns[:4], grids=grids[:1])  # one part: drawn as before
    assert label == "" and torch.equal(part_columns, columns[:4]) and grid == grids[0]
    image = Image.fromarray((torch.rand(32, 32, 3) * 255).byte().numpy())
    two, one = tmp_path / "parts.png", tmp_path / "one.png"
    assert plot_kept_patches(image, trace, columns, str(two), grids=grids) == [0, 1]
    plot_kept_patches(image, trace, columns[:4], str(one), grid=grids[0])
    assert Image.open(two).size[1] > 1.8 * Image.open(one).size[1]
