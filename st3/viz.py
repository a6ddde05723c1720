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
    return _on_grid(trace.prefill_visual_positions[layer][sample], image_columns, grid)


def decoded_grid(trace: Trace, image_columns: torch.Tensor, layer: int, sample: int = 0, grid=None) -> torch.Tensor:
    """BoolTensor [rows, cols]: which patches layer `layer` still attended to at the last decode step (a run
    with `record_positions=True`); the patches kept after prefill and not here were evicted while decoding."""
    if not trace.decode_visual_positions:
        raise ValueError("no decode-time positions: run the method with record_positions=True and generate")
    return _on_grid(trace.decode_visual_positions[-1][layer][sample], image_columns, grid)


def _on_grid(positions: torch.Tensor, image_columns: torch.Tensor, grid) -> torch.Tensor:
    if grid is None:
        side = math.isqrt(len(image_columns))
        if side * side != len(image_columns):
            raise ValueError(f"{len(image_columns)} image tokens do not form a square grid: pass the image's grid")
        rows, cols = side, side
    else:
        rows, cols = grid.rows, grid.cols
        width = cols + int(getattr(grid, "newline", False))  # a row's newline token is drawn nowhere
        if rows * width != len(image_columns):
            raise ValueError(f"{len(image_columns)} image tokens are not one {rows} x {width} grid")
        return torch.isin(image_columns, positions.to(image_columns.device)).view(rows, width)[:, :cols]
    return torch.isin(image_columns, positions.to(image_columns.device)).view(rows, cols)


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
    """Write a PNG: the image once per stage, dropped patches dimmed; return the layers drawn.

    Where the trace recorded decode-time positions (`record_positions=True`) and decoding evicted any, a second
    row shows each of those layers at the last decode step, the patches evicted while decoding in red: the
    tokens a long answer lost after it started, which the first row cannot show.
    """
    layers = stage_layers(trace, sample)
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    panels = [[(layer, kept_grid(trace, image_columns, layer, sample, grid).numpy(), None) for layer in layers]]
    if trace.decode_visual_positions:
        decoded = [decoded_grid(trace, image_columns, layer, sample, grid).numpy() for layer in layers]
        if any((before & ~after).any() for (_, before, _), after in zip(panels[0], decoded)):
            panels.append([(layer, after, before) for (layer, before, _), after in zip(panels[0], decoded)])
    fig, axes = plt.subplots(len(panels), len(layers), figsize=(2.4 * len(layers), 2.8 * len(panels)), squeeze=False)
    for row, (axes_row, panel_row) in enumerate(zip(axes, panels)):
        for ax, (layer, kept, before) in zip(axes_row, panel_row):
            ax.imshow(_shade(pixels, kept, before))
            if before is None:
                ax.set_title(f"layer {layer}: {int(kept.sum())}/{kept.size}", fontsize=9)
            else:
                evicted = int((before & ~kept).sum())
                ax.set_title(f"layer {layer}: {int(kept.sum())}/{kept.size}, {evicted} evicted", fontsize=9)
            ax.axis("off")
        axes_row[0].text(-0.08, 0.5, ("after prefill", f"after {trace.decode_steps} decode steps")[row],
                         transform=axes_row[0].transAxes, rotation=90, va="center", ha="right", fontsize=9)  # fmt: skip
    suffix = "; red: evicted while decoding" if len(panels) > 1 else ""
    fig.suptitle((title or f"{trace.method}: visual tokens kept") + suffix, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return layers


def _shade(pixels: np.ndarray, kept: np.ndarray, before: np.ndarray | None) -> np.ndarray:
    """The image with the patches not `kept` dimmed, and those in `before` but not kept (evicted) red."""

    def upscale(cells: np.ndarray) -> np.ndarray:
        block = (math.ceil(pixels.shape[0] / cells.shape[0]), math.ceil(pixels.shape[1] / cells.shape[1]))
        return np.kron(cells, np.ones(block))[: pixels.shape[0], : pixels.shape[1], None]

    shown = pixels * (0.2 + 0.8 * upscale(kept))
    if before is not None:
        red = np.array([0.9, 0.1, 0.1], dtype=np.float32)
        evicted = upscale(before & ~kept)
        shown = shown * (1 - evicted) + (0.4 * pixels + 0.6 * red) * evicted
    return shown
