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
