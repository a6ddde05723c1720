"""Train the scenes LLaVA from scratch on CPU: seeded, resumable, QA mixed with captions.

    python scenes/scripts/train.py --out runs/scenes --export scenes/st3_scenes/assets/scenes-llava

Each step draws `--images` training scenes (scene seeds step*images ... , so the data order is a function of
the step alone and a resumed run sees exactly the batches it would have seen). Per scene the model is trained
on `--questions` distinct one-word questions and one caption. The image prefix (`<s> USER: <image>*324`) is
the same for every question about a scene, and causal attention means the prefix never sees what follows, so
each scene becomes one packed sequence: the prefix once, then every question with its answer and the caption
back to back, each seeing only the prefix and itself (a block attention mask; positions restart after the
prefix). This is the same function as running each (prompt, answer) sequence on its own, at a fraction of the
cost (tests check the equality of logits, focus loss and gradients).

Two phases. First `--vision-steps` steps train the vision tower and projector alone on the per-patch probe
loss (`PatchProbe`: linear heads, dropped at export, read from every visual token what its grid cell holds,
where it is and what its nearest neighbours are, and from the tower's middle layer the object drawn on the
patch). Then everything trains on: cross-entropy on the answer tokens and `</s>`, averaged per sequence, each
QA weighing 1 and each caption `--caption-weight`; plus `--aux-weight` times the probe loss; plus
`--focus-weight` times the focus loss (see `packed_logits`): two attention heads of a middle decoder
layer are taught to look, when predicting an answer word, at the grid cell the answer is read from (and, with
`--count-layer`, one head of another layer to look evenly at the whole image for a count; with `--word-focus`,
the content heads also look from each colour or shape word of a question at the objects it names). The vision
tower's learning rate is scaled by `--vision-lr-scale` in the second phase so the answer loss does not undo
what the probe built. AdamW, linear warm-up then cosine decay, gradient clipping at 1.

Every `--checkpoint-minutes` the model, optimizer, schedule and step go to `<out>/checkpoint.pt` (written
atomically); re-running the same command resumes from it (a resume with other training flags is allowed, for
experiments that branch from a checkpoint, and prints which flags changed). Every `--eval-every` steps
validation exact match is printed and appended to `<out>/log.jsonl`. At the end the model and processor are
saved with `save_pretrained` into `--export`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from st3.compat import DynamicCache, cache_kwargs, rotary
from st3_scenes.model import ScenesSpec, build_scenes_model, parameter_count
from st3_scenes.processor import IMAGE, PATCH_SIZE, build_processor, pixel_values, prompt
from st3_scenes.scenes import COLOURS, GRID, MAX_OBJECTS, SHAPES, SIZES, scene
from st3_scenes.tasks import (
    ALWAYS_ASKED,
    CAPTION_PROMPT,
    DIRECTIONS,
    KINDS,
    SPLITS,
    candidates,
    caption,
    draw_qa,
    neighbour,
)

IGNORE = -100
POSITION_KINDS = ("shape_at", "colour_at", "occupied")  # questions that name the cell by its position
# The focus loss's kinds of lookup: a cell named by its position, a cell named by what it holds, a count (every
# cell at once). Each kind has heads of its own (see `packed_logits`).
POSITION, CONTENT, COUNT, WORD = FOCUS_KINDS = ("position", "content", "count", "word")


@dataclasses.dataclass
class Batch:
    prefix_ids: torch.Tensor  # [1, P]: identical for every scene
    pixel_values: torch.Tensor  # [B, 3, H, W]
    repeats: torch.Tensor  # [B]: sequences per scene
    suffix_ids: torch.Tensor  # [N, S], right-padded
    labels: torch.Tensor  # [N, S], IGNORE outside answers; aligned with suffix_ids (labels[i] is token i)
    weights: torch.Tensor  # [N]
    is_caption: torch.Tensor  # [N] bool
    pad_id: int
    patch_labels: torch.Tensor  # [B, patches, heads]: the probe targets of each patch (see `cell_labels`)
    image_start: int  # index of the first image token in the prefix
    focus_rows: torch.Tensor  # [Q]: suffix row of each supervised query
    focus_pos: torch.Tensor  # [Q]: its position in the suffix (the token that predicts an answer word)
    focus_mask: torch.Tensor  # [Q, patches] bool: the patches of the grid cells the answer is read from
    focus_kind: torch.Tensor  # [Q]: index in FOCUS_KINDS (what names the cells, or a count)


def split_prompt(tokenizer, image_tokens: int) -> list[int]:
    """Token ids of the shared prefix `<s> USER: <image>*n` (the question and answer follow it)."""
    ids = tokenizer(prompt("")[: prompt("").index(IMAGE)] + IMAGE * image_tokens)["input_ids"]
    return ids


def sequence_ids(tokenizer, question: str, answer: str) -> tuple[list[int], int]:
    """Suffix ids `question ASSISTANT: answer </s>` and how many of them are prompt (not supervised)."""
    after_image = prompt(question).split(IMAGE, 1)[1]
    prompt_ids = tokenizer(after_image, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(" " + answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt_ids + answer_ids, len(prompt_ids)


PROBE_HEADS: tuple[tuple[str, int], ...] = (
    ("colour", len(COLOURS) + 1),  # 0: the cell is empty
    ("shape", len(SHAPES) + 1),
    ("size", len(SIZES) + 1),
    ("row", GRID),
    ("col", GRID),
    *((f"{kind}_shape", len(SHAPES) + 1) for kind in DIRECTIONS),  # 0: nothing that way
)
# Scene-wide counts, the same on every patch: how many objects of each colour, of each shape, in all.
COUNT_HEADS: tuple[tuple[str, int], ...] = tuple(
    (f"count_{name}", MAX_OBJECTS + 1) for name in (*COLOURS, *SHAPES, "all")
)


def attribute_ids(obj) -> list[int]:
    """1 + the index of the object's colour, shape and size; 0, 0, 0 for no object."""
    if obj is None:
        return [0, 0, 0]
    return [COLOURS.index(obj.colour) + 1, SHAPES.index(obj.shape) + 1, SIZES.index(obj.size) + 1]


def cell_labels(sc) -> np.ndarray:
    """[GRID * GRID, heads] probe targets per grid cell (raster order), in `PROBE_HEADS + COUNT_HEADS` order:
    colour, shape, size of the cell's object (0: empty), the cell's row and column, the shape of the nearest
    object left of, right of, above and below the cell (0: none), as the direction questions define it; then the
    scene's counts (the same in every cell)."""
    counts = [sum(o.colour == c for o in sc.objects) for c in COLOURS]
    counts += [sum(o.shape == s for o in sc.objects) for s in SHAPES] + [len(sc.objects)]
    rows = []
    for row in range(GRID):
        for col in range(GRID):
            around = [neighbour(sc, row, col, kind) for kind in DIRECTIONS]
            around = [0 if n is None else SHAPES.index(n.shape) + 1 for n in around]
            rows.append(attribute_ids(sc.at(row, col)) + [row, col] + around + counts)
    return np.array(rows)


OBJECT_HEADS: tuple[tuple[str, int], ...] = (
    ("object_colour", len(COLOURS) + 1),  # 0: background
    ("object_shape", len(SHAPES) + 1),
    ("object_size", len(SIZES) + 1),
)


def object_labels(sc, patch_size: int, min_pixels: int = 6) -> np.ndarray:
    """[patches, 3]: colour, shape, size of the object covering at least `min_pixels` of each patch (the one
    covering most), 0 for background."""
    grid = sc.owner.shape[0] // patch_size
    owner = sc.owner.reshape(grid, patch_size, grid, patch_size).transpose(0, 2, 1, 3).reshape(grid * grid, -1)
    counts = np.stack([(owner == i).sum(1) for i in range(len(sc.objects))], axis=1)
    best = np.where(counts.max(1) >= min_pixels, counts.argmax(1), -1)
    return np.array([attribute_ids(None)] + [attribute_ids(o) for o in sc.objects])[best + 1]


LABEL_HEADS = PROBE_HEADS + COUNT_HEADS + OBJECT_HEADS  # the columns of `patch_labels`


def patch_labels(sc, image_tokens: int, patch_size: int) -> torch.Tensor:
    """[patches, LABEL_HEADS]: the labels of the grid cell each patch lies in
    (`cell_labels`), then those of the object drawn on the patch (`object_labels`)."""
    cells = cell_labels(sc)[patch_cells(image_tokens, patch_size).numpy()]
    return torch.from_numpy(np.concatenate([cells, object_labels(sc, patch_size)], axis=1)).long()


class PatchProbe(nn.Module):
    """Auxiliary training heads (not exported): linear read-outs of the visual tokens, per patch.

    - From the projector's output (what the decoder gets): what the patch's grid cell holds and where it is
      (`PROBE_HEADS`): the decoder then answers by attending to the right cell and reading it out. With
      `counts`, also the scene's counts (`COUNT_HEADS`) on every patch: a count needs the whole grid at once,
      which one attention read of the decoder does not give, while the tower could pool its cell labels (each
      cell is 36 patches, so a uniform average of them is an exact count). Off by default: see the README.
    - From the output of the vision tower's middle layer: the object drawn on the patch itself (`OBJECT_HEADS`),
      a local target learnt early that the later layers spread over the cell (deep supervision).

    Dense per-patch supervision gets the vision tower to encode objects, positions and neighbours long before
    the answer loss alone would. Forward hooks capture the features."""

    def __init__(self, model, counts: bool = False):
        super().__init__()
        config = model.config
        self.cell_heads = PROBE_HEADS + (COUNT_HEADS if counts else ())
        self.head = nn.Linear(config.text_config.hidden_size, sum(n for _, n in self.cell_heads))
        self.object_head = nn.Linear(config.vision_config.hidden_size, sum(n for _, n in OBJECT_HEADS))
        self.features: torch.Tensor | None = None
        self.middle: torch.Tensor | None = None
        model.model.multi_modal_projector.register_forward_hook(lambda m, a, out: setattr(self, "features", out))
        layers = model.model.vision_tower.encoder.layers
        middle = layers[(len(layers) - 1) // 2]
        middle.register_forward_hook(
            lambda m, a, out: setattr(self, "middle", out[0] if isinstance(out, tuple) else out)
        )

    def loss(self, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Mean cross-entropy over the heads (the count heads together weigh as one) and all patches; some
        accuracies in the stats."""
        features, middle = self.features, self.middle[:, 1:]  # the middle layer still holds [CLS]
        self.features = self.middle = None
        parts = torch.split(self.head(features), [n for _, n in self.cell_heads], -1)
        parts += torch.split(self.object_head(middle), [n for _, n in OBJECT_HEADS], -1)
        label_names = [name for name, _ in LABEL_HEADS]  # the columns of `labels`, whichever heads are on
        terms, count_terms, count_hits, stats = [], [], [], {}
        for (name, _), part in zip(self.cell_heads + OBJECT_HEADS, parts):
            target = labels[..., label_names.index(name)]
            term = F.cross_entropy(part.flatten(0, 1), target.flatten())
            if name.startswith("count_"):
                count_terms.append(term)
                count_hits.append((part.argmax(-1) == target).float().mean().item())
                continue
            terms.append(term)
            if name in ("colour", "shape", "left_of_shape", "object_shape"):
                on = target > 0  # accuracy where there is something to name
                stats[f"probe_{name}"] = (part.argmax(-1) == target)[on].float().mean().item()
        if count_terms:  # the count heads together weigh as one head
            terms.append(torch.stack(count_terms).mean())
            stats["probe_counts"] = sum(count_hits) / len(count_hits)
        return torch.stack(terms).mean(), stats

    def vision_loss(self, model, pixels: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The probe loss from the vision tower and projector alone, without the decoder."""
        model.model.get_image_features(pixel_values=pixels)  # the hooks capture what the heads read
        return self.loss(labels)


def patch_cells(image_tokens: int, patch_size: int) -> torch.Tensor:
    """[patches]: the grid cell (row * GRID + col) holding each patch's centre."""
    side = math.isqrt(image_tokens)
    centres = (torch.arange(side) + 0.5) * patch_size
    index = (centres / (side * patch_size / GRID)).long().clamp(max=GRID - 1)
    return (index[:, None] * GRID + index[None, :]).flatten()


def cells_mask(cells, cell_of_patch: torch.Tensor) -> torch.Tensor:
    """[patches] bool: the patches of the given grid cells."""
    mask = torch.zeros_like(cell_of_patch, dtype=torch.bool)
    for row, col in cells:
        mask |= cell_of_patch == row * GRID + col
    return mask


def make_batch(tokenizer, seeds: list[int], questions: int, caption_weight: float, image_tokens: int,
               patch_size: int = PATCH_SIZE, count_focus: bool = False,
               kind_weights: dict[str, float] | None = None, word_focus: bool = False) -> Batch:  # fmt: skip
    """`questions` distinct questions and (with `caption_weight` > 0) a caption per scene, with the focus
    targets of their answer words; count questions get one (every patch) only with `count_focus`, and the
    colour and shape words of content questions get one (the objects they name) only with `word_focus`.
    `kind_weights` draws some question kinds more often (see `draw_qa`)."""
    prefix = split_prompt(tokenizer, image_tokens)
    scenes = [scene(s) for s in seeds]
    rows, weights, repeats, focus, captions = [], [], [], [], []
    cell_of_patch = patch_cells(image_tokens, patch_size)
    for sc in scenes:
        rng = random.Random(f"train:{sc.seed}")
        seen: set[str] = set()
        options = candidates(sc)
        for _ in range(questions * 4):
            if len(seen) == questions:
                break
            qa = draw_qa(sc, rng, options, kind_weights)
            if qa.question in seen:
                continue
            seen.add(qa.question)
            ids, prompt_len = sequence_ids(tokenizer, qa.question, qa.answer)
            if qa.kind.startswith("count"):  # a count reads every cell, not only the counted ones
                if count_focus:
                    every = torch.ones_like(cell_of_patch, dtype=torch.bool)
                    focus.append((len(rows), prompt_len - 1, every, FOCUS_KINDS.index(COUNT)))
            elif qa.focus:
                kind = POSITION if qa.kind in POSITION_KINDS else CONTENT
                focus.append((len(rows), prompt_len - 1, cells_mask(qa.focus, cell_of_patch), FOCUS_KINDS.index(kind)))
                if word_focus and kind == CONTENT:
                    for t, word in enumerate(tokenizer.convert_ids_to_tokens(ids[:prompt_len])):  # word-level
                        cells = [(o.row, o.col) for o in sc.objects if word in (o.colour, o.shape)]
                        if cells:
                            focus.append((len(rows), t, cells_mask(cells, cell_of_patch), FOCUS_KINDS.index(WORD)))
            rows.append((ids, prompt_len))
            weights.append(1.0)
            captions.append(False)
        n = len(seen)
        if caption_weight > 0:
            ids, prompt_len = sequence_ids(tokenizer, CAPTION_PROMPT, caption(sc))
            at = prompt_len  # "row col size colour shape ," or "row col empty ," per cell
            for row in range(GRID):
                for col in range(GRID):
                    words = 1 if sc.at(row, col) is None else 3
                    for t in range(words):  # the tokens after "row col" are predicted looking at that cell
                        mask = cells_mask([(row, col)], cell_of_patch)
                        focus.append((len(rows), at + 2 + t - 1, mask, FOCUS_KINDS.index(POSITION)))
                    at += 2 + words + 1
            rows.append((ids, prompt_len))
            weights.append(caption_weight)
            captions.append(True)
            n += 1
        repeats.append(n)
    width = max(len(ids) for ids, _ in rows)
    suffix = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels = torch.full((len(rows), width), IGNORE)
    for i, (ids, prompt_len) in enumerate(rows):
        suffix[i, : len(ids)] = torch.tensor(ids)
        labels[i, prompt_len : len(ids)] = torch.tensor(ids[prompt_len:])
    return Batch(
        prefix_ids=torch.tensor([prefix]),
        pixel_values=pixel_values([sc.image for sc in scenes]),
        repeats=torch.tensor(repeats),
        suffix_ids=suffix,
        labels=labels,
        weights=torch.tensor(weights),
        is_caption=torch.tensor(captions, dtype=torch.bool),
        pad_id=tokenizer.pad_token_id,
        patch_labels=torch.stack([patch_labels(sc, image_tokens, patch_size) for sc in scenes]),
        image_start=prefix.index(tokenizer.convert_tokens_to_ids(IMAGE)),
        focus_rows=torch.tensor([f[0] for f in focus], dtype=torch.long),
        focus_pos=torch.tensor([f[1] for f in focus], dtype=torch.long),
        focus_mask=torch.stack([f[2] for f in focus]) if focus else torch.zeros(0, image_tokens, dtype=torch.bool),
        focus_kind=torch.tensor([f[3] for f in focus], dtype=torch.long),
    )


def rotate_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


@dataclasses.dataclass(frozen=True)
class FocusHeads:
    """The heads of one decoder layer that learn one kind of lookup (see `packed_logits`)."""

    layer: int
    heads: slice
    uniform: bool = False  # spread evenly over the target patches, instead of merely landing on them


def focus_heads_for(
    focus_layer: int | None, focus_heads: int, count_layer: int | None = None, word: bool = False
) -> dict[int, FocusHeads]:
    """FOCUS_KINDS index -> heads: in `focus_layer`, heads [0, focus_heads) for lookups by position and the next
    `focus_heads` for lookups by content (with `word`, also from the question's colour and shape words); with
    `count_layer`, head 0 of that layer for counts."""
    plan = {}
    if focus_layer is not None:
        plan[FOCUS_KINDS.index(POSITION)] = FocusHeads(focus_layer, slice(0, focus_heads))
        plan[FOCUS_KINDS.index(CONTENT)] = FocusHeads(focus_layer, slice(focus_heads, 2 * focus_heads))
        if word:  # the content heads, queried at the colour and shape words of the question
            plan[FOCUS_KINDS.index(WORD)] = plan[FOCUS_KINDS.index(CONTENT)]
    if count_layer is not None:
        if count_layer == focus_layer:
            raise ValueError(f"the count head needs a layer of its own, not the focus layer {focus_layer}")
        plan[FOCUS_KINDS.index(COUNT)] = FocusHeads(count_layer, slice(0, 1), uniform=True)
    return plan


def focus_plan(flags: dict, spec: ScenesSpec) -> dict[int, FocusHeads]:
    """The trainer's flags (as parsed, or as saved in a checkpoint) -> `focus_heads_for`'s plan; {} without the
    focus loss. A focus layer of -1 is the middle layer, a count layer of -1 none; ValueError names the flag."""
    if flags["focus_weight"] <= 0:
        if flags["count_layer"] >= 0:
            raise ValueError("--count-layer needs the focus loss on (--focus-weight > 0)")
        return {}
    focus_layer = flags["focus_layer"] if flags["focus_layer"] >= 0 else spec.text_layers // 2
    count_layer = flags["count_layer"] if flags["count_layer"] >= 0 else None
    if not all(0 <= layer < spec.text_layers for layer in (focus_layer, count_layer) if layer is not None):
        raise ValueError(f"--focus-layer and --count-layer must be in [0, {spec.text_layers})")
    word = flags.get("word_focus", False)  # checkpoints from before --word-focus lack the flag
    return focus_heads_for(focus_layer, flags["focus_heads"], count_layer, word=word)


def head_attention(
    language_model,
    layer: int,
    heads: slice,
    q: torch.Tensor,
    keys: torch.Tensor,
    positions: torch.Tensor,
    allowed: torch.Tensor,
) -> torch.Tensor:
    """Attention probabilities [Q, h, K] of `heads` of decoder `layer`, recomputed from q_proj's output rows
    q [Q, heads * D] (not yet rotated) at absolute `positions` [Q] over one sequence's cached keys
    [kv, K, D], each query seeing the keys `allowed` [Q, K] to it."""
    attention = language_model.layers[layer].self_attn
    n_heads = attention.config.num_attention_heads
    q = q.view(len(q), n_heads, attention.head_dim)[:, heads]
    cos, sin = rotary(language_model.rotary_emb, q, positions[:, None])
    q = rotate_half(q, cos, sin)  # cos, sin [Q, 1, D] broadcast over heads
    kv_of_head = torch.arange(n_heads)[heads] // (n_heads // keys.shape[0])
    scores = torch.einsum("qhd,hkd->qhk", q, keys[kv_of_head]) * attention.scaling
    return scores.masked_fill(~allowed[:, None], float("-inf")).softmax(-1)


def packed_logits(
    model, batch: Batch, focus: dict[int, FocusHeads] | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits [N, S, V] of the suffixes, each continuing its scene's prefix, from one forward pass of the stock
    model over packed sequences: one per scene, its prefix followed by all its suffixes back to back, with a block
    mask (each suffix sees the prefix and itself, causally) and position ids that restart after the prefix for
    every suffix. This is the same function as running each (prefix, suffix) sequence on its own, without
    running the prefix more than once or copying its keys and values per suffix.

    With `focus` (see `focus_heads_for`), also the focus loss: for each supervised query (the token that predicts an
    answer word), the attention of its kind's heads, recomputed from the query row and the layer's cached keys,
    should fall on the patches of the grid cells the answer is read from; the loss term of a query is -log(attention
    mass there), returned per query by kind (`FOCUS_KINDS` names; `focus_loss_of` averages them).
    Heads [0, focus_heads) of the focus layer take the queries that name a cell by its position (captions, "what is
    at the top left?"), the next `focus_heads` those that name it by what it holds ("what colour is the star?"):
    both kinds of match must fit in the few rotary dimensions that turn slowly enough to ignore distance, so each
    gets its own heads. It teaches the decoder where to look, which the answer loss alone teaches only after a long
    plateau.

    With word targets in the batch (`make_batch(word_focus=True)`, kind "word"), the content heads are also
    queried at each colour or shape word of a content question and should fall on the objects of that colour
    or shape. The word's own embedding carries the attribute, so this match can form before the answer
    position has gathered the words; without it, the content heads of some runs settle on every object evenly
    (a focus loss near 1.33) and stay there.

    With a count layer (and count queries in the batch, see `make_batch`), head 0 of that layer learns to
    spread its attention evenly over all the patches when a count is asked (loss: KL(uniform || attention)):
    each grid cell is the same number of patches, so that head's read-out is the scene's make-up, and a count
    is one linear step away, where otherwise the decoder would have to gather up to six cells.
    """
    images, width_prefix = batch.pixel_values.shape[0], batch.prefix_ids.shape[1]
    lengths = (batch.suffix_ids != batch.pad_id).sum(1).tolist()
    owner = torch.arange(images).repeat_interleave(batch.repeats).tolist()
    ends = [width_prefix] * images
    starts = []
    for row, scene_index in enumerate(owner):  # where each suffix starts in its scene's packed sequence
        starts.append(ends[scene_index])
        ends[scene_index] += lengths[row]
    total = max(ends)
    ids = torch.full((images, total), batch.pad_id)
    ids[:, :width_prefix] = batch.prefix_ids
    positions = torch.zeros(images, total, dtype=torch.long)
    positions[:, :width_prefix] = torch.arange(width_prefix)
    allowed = torch.zeros(images, total, total, dtype=torch.bool)
    allowed[:, :width_prefix, :width_prefix] = torch.ones(width_prefix, width_prefix, dtype=torch.bool).tril()
    allowed[:, torch.arange(total), torch.arange(total)] = True  # padding rows see themselves (no empty softmax)
    gather = torch.zeros(batch.suffix_ids.shape, dtype=torch.long)  # packed index of suffix token (row, i)
    for row, (scene_index, start, n) in enumerate(zip(owner, starts, lengths)):
        span = slice(start, start + n)
        ids[scene_index, span] = batch.suffix_ids[row, :n]
        positions[scene_index, span] = torch.arange(width_prefix, width_prefix + n)
        allowed[scene_index, span, :width_prefix] = True
        allowed[scene_index, span, span] = torch.ones(n, n, dtype=torch.bool).tril()
        gather[row, :n] = scene_index * total + torch.arange(start, start + n)
    plan = focus if focus and len(batch.focus_rows) else {}
    language_model = model.model.language_model
    captured: dict[int, torch.Tensor] = {}
    hooks = [
        language_model.layers[layer].self_attn.q_proj.register_forward_hook(
            lambda m, a, out, layer=layer: captured.__setitem__(layer, out)
        )
        for layer in {heads.layer for heads in plan.values()}
    ]
    cache = DynamicCache(config=model.config.text_config)
    try:
        out = model(input_ids=ids, pixel_values=batch.pixel_values, attention_mask=allowed[:, None],
                    position_ids=positions, use_cache=True, **cache_kwargs(cache))  # fmt: skip
    finally:
        for hook in hooks:
            hook.remove()
    logits = out.logits.flatten(0, 1)[gather]  # [N, S, V]; entries past a row's length are never supervised
    focus_terms = {}
    for kind, heads in plan.items():
        pick = (batch.focus_kind == kind).nonzero().flatten()
        if len(pick) == 0:
            continue
        at = gather[batch.focus_rows[pick], batch.focus_pos[pick]]  # packed index of each query
        scene_of_query = at // total
        queries = captured[heads.layer].flatten(0, 1)[at]
        image = torch.cat([
            head_attention(language_model, heads.layer, heads.heads, queries[on], cache.layers[heads.layer].keys[b],
                           width_prefix + batch.focus_pos[pick][on], allowed[b, at[on] % total])
            for b in range(images) if (on := scene_of_query == b).any()
        ])[..., batch.image_start : batch.image_start + batch.focus_mask.shape[1]]  # fmt: skip
        order = torch.cat([(scene_of_query == b).nonzero().flatten() for b in range(images)])
        mask = batch.focus_mask[pick][order][:, None]  # [Q, 1, patches], in the scene order of `image`
        if heads.uniform:  # KL(uniform over the mask || attention)
            n = mask.sum(-1)
            terms = -((image + 1e-9).log() * mask).sum(-1) / n - n.log()
        else:
            terms = -((image * mask).sum(-1) + 1e-6).log()
        focus_terms[FOCUS_KINDS[kind]] = terms.flatten()
    return logits, focus_terms


def focus_loss_of(focus_terms: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The focus loss: the mean over every supervised query of every kind (None without any)."""
    return torch.cat(list(focus_terms.values())).mean() if focus_terms else None


def loss_of(logits: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, dict]:
    """Weighted mean over sequences of each sequence's mean answer-token cross-entropy."""
    # logits[:, i] predicts token i+1
    targets = batch.labels[:, 1:]
    token_loss = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), targets, ignore_index=IGNORE, reduction="none")
    mask = (targets != IGNORE).float()
    per_seq = (token_loss * mask).sum(1) / mask.sum(1).clamp(min=1)
    loss = (per_seq * batch.weights).sum() / batch.weights.sum()
    is_caption = batch.is_caption
    stats = {"loss": loss.item()}
    if is_caption.any():
        stats["caption_loss"] = per_seq[is_caption].mean().item()
    if (~is_caption).any():
        stats["qa_loss"] = per_seq[~is_caption].mean().item()
    return loss, stats


def lr_at(step: int, total: int, peak: float, warmup: int, floor: float = 0.05) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


RUN_ONLY_FLAGS = {"out", "export", "stop_at", "threads", "eval_every", "eval_qa", "eval_captions", "export_only"}
"""Flags that say where and how often, not what is trained: a resume may change them without notice."""


def changed_flags(saved: dict, now: dict) -> str:
    """The training flags a resumed run changes, as `--name old -> new, ...` ('' when none): a resume that
    changes the recipe is allowed (experiments branch from checkpoints) but said, since the run is then a mix."""
    names = sorted((set(saved) | set(now)) - RUN_ONLY_FLAGS)
    return ", ".join(
        f"--{name.replace('_', '-')} {saved.get(name)!r} -> {now.get(name)!r}"
        for name in names
        if saved.get(name) != now.get(name)
    )


def save_checkpoint(path: Path, model, probe, optimizer, step: int, args: dict, spec: ScenesSpec) -> None:
    tmp = path.with_suffix(".tmp")
    state = {
        "model": model.state_dict(),
        "probe": probe.state_dict() if probe is not None else None,
        "optimizer": optimizer.state_dict(),
        "step": step,
        "args": args,
        "spec": dataclasses.asdict(spec),
        "torch_rng": torch.get_rng_state(),
    }
    torch.save(state, tmp)
    os.replace(tmp, path)


def export(model, processor, directory: str) -> None:
    Path(directory).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)


def json_object(flag: str, text: str) -> dict:
    """A flag's JSON value, which must be an object; anything else stops with a message naming the flag."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise SystemExit(f"{flag}: not valid JSON ({error}): {text!r}") from error
    if not isinstance(value, dict):
        raise SystemExit(f"{flag}: expected a JSON object such as '{{\"name\": value}}', got {text!r}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/scenes", help="checkpoint and log directory")
    p.add_argument("--export", default="scenes/st3_scenes/assets/scenes-llava",
                   help="save_pretrained target at the end")  # fmt: skip
    p.add_argument("--steps", type=int, default=5000, help="total steps, the vision phase included")
    p.add_argument("--vision-steps", type=int, default=1000, help="first steps: vision tower + patch probe only")
    p.add_argument("--vision-images", type=int, default=16, help="scenes per vision-phase step")
    p.add_argument("--images", type=int, default=4, help="scenes per step")
    p.add_argument("--questions", type=int, default=24, help="distinct questions per scene")
    p.add_argument("--caption-weight", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-fraction", type=float, default=0.05)
    p.add_argument("--vision-lr-scale", type=float, default=0.3, help="vision tower's lr factor after the vision phase")
    p.add_argument("--warmup", type=int, default=150)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--aux-weight", type=float, default=1.0, help="weight of the per-patch probe loss (0: off)")
    p.add_argument(
        "--word-focus",
        action="store_true",
        help="the content heads also look, at each colour or shape word of a question, at the objects it names",
    )
    p.add_argument("--count-probes", action="store_true", help="also probe the scene's counts on every patch")
    p.add_argument("--focus-weight", type=float, default=1.0, help="weight of the attention focus loss (0: off)")
    p.add_argument("--focus-layer", type=int, default=-1, help="decoder layer of the focus loss (-1: the middle)")
    p.add_argument("--focus-heads", type=int, default=2, help="heads of that layer the focus loss applies to")
    p.add_argument(
        "--count-layer",
        type=int,
        default=-1,
        help="decoder layer (not the focus layer) whose head 0 learns to attend evenly over the image for count "
        "questions, under the focus weight (-1: off)",
    )
    p.add_argument(
        "--stop-at",
        type=int,
        default=0,
        help="checkpoint and stop at this step without exporting; a later run resumes (0: run to --steps)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval-every", type=int, default=400)
    p.add_argument("--eval-qa", type=int, default=200)
    p.add_argument("--eval-captions", type=int, default=40)
    p.add_argument("--checkpoint-minutes", type=float, default=5.0)
    p.add_argument("--export-only", action="store_true", help="export the checkpoint in --out and stop")
    p.add_argument("--spec", default="{}", help="ScenesSpec overrides as JSON, e.g. '{\"text_hidden\": 192}'")
    p.add_argument(
        "--kind-weights",
        default="{}",
        help="question kinds drawn more (or less) often, as JSON, e.g. '{\"count_colour\": 3}' (others weigh 1)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoint.pt"
    log_path = out / "log.jsonl"

    spec_fields = json_object("--spec", args.spec)
    if unknown := sorted(set(spec_fields) - {field.name for field in dataclasses.fields(ScenesSpec)}):
        raise SystemExit(f"--spec: unknown fields {unknown}; ScenesSpec has {list(dataclasses.asdict(ScenesSpec()))}")
    spec = ScenesSpec(**spec_fields)
    kind_weights = json_object("--kind-weights", args.kind_weights)
    if unknown := sorted(set(kind_weights) - set(KINDS)):
        raise SystemExit(f"--kind-weights: unknown kinds {unknown}; the kinds are {list(KINDS)}")
    if any(not isinstance(w, (int, float)) or w < 0 for w in kind_weights.values()):
        raise SystemExit("--kind-weights: weights must be numbers >= 0")
    if kind_weights and not any(kind_weights.get(kind, 1.0) for kind in ALWAYS_ASKED):
        raise SystemExit(
            f"--kind-weights: give one of {list(ALWAYS_ASKED)} a weight > 0; every scene has questions of these "
            "kinds, only some scenes have the others, and each scene needs a kind to draw from"
        )
    model = build_scenes_model(spec, seed=args.seed)
    model.train()
    processor = build_processor(spec.image_size, spec.patch_size)
    tokenizer = processor.tokenizer
    try:  # checked now, not after the vision phase
        focus = focus_plan(vars(args), spec)
    except ValueError as error:
        raise SystemExit(str(error)) from error
    probe = PatchProbe(model, args.count_probes) if args.aux_weight > 0 or args.vision_steps > 0 else None
    named = list(model.named_parameters()) + (list(probe.named_parameters()) if probe else [])
    groups = []
    for vision in (True, False):  # the vision tower's learning rate is scaled down once the decoder trains
        for decay in (True, False):
            params = [
                p for n, p in named if ("vision_tower" in n) == vision and (p.ndim >= 2 and "embed" not in n) == decay
            ]
            groups.append({"params": params, "weight_decay": args.weight_decay if decay else 0.0, "vision": vision})
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.98))
    step = 0
    if ckpt_path.exists():
        state = torch.load(ckpt_path, weights_only=False)
        if ScenesSpec(**state["spec"]) != spec:  # fields added since take their defaults
            raise SystemExit(f"{ckpt_path} was made with spec {state['spec']}, not {dataclasses.asdict(spec)}")
        model.load_state_dict(state["model"])
        if probe is not None:
            probe.load_state_dict(state["probe"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        step = state["step"]
        saved = vars(parse_args([])) | state["args"]  # flags added since take their defaults, as spec fields do
        changed = changed_flags(saved, vars(args))
        note = f"; flags changed since: {changed}" if changed else ""
        print(f"resumed from {ckpt_path} at step {step}{note}", flush=True)
    print(f"model: {parameter_count(model) / 1e6:.2f}M parameters, spec {dataclasses.asdict(spec)}", flush=True)
    if args.export_only:  # the checkpoint as it stands (best so far), without training on
        model.eval()
        export(model, processor, args.export)
        print(f"saved the step-{step} model and processor to {args.export}", flush=True)
        return {"step": step}

    train_start, train_end = SPLITS["train"]
    last_save = time.time()
    running: dict[str, float] = {}
    bar = tqdm(total=args.steps, initial=step, dynamic_ncols=True, mininterval=2.0)
    step_times: list[float] = []
    stop = min(args.steps, args.stop_at) if args.stop_at else args.steps
    while step < stop:
        t0 = time.time()
        if step < args.vision_steps:  # phase 1: the vision tower and probe alone, on many images per step
            lr = lr_at(step, 10**9, args.lr, args.warmup)  # warm-up, then constant
            seeds = [train_end - 1 - (step * args.vision_images + j) % (train_end - train_start)
                     for j in range(args.vision_images)]  # fmt: skip
            scenes = [scene(s) for s in seeds]
            labels = torch.stack([patch_labels(sc, spec.image_tokens, spec.patch_size) for sc in scenes])
            loss, stats = probe.vision_loss(model, pixel_values([sc.image for sc in scenes]), labels)
            stats["aux_loss"] = loss.item()
        else:  # phase 2: everything
            lm_step = step - args.vision_steps
            lr = lr_at(lm_step, args.steps - args.vision_steps, args.lr, args.warmup, args.min_lr_fraction)
            seeds = [train_start + (lm_step * args.images + j) % (train_end - train_start) for j in range(args.images)]
            batch = make_batch(
                tokenizer,
                seeds,
                args.questions,
                args.caption_weight,
                spec.image_tokens,
                spec.patch_size,
                count_focus=FOCUS_KINDS.index(COUNT) in focus,
                word_focus=FOCUS_KINDS.index(WORD) in focus,
                kind_weights=kind_weights,
            )
            logits, focus_terms = packed_logits(model, batch, focus=focus)
            loss, stats = loss_of(logits, batch)
            if focus_terms:  # each kind apart too: one lookup can stall while the others converge
                focus_loss = focus_loss_of(focus_terms)
                stats["focus_loss"] = focus_loss.item()
                stats |= {f"focus_{kind}": terms.mean().item() for kind, terms in focus_terms.items()}
                loss = loss + args.focus_weight * focus_loss
            if probe is not None and args.aux_weight > 0:
                aux, probe_stats = probe.loss(batch.patch_labels)
                stats |= {"aux_loss": aux.item()} | probe_stats
                loss = loss + args.aux_weight * aux
        for group in optimizer.param_groups:
            scaled = group["vision"] and step >= args.vision_steps
            group["lr"] = lr * (args.vision_lr_scale if scaled else 1.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_([p for _, p in named], 1.0).item()
        optimizer.step()
        step += 1
        step_times.append(time.time() - t0)
        for k, v in stats.items():
            running[k] = v if k not in running else 0.98 * running[k] + 0.02 * v
        bar.update(1)
        bar.set_postfix({k: f"{v:.3f}" for k, v in running.items()} | {"lr": f"{lr:.1e}"}, refresh=False)
        record = None
        if step % 50 == 0:
            recent = step_times[-50:]
            record = {"step": step, "lr": lr, "grad_norm": round(grad_norm, 3)}
            record |= {k: round(v, 4) for k, v in running.items()}
            record["step_seconds"] = round(sum(recent) / len(recent), 3)
        if step > args.vision_steps and (step % args.eval_every == 0 or step == args.steps):
            t_eval = time.time()
            from st3_scenes.evaluate import accuracy

            result = accuracy(model, processor, "validation", args.eval_qa, args.eval_captions)
            record = (record or {"step": step}) | {k: v for k, v in result.items() if k != "caption_samples"}
            record["eval_seconds"] = round(time.time() - t_eval, 1)
            tqdm.write(
                f"step {step}: validation QA {result.get('qa_accuracy', 0):.3f}, "
                f"captions {result.get('caption_exact', 0):.3f}; {result.get('caption_samples', [])[:1]}"
            )
        if record is not None:
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if time.time() - last_save > args.checkpoint_minutes * 60 or step == stop:
            save_checkpoint(ckpt_path, model, probe, optimizer, step, vars(args), spec)
            last_save = time.time()
    bar.close()
    if step < args.steps:
        print(f"stopped at step {step} (--stop-at); the checkpoint is in {ckpt_path}", flush=True)
        return {"step": step}
    model.eval()
    export(model, processor, args.export)
    print(f"saved model and processor to {args.export}", flush=True)
    return {"step": step}


if __name__ == "__main__":
    main()
