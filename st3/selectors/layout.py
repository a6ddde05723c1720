"""Layout arithmetic over a sample's image and frame grids (plain Python, no tensors).

A sample's visual tokens tile its images and video frames in prompt order (`st3.adapters.Grid`: frames x
rows x cols, raster order, optionally one newline token ending each row). The spatial selectors share a
budget among those grids by token counts (`frame_budgets`) and then spread each grid's share over it: a
lattice of points (`lattice`), a tiling into blocks (`lattice_blocks`, `strata`) or coordinates for distances
(`grid_layout`).
"""

from __future__ import annotations

import math


def apportion(total: int, sizes: list[int]) -> list[int]:
    """Split `total` over parts of `sizes` in proportion (largest remainder), never above a part's size."""
    whole = sum(sizes)
    if total >= whole:
        return list(sizes)
    exact = [total * size / whole for size in sizes]
    parts = [math.floor(x) for x in exact]
    for i in sorted(range(len(sizes)), key=lambda i: parts[i] - exact[i])[: total - sum(parts)]:
        parts[i] += 1
    return parts


def tiles(grids: list | None, count: int) -> bool:
    """Whether a sample's grids lay out exactly its `count` candidates (not once earlier layers dropped some)."""
    return grids is not None and sum(g.tokens for g in grids) == count


def frames(grids: list) -> list:
    """The grid of each image and video frame, in prompt order (a video's grid once per frame)."""
    return [grid for grid in grids for _ in range(grid.frames)]


def width(grid) -> int:
    """Tokens per row of `grid`: its columns, plus one where each row ends with a newline token."""
    return grid.cols + int(getattr(grid, "newline", False))


def frame_budgets(grids: list, keep: int) -> list[int]:
    """`keep` shared among a sample's images by patch counts, then each image's share among its frames; newline
    tokens (`Grid.newline`) get only what exceeds every patch."""
    patches = [g.frames * g.rows * g.cols for g in grids]
    on_patches = apportion(min(keep, sum(patches)), patches)
    on_newlines = apportion(keep - sum(on_patches), [g.tokens - p for g, p in zip(grids, patches)])
    return [
        frame_part
        for grid, a, b in zip(grids, on_patches, on_newlines)
        for frame_part in apportion(a + b, [grid.rows * width(grid)] * grid.frames)
    ]


def _split(grid, keep: int) -> tuple[int, int]:
    """A frame's `keep` as (on patches, on newline tokens): patches first, newlines only beyond them."""
    patches = grid.rows * grid.cols
    return min(keep, patches), max(0, keep - patches)


def _raster(grid, y: int, x: int) -> int:
    """Index within a frame of row y, column x (x == cols: that row's newline token)."""
    return y * width(grid) + x


def _lattice_shape(rows: int, cols: int, keep: int) -> tuple[int, int]:
    """(r, c): a lattice of about sqrt(keep * rows / cols) rows with r x c >= keep points on the grid."""
    r = min(rows, max(1, round(math.sqrt(keep * rows / cols))))
    c = min(cols, math.ceil(keep / r))
    return min(rows, math.ceil(keep / c)), c


def lattice(rows: int, cols: int, keep: int) -> list[int]:
    """`keep` raster indices of a rows x cols grid, spread as a lattice over both axes (block centres)."""
    if keep >= rows * cols:
        return list(range(rows * cols))
    if keep == 0:
        return []
    r, c = _lattice_shape(rows, cols, keep)
    points = [math.floor((i + 0.5) * rows / r) * cols + math.floor((j + 0.5) * cols / c)
              for i in range(r) for j in range(c)]  # fmt: skip
    return sorted(points[math.floor((s + 0.5) * len(points) / keep)] for s in range(keep))


def lattice_blocks(rows: int, cols: int, keep: int) -> list[int]:
    """Block of each raster index of a rows x cols grid: `keep` blocks tile it, one per kept token, or -1.

    The grid is cut into the r x c near-equal rectangles of `lattice`; where r x c exceeds `keep`, the same
    evenly spread subset of blocks is used and the others' tokens get -1.
    """
    if keep <= 0:
        return [-1] * (rows * cols)
    if keep >= rows * cols:
        return list(range(rows * cols))
    r, c = _lattice_shape(rows, cols, keep)
    used = {math.floor((s + 0.5) * r * c / keep): s for s in range(keep)}
    return [used.get((y * r // rows) * c + x * c // cols, -1) for y in range(rows) for x in range(cols)]


def lattice_cells(grids: list, keep: int) -> list[int]:
    """Indices (over a sample's visual tokens, in prompt order) of `keep` lattice points spread over its grids.

    On a grid with newline tokens the lattice covers the patches; newline tokens are kept (evenly over the
    rows) only once every patch is.
    """
    cells, offset = [], 0
    for grid, part in zip(frames(grids), frame_budgets(grids, keep)):
        on_patches, on_newlines = _split(grid, part)
        picked = [_raster(grid, i // grid.cols, i % grid.cols) for i in lattice(grid.rows, grid.cols, on_patches)]
        picked += [_raster(grid, y, grid.cols) for y in lattice(grid.rows, 1, on_newlines)]
        cells += sorted(offset + i for i in picked)
        offset += grid.rows * width(grid)
    return cells


def strata(grids: list | None, count: int, keep: int) -> list[int]:
    """Stratum of each of a sample's `count` candidates (prompt order), `keep` strata in all, -1 for none.

    With grids the budget is shared by `frame_budgets` and each grid is cut by `lattice_blocks`; without them
    (or once earlier layers dropped tokens) the candidates are cut into `keep` equal runs of prompt order.
    """
    if not tiles(grids, count):
        return [min(i * keep // max(count, 1), keep - 1) for i in range(count)] if keep > 0 else [-1] * count
    labels, offset = [], 0
    for grid, frame_part in zip(frames(grids), frame_budgets(grids, keep)):
        on_patches, on_newlines = _split(grid, frame_part)
        blocks = lattice_blocks(grid.rows, grid.cols, on_patches)
        if width(grid) > grid.cols:  # each row's newline: a stratum of its own only beyond the patches
            newline = lattice_blocks(grid.rows, 1, on_newlines)
            blocks = [b if x < grid.cols else (newline[y] + on_patches if newline[y] >= 0 else -1)
                      for y in range(grid.rows) for x, b in enumerate(blocks[y * grid.cols : (y + 1) * grid.cols]
                                                                      + [0])]  # fmt: skip
        labels += [b + offset if b >= 0 else -1 for b in blocks]
        offset += frame_part
    return labels


def grid_layout(grids: list | None, count: int, keep: int) -> tuple[list[int], list[tuple[float, float]], list[int]]:
    """Of a sample's `count` candidates (prompt order): each one's group (one per image or video frame) and its
    (row, col) divided by its grid's diagonal (so distances across a grid are at most 1); and each group's
    share of `keep` (`frame_budgets`).

    Without grids (or once earlier layers dropped tokens, so they no longer tile) the candidates are one group
    along prompt order, at positions i / count.
    """
    if not tiles(grids, count):
        return [0] * count, [(0.0, i / max(count, 1)) for i in range(count)], [keep]
    groups: list[int] = []
    coords: list[tuple[float, float]] = []
    for index, grid in enumerate(frames(grids)):  # a newline token sits just after its row's last patch
        diagonal = math.hypot(grid.rows, grid.cols)
        groups += [index] * (grid.rows * width(grid))
        coords += [(y / diagonal, x / diagonal) for y in range(grid.rows) for x in range(width(grid))]
    return groups, coords, frame_budgets(grids, keep)
