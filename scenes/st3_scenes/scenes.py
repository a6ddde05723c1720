"""Seed-addressable synthetic scenes: coloured shapes on a coarse grid over a textured background.

`scene(seed)` draws, deterministically from the seed alone, a square RGB image with 2 to 6 objects. Each object
has a shape, a colour, a size (small or large) and a cell of a 3x3 grid (one object per cell, centred in its
cell with a small jitter). The background is a muted colour with low-frequency stripes and pixel noise, so
background patches are never exactly empty or identical. The generator uses only Python's `random` (string
seeds) and numpy's PCG64, both stable across platforms and versions, so the same seed gives the same bytes.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross", "star")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SIZES = ("small", "large")
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
GRID = 3
IMAGE_SIZE = 144  # 18 x 18 patches of 8 pixels: each grid cell is exactly 6 x 6 patches
MIN_OBJECTS, MAX_OBJECTS = 2, 6

RGB = {
    "red": (220, 35, 35),
    "green": (35, 175, 50),
    "blue": (35, 75, 225),
    "yellow": (240, 215, 25),
    "purple": (145, 45, 185),
    "orange": (250, 135, 15),
}
RADIUS = {"small": 0.22, "large": 0.38}  # half the object's extent, as a fraction of the cell side
SUPERSAMPLE = 4
JITTER = 0.0  # how far an object may stray from its cell centre, as a fraction of the free margin


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    row: int
    col: int

    @property
    def position(self) -> str:
        return f"{ROWS[self.row]} {COLS[self.col]}"


@dataclass(frozen=True)
class Scene:
    seed: int
    objects: tuple[SceneObject, ...]  # in reading order (row-major)
    image: Image.Image
    owner: np.ndarray = field(repr=False, compare=False)  # [H, W] int8: index of the object drawn there, or -1

    def at(self, row: int, col: int) -> SceneObject | None:
        return next((o for o in self.objects if o.row == row and o.col == col), None)


def _outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Polygon of a shape centred at (cx, cy) with half-extent r; None for the circle."""
    if shape == "circle":
        return None
    if shape == "square":
        s = r * 0.85
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r * 0.95, cy + r * 0.8), (cx - r * 0.95, cy + r * 0.8)]
    if shape == "cross":
        a, b = r * 0.32, r
        return [
            (cx - a, cy - b), (cx + a, cy - b), (cx + a, cy - a), (cx + b, cy - a),
            (cx + b, cy + a), (cx + a, cy + a), (cx + a, cy + b), (cx - a, cy + b),
            (cx - a, cy + a), (cx - b, cy + a), (cx - b, cy - a), (cx - a, cy - a),
        ]  # fmt: skip
    if shape == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * 0.45
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * 1.05 * math.sin(angle) + r * 0.08))
        return points
    raise ValueError(f"unknown shape {shape!r}")


def _background(rng: random.Random, noise: np.random.Generator, size: int) -> np.ndarray:
    """A muted base colour, two faint stripe patterns and per-pixel noise, as float [size, size, 3]."""
    grey = rng.uniform(85, 175)
    base = np.array([grey + rng.uniform(-14, 14) for _ in range(3)])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    texture = np.zeros((size, size))
    for _ in range(2):
        angle, period = rng.uniform(0, math.pi), rng.uniform(6, 30)
        phase, amplitude = rng.uniform(0, 2 * math.pi), rng.uniform(4, 12)
        texture += amplitude * np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period + phase)
    return base + texture[..., None] + noise.normal(0, 7, (size, size, 3))


def scene(seed: int, image_size: int = IMAGE_SIZE) -> Scene:
    """The scene of `seed`: the same objects and the same image bytes on every call and platform."""
    rng = random.Random(f"scene:{seed}")
    noise = np.random.Generator(np.random.PCG64(seed))
    count = rng.randint(MIN_OBJECTS, MAX_OBJECTS)
    cells = sorted(rng.sample(range(GRID * GRID), count))
    objects = tuple(
        SceneObject(rng.choice(SHAPES), rng.choice(COLOURS), rng.choice(SIZES), cell // GRID, cell % GRID)
        for cell in cells
    )
    pixels = _background(rng, noise, image_size)
    cell = image_size / GRID
    big = image_size * SUPERSAMPLE
    owner = np.full((image_size, image_size), -1, dtype=np.int8)
    for index, obj in enumerate(objects):
        r = RADIUS[obj.size] * cell
        slack = (cell / 2 - r - 1.5) * JITTER
        cx = (obj.col + 0.5) * cell + rng.uniform(-slack, slack)
        cy = (obj.row + 0.5) * cell + rng.uniform(-slack, slack)
        mask = Image.new("L", (big, big), 0)
        draw = ImageDraw.Draw(mask)
        s = SUPERSAMPLE
        outline = _outline(obj.shape, cx * s, cy * s, r * s)
        if outline is None:
            draw.ellipse([cx * s - r * s, cy * s - r * s, cx * s + r * s, cy * s + r * s], fill=255)
        else:
            draw.polygon(outline, fill=255)
        alpha = np.asarray(mask.resize((image_size, image_size), Image.BOX), dtype=np.float64)[..., None] / 255
        colour = np.array(RGB[obj.colour], dtype=np.float64) + [rng.uniform(-12, 12) for _ in range(3)]
        pixels = pixels * (1 - alpha) + colour * alpha
        owner[alpha[..., 0] >= 0.5] = index
    pixels += noise.normal(0, 4, pixels.shape)
    image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")
    return Scene(seed=seed, objects=objects, image=image, owner=owner)
