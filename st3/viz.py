"""Pictures of what a method kept: which image patches survive, layer by layer, drawn over the image."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from st3.trace import Trace  # noqa: E402


def kept_grid(trace: Trace, image_columns: torch.Tensor, layer: int, sample: int = 0, grid=None) -> torch.Tensor:
    """BoolTensor [rows, cols]: which patches of an image layer `layer` holds after prefill.

    image_columns: the prompt columns of the image's tokens, in raster order (input_ids == image token);
    grid: its `st3.adapters.Grid` (one frame), from the model's adapter (`image_layout`); without one the
    image is taken to be square.
    """
    if grid is None:
        side = math.isqrt(len(image_columns))
        if side * side != len(image_columns):
            raise ValueError(f"{len(image_columns)} image tokens do not form a square grid: pass the image's grid")
        rows, cols = side, side
    else:
        rows, cols = grid.rows, grid.cols
        if rows * cols != len(image_columns):
            raise ValueError(f"{len(image_columns)} image tokens are not one {rows} x {cols} grid")
    kept = torch.isin(image_columns, trace.prefill_visual_positions[layer][sample].to(image_columns.device))
    return kept.view(rows, cols)


def stage_layers(trace: Trace, sample: int = 0, most: int = 8) -> list[int]:
    """The layers where the kept set changes (plus the first and the last), at most `most` of them."""
    positions = trace.prefill_visual_positions
    changes = [0] + [
        i for i in range(1, len(positions)) if not torch.equal(positions[i][sample], positions[i - 1][sample])
    ]
    layers = sorted(set(changes) | {len(positions) - 1})
    if len(layers) > most:
        picks = np.linspace(0, len(layers) - 1, most).round().astype(int)
        layers = [layers[i] for i in sorted(set(picks.tolist()))]
    return layers


def plot_kept_patches(
    image: Image.Image,
    trace: Trace,
    image_columns: torch.Tensor,
    path: str,
    sample: int = 0,
    title: str = "",
    grid=None,
) -> list[int]:
    """Write a PNG: the image once per stage, dropped patches dimmed; return the layers drawn."""
    layers = stage_layers(trace, sample)
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    fig, axes = plt.subplots(1, len(layers), figsize=(2.4 * len(layers), 2.8), squeeze=False)
    for ax, layer in zip(axes[0], layers):
        kept = kept_grid(trace, image_columns, layer, sample, grid).numpy()
        block = (math.ceil(pixels.shape[0] / kept.shape[0]), math.ceil(pixels.shape[1] / kept.shape[1]))
        cell = np.kron(kept, np.ones(block))[: pixels.shape[0], : pixels.shape[1]]
        shown = pixels * (0.2 + 0.8 * cell[..., None])
        ax.imshow(shown)
        ax.set_title(f"layer {layer}: {int(kept.sum())}/{kept.size}", fontsize=9)
        ax.axis("off")
    fig.suptitle(title or f"{trace.method}: visual tokens kept after prefill", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return layers
