"""Pictures of what a method kept: which image patches survive, layer by layer, drawn over the image."""

from __future__ import annotations

import math
from typing import Any

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


def image_parts(
    image_columns: torch.Tensor, grid=None, grids: list | None = None
) -> list[tuple[str, torch.Tensor, Any]]:
    """(label, columns, one-frame grid) of each part of an image to draw: every frame of `grids` (a base image,
    its tiles as one grid, each video frame) where they lay out `image_columns` exactly, else the one `grid`."""
    from st3.adapters import Grid
    from st3.selectors.layout import frames

    if not grids or sum(g.tokens for g in grids) != len(image_columns):
        return [("", image_columns, grid)]
    pieces = frames(grids)
    if len(pieces) == 1:
        return [("", image_columns, pieces[0])]
    parts, start = [], 0
    for index, part in enumerate(pieces):
        size = part.rows * part.width
        label = f"part {index}: {part.rows}x{part.cols}"
        parts.append((label, image_columns[start : start + size], Grid(1, part.rows, part.cols, part.newline)))
        start += size
    return parts


def plot_kept_patches(
    image: Image.Image,
    trace: Trace,
    image_columns: torch.Tensor,
    path: str,
    sample: int = 0,
    title: str = "",
    grid=None,
    grids: list | None = None,
    most_parts: int = 6,
) -> list[int]:
    """Write a PNG: the image once per stage, dropped patches dimmed; return the layers drawn.

    With the sample's `grids` (`trace.image_grids[sample]`) an image of several parts (LLaVA-NeXT's base image
    and tiles, InternVL's tiles, a video's frames) gets one row per part (the first `most_parts`): the first part
    over the image, the others as plain maps (where a tile or frame lies on the picture is the processor's and
    does not reach the model). Where the trace recorded decode-time positions (`record_positions=True`) and
    decoding evicted any, each part gets a second row: each of those layers at the last decode step, the patches
    evicted while decoding in red.
    """
    layers = stage_layers(trace, sample)
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    parts = image_parts(image_columns, grid, grids)
    shown = parts[:most_parts]
    rows, labels = [], []
    for index, (label, columns, part_grid) in enumerate(shown):
        kept = [kept_grid(trace, columns, layer, sample, part_grid).numpy() for layer in layers]
        background = pixels if index == 0 else np.ones((kept[0].shape[0] * 16, kept[0].shape[1] * 16, 3), np.float32)
        rows.append([(layer, k, None, background) for layer, k in zip(layers, kept)])
        prefix = f"{label}\n" if label else ""
        labels.append(f"{prefix}after prefill")
        if trace.decode_visual_positions:
            decoded = [decoded_grid(trace, columns, layer, sample, part_grid).numpy() for layer in layers]
            if any((before & ~after).any() for before, after in zip(kept, decoded)):
                rows.append([(layer, a, b, background) for layer, a, b in zip(layers, decoded, kept)])
                labels.append(f"{prefix}after {trace.decode_steps} decode steps")
    fig, axes = plt.subplots(len(rows), len(layers), figsize=(2.4 * len(layers), 2.8 * len(rows)), squeeze=False)
    for axes_row, panel_row, label in zip(axes, rows, labels):
        for ax, (layer, kept, before, background) in zip(axes_row, panel_row):
            ax.imshow(_shade(background, kept, before))
            if before is None:
                ax.set_title(f"layer {layer}: {int(kept.sum())}/{kept.size}", fontsize=9)
            else:
                evicted = int((before & ~kept).sum())
                ax.set_title(f"layer {layer}: {int(kept.sum())}/{kept.size}, {evicted} evicted", fontsize=9)
            ax.axis("off")
        axes_row[0].text(-0.08, 0.5, label, transform=axes_row[0].transAxes, rotation=90, va="center", ha="right",
                         fontsize=9)  # fmt: skip
    suffix = "; red: evicted while decoding" if any(b is not None for row in rows for _, _, b, _ in row) else ""
    more = f"; the first {most_parts} of {len(parts)} parts" if len(parts) > most_parts else ""
    fig.suptitle((title or f"{trace.method}: visual tokens kept") + suffix + more, fontsize=10)
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
