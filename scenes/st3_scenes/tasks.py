"""Questions with one-word answers and a fixed-template caption about a scene, and the seed splits.

Splits are disjoint seed ranges; the n-th example of a split is the scene of seed `start + n`:

    train       seeds [0, 1_000_000)
    validation  seeds [1_000_000, 1_010_000)
    test        seeds [2_000_000, 2_010_000)

`example(split, n)` is deterministic: the scene comes from the seed, the question from a `random.Random`
seeded with a string built from the seed (the task, question kind and question are all drawn from it).

Question kinds (every question has exactly one correct one-word answer; a question that names an object is
only asked when the description picks out exactly one object):

    colour_of_shape   what colour is the star?                  (the shape, or size + shape, is unique)
    shape_of_colour   what shape is the red object?             (the colour is unique)
    size_of           what size is the red star?                (colour + shape is unique) -> small / large
    shape_at          what is at the top left?                  -> a shape, or "nothing" for an empty cell
    colour_at         what colour is the object at the middle center?
    count_colour      how many red objects are there?           -> zero ... six
    count_shape       how many stars are there?
    count_all         how many objects are there?
    left_of / right_of / above / below
                      what is left of the red star?             -> the shape of the nearest object in that
                                                                   direction in the same row (column), or "nothing"
    exists            is there a red star?                      -> yes / no (drawn half and half)
    occupied          is there an object at the bottom right?   -> yes / no

The caption walks the 3x3 grid in reading order (row by row, left to right) and describes every cell, naming
each object by size, colour and shape, and saying "empty" where a cell holds none:

    top left large red star, top center empty, top right small blue circle, middle left empty, ...

So every object appears, in reading order, with every attribute and its position; a long answer (about 50
tokens) during which the model must look at a different place for every cell. `parse_caption` reads it back
into objects.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from st3_scenes.scenes import COLOURS, COLS, GRID, ROWS, SHAPES, SIZES, Scene, SceneObject, scene

SPLITS: dict[str, tuple[int, int]] = {
    "train": (0, 1_000_000),
    "validation": (1_000_000, 1_010_000),
    "test": (2_000_000, 2_010_000),
}
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses", "star": "stars"}
CAPTION_PROMPT = "describe the image."
NOTHING = "nothing"
EMPTY = "empty"
DIRECTIONS = {"left_of": (0, -1), "right_of": (0, 1), "above": (-1, 0), "below": (1, 0)}
DIRECTION_WORDS = {"left_of": "left of", "right_of": "right of", "above": "above", "below": "below"}
KINDS = (
    "colour_of_shape",
    "shape_of_colour",
    "size_of",
    "shape_at",
    "colour_at",
    "count_colour",
    "count_shape",
    "count_all",
    "left_of",
    "right_of",
    "above",
    "below",
    "exists",
    "occupied",
)
# kinds every scene can be asked about (a count or existence question for each shape and colour, a question
# for each grid cell), whatever it holds; the other kinds depend on the scene (`candidates` leaves them out)
ALWAYS_ASKED = ("shape_at", "count_colour", "count_shape", "count_all", "exists", "occupied")
ANSWER_TOKENS = {"qa": 3, "caption": 80}  # generation budget per task (a caption is at most 54 tokens)
CAPTION_FRACTION = 0.2  # share of captions among `example(split, n)` with task="mixed"


@dataclass(frozen=True)
class QA:
    kind: str
    question: str
    answer: str
    # grid cells (row, col) the question is about: the named or counted objects, the named cell; for a
    # direction question the named object (not the neighbour), since the answer is read from where it is
    focus: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class Example:
    split: str
    index: int
    seed: int
    task: str  # "qa" or "caption"
    kind: str  # the question kind, or "caption"
    question: str
    answer: str
    scene: Scene

    @property
    def image(self):
        return self.scene.image


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def position(row: int, col: int) -> str:
    return f"{ROWS[row]} {COLS[col]}"


def describe_cell(scene_: Scene, row: int, col: int) -> str:
    """`top left large red star`, or `top center empty`."""
    obj = scene_.at(row, col)
    return f"{position(row, col)} {EMPTY if obj is None else f'{obj.size} {obj.colour} {obj.shape}'}"


def caption(scene_: Scene) -> str:
    """Every cell of the grid, in reading order, in the fixed template."""
    return ", ".join(describe_cell(scene_, row, col) for row in range(GRID) for col in range(GRID))


_OBJECT = rf"({'|'.join(SIZES)}) ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})"
_CELL = re.compile(rf"^({'|'.join(ROWS)}) ({'|'.join(COLS)}) (?:{EMPTY}|{_OBJECT})$")


def parse_caption(text: str) -> list[SceneObject] | None:
    """The objects a caption lists, or None where it does not follow the template (every cell, in order)."""
    objects = []
    parts = text.strip().split(",")
    if len(parts) != GRID * GRID:
        return None
    for k, part in enumerate(parts):
        match = _CELL.match(part.strip())
        if match is None or (ROWS.index(match[1]), COLS.index(match[2])) != divmod(k, GRID):
            return None
        if match[3] is not None:
            objects.append(SceneObject(match[5], match[4], match[3], *divmod(k, GRID)))
    return objects


def neighbour(scene_: Scene, row: int, col: int, kind: str) -> SceneObject | None:
    """The nearest object from cell (row, col) in direction `kind` (same row or column), or None."""
    dr, dc = DIRECTIONS[kind]
    r, c = row + dr, col + dc
    while 0 <= r < GRID and 0 <= c < GRID:
        found = scene_.at(r, c)
        if found is not None:
            return found
        r, c = r + dr, c + dc
    return None


def candidates(scene_: Scene) -> dict[str, list[QA]]:
    """Every question this module may ask about the scene, by kind (kinds with none are absent)."""
    objs = scene_.objects
    out: dict[str, list[QA]] = {k: [] for k in KINDS}

    def add(kind: str, question: str, answer: str, *focus: SceneObject | tuple[int, int]) -> None:
        cells = tuple(f if isinstance(f, tuple) else (f.row, f.col) for f in focus)
        out[kind].append(QA(kind, question, answer, cells))

    def unique(pred) -> SceneObject | None:
        hits = [o for o in objs if pred(o)]
        return hits[0] if len(hits) == 1 else None

    for shape in SHAPES:
        if (o := unique(lambda o, s=shape: o.shape == s)) is not None:
            add("colour_of_shape", f"what colour is the {shape}?", o.colour, o)
        else:
            for size in SIZES:
                if (o := unique(lambda o, s=shape, z=size: o.shape == s and o.size == z)) is not None:
                    add("colour_of_shape", f"what colour is the {size} {shape}?", o.colour, o)
        hits = [o for o in objs if o.shape == shape]
        add("count_shape", f"how many {PLURALS[shape]} are there?", NUMBERS[len(hits)], *hits)
    for colour in COLOURS:
        if (o := unique(lambda o, c=colour: o.colour == c)) is not None:
            add("shape_of_colour", f"what shape is the {colour} object?", o.shape, o)
        hits = [o for o in objs if o.colour == colour]
        add("count_colour", f"how many {colour} objects are there?", NUMBERS[len(hits)], *hits)
    add("count_all", "how many objects are there?", NUMBERS[len(objs)], *objs)
    for row in range(GRID):
        for col in range(GRID):
            o = scene_.at(row, col)
            add("shape_at", f"what is at the {position(row, col)}?", NOTHING if o is None else o.shape, (row, col))
            answer = "no" if o is None else "yes"
            add("occupied", f"is there an object at the {position(row, col)}?", answer, (row, col))
            if o is not None:
                add("colour_at", f"what colour is the object at the {position(row, col)}?", o.colour, o)
    for shape in SHAPES:
        for colour in COLOURS:
            o = unique(lambda o, s=shape, c=colour: o.shape == s and o.colour == c)
            hits = [o2 for o2 in objs if o2.shape == shape and o2.colour == colour]
            add("exists", f"is there {article(colour)} {colour} {shape}?", "yes" if hits else "no", *hits)
            if o is None:
                continue
            add("size_of", f"what size is the {colour} {shape}?", o.size, o)
            for kind in DIRECTIONS:
                n = neighbour(scene_, o.row, o.col, kind)
                question = f"what is {DIRECTION_WORDS[kind]} the {colour} {shape}?"
                add(kind, question, NOTHING if n is None else n.shape, o)
    return {k: v for k, v in out.items() if v}


def draw_qa(
    scene_: Scene,
    rng: random.Random,
    options: dict[str, list[QA]] | None = None,
    kind_weights: dict[str, float] | None = None,
) -> QA:
    """One question: a kind uniformly among those the scene allows, then a question of that kind.

    Yes/no kinds draw the answer first (half and half where both occur), so "no" does not dominate.
    `options` is `candidates(scene_)`, for callers that draw many questions from one scene. `kind_weights`
    (training only; kinds left out weigh 1) draws kinds unevenly; without it the draw, and so every split,
    is what it always was.
    """
    options = candidates(scene_) if options is None else options
    kinds = sorted(options)
    if kind_weights:
        weights = [kind_weights.get(k, 1.0) for k in kinds]
        if not any(weights):
            raise ValueError(f"kind_weights gives every kind this scene allows ({kinds}) a weight of 0")
        kind = rng.choices(kinds, weights=weights)[0]
    else:
        kind = rng.choice(kinds)
    pool = options[kind]
    answers = sorted({qa.answer for qa in pool})
    if kind in ("exists", "occupied", "shape_at", "left_of", "right_of", "above", "below") and len(answers) > 1:
        # balance "nothing"/"no" against the rest so the common default answer does not dominate
        default = "no" if kind in ("exists", "occupied") else NOTHING
        if default in answers:
            want_default = rng.random() < (0.5 if kind in ("exists", "occupied") else 0.25)
            pool = [qa for qa in pool if (qa.answer == default) == want_default]
    return rng.choice(pool)


def split_seed(split: str, n: int) -> int:
    start, end = SPLITS[split]
    if not 0 <= n < end - start:
        raise IndexError(f"{split} has {end - start} examples; asked for #{n}")
    return start + n


def example(split: str, n: int, task: str = "qa") -> Example:
    """The n-th example of a split. task: "qa", "caption", or "mixed" (caption with CAPTION_FRACTION)."""
    seed = split_seed(split, n)
    rng = random.Random(f"question:{seed}")
    if task == "mixed":
        task = "caption" if rng.random() < CAPTION_FRACTION else "qa"
    scene_ = scene(seed)
    if task == "caption":
        return Example(split, n, seed, "caption", "caption", CAPTION_PROMPT, caption(scene_), scene_)
    if task != "qa":
        raise ValueError(f"task must be qa, caption or mixed, not {task!r}")
    qa = draw_qa(scene_, rng)
    return Example(split, n, seed, "qa", qa.kind, qa.question, qa.answer, scene_)


def words() -> list[str]:
    """Every word and punctuation mark a question, answer or caption may contain (for the vocabulary)."""
    vocab = set(SHAPES) | set(COLOURS) | set(SIZES) | set(ROWS) | set(COLS) | set(NUMBERS) | set(PLURALS.values())
    vocab |= {NOTHING, EMPTY, "yes", "no", "?", ",", "."}
    vocab |= set(re.findall(r"\w+|[^\w\s]", CAPTION_PROMPT))
    for template in (
        "what colour is the",
        "what shape is the object",
        "what size is the",
        "what is at the",
        "what colour is the object at the",
        "how many objects are there",
        "what is left of right of above below the",
        "is there a an object at the",
        "at",
    ):
        vocab |= set(template.split())
    return sorted(vocab)
