"""The scenes data: generator, questions, captions, splits, processor and model config (fast, no weights)."""

from __future__ import annotations

import hashlib
import math
import random
import re

import pytest
import torch

from st3_scenes.processor import IMAGE, build_processor, pixel_values, prompt
from st3_scenes.scenes import COLOURS, COLS, GRID, IMAGE_SIZE, MAX_OBJECTS, MIN_OBJECTS, ROWS, SHAPES, SIZES, scene
from st3_scenes.tasks import (
    ALWAYS_ASKED,
    CAPTION_PROMPT,
    KINDS,
    NOTHING,
    NUMBERS,
    PLURALS,
    SPLITS,
    candidates,
    caption,
    draw_qa,
    example,
    parse_caption,
    words,
)


def digest(sc) -> str:
    return hashlib.sha256(sc.image.tobytes()).hexdigest()


def test_scene_is_a_function_of_the_seed():
    for seed in (0, 7, 1_000_123):
        a, b = scene(seed), scene(seed)
        assert a.objects == b.objects
        assert digest(a) == digest(b)
    assert digest(scene(1)) != digest(scene(2))


def test_scene_contents():
    for seed in range(200):
        sc = scene(seed)
        assert sc.image.mode == "RGB" and sc.image.size == (IMAGE_SIZE, IMAGE_SIZE)
        assert MIN_OBJECTS <= len(sc.objects) <= MAX_OBJECTS
        cells = [(o.row, o.col) for o in sc.objects]
        assert len(set(cells)) == len(cells), "one object per cell"
        assert cells == sorted(cells), "reading order"
        for o in sc.objects:
            assert o.shape in SHAPES and o.colour in COLOURS and o.size in SIZES
            assert 0 <= o.row < GRID and 0 <= o.col < GRID


def test_background_is_not_flat():
    sc = scene(3)
    pixels = torch.tensor(list(sc.image.get_flattened_data()), dtype=torch.float32).view(IMAGE_SIZE, IMAGE_SIZE, 3)
    empty = [(r, c) for r in range(GRID) for c in range(GRID) if sc.at(r, c) is None]
    assert empty
    r, c = empty[0]
    cell = pixels[r * 42 + 4 : r * 42 + 38, c * 42 + 4 : c * 42 + 38]
    assert cell.std() > 3, "background patches carry texture and noise"


def test_splits_are_disjoint_and_differ():
    ranges = sorted(SPLITS.values())
    for (_, end), (start, _) in zip(ranges, ranges[1:]):
        assert end <= start
    seeds = {split: example(split, 0).seed for split in SPLITS}
    assert len(set(seeds.values())) == len(SPLITS)
    assert digest(example("train", 0).scene) != digest(example("test", 0).scene)
    assert digest(example("validation", 5).scene) != digest(example("test", 5).scene)
    with pytest.raises(IndexError):
        example("validation", SPLITS["validation"][1] - SPLITS["validation"][0])


def test_examples_are_deterministic():
    for split in SPLITS:
        for n in (0, 1, 17):
            a, b = example(split, n, "mixed"), example(split, n, "mixed")
            assert (a.seed, a.task, a.kind, a.question, a.answer) == (b.seed, b.task, b.kind, b.question, b.answer)


def reference_answer(objects, question: str) -> str:
    """An independent reading of each question template against the object list."""
    pos = {f"{ROWS[r]} {COLS[c]}": (r, c) for r in range(GRID) for c in range(GRID)}
    shape_of_plural = {v: k for k, v in PLURALS.items()}

    def at(r, c):
        hits = [o for o in objects if (o.row, o.col) == (r, c)]
        assert len(hits) <= 1
        return hits[0] if hits else None

    def only(pred):
        hits = [o for o in objects if pred(o)]
        assert len(hits) == 1, f"{question!r} is ambiguous or about nothing"
        return hits[0]

    if m := re.fullmatch(r"what colour is the (small |large )?(\w+)\?", question):
        size = m.group(1).strip() if m.group(1) else None
        return only(lambda o: o.shape == m.group(2) and size in (None, o.size)).colour
    if m := re.fullmatch(r"what shape is the (\w+) object\?", question):
        return only(lambda o: o.colour == m.group(1)).shape
    if m := re.fullmatch(r"what size is the (\w+) (\w+)\?", question):
        return only(lambda o: (o.colour, o.shape) == m.groups()).size
    if m := re.fullmatch(r"what is at the (\w+ \w+)\?", question):
        o = at(*pos[m.group(1)])
        return NOTHING if o is None else o.shape
    if m := re.fullmatch(r"what colour is the object at the (\w+ \w+)\?", question):
        return at(*pos[m.group(1)]).colour
    if m := re.fullmatch(r"how many (\w+) objects are there\?", question):
        return NUMBERS[sum(o.colour == m.group(1) for o in objects)]
    if question == "how many objects are there?":
        return NUMBERS[len(objects)]
    if m := re.fullmatch(r"how many (\w+) are there\?", question):
        return NUMBERS[sum(o.shape == shape_of_plural[m.group(1)] for o in objects)]
    if m := re.fullmatch(r"what is (left of|right of|above|below) the (\w+) (\w+)\?", question):
        ref = only(lambda o: (o.colour, o.shape) == m.group(2, 3))
        dr, dc = {"left of": (0, -1), "right of": (0, 1), "above": (-1, 0), "below": (1, 0)}[m.group(1)]
        # every object in that direction, in the same row/column; the nearest one counts
        line = [o for o in objects if (o.row - ref.row) * (1 - abs(dr)) == 0 and (o.col - ref.col) * (1 - abs(dc)) == 0]
        ahead = [o for o in line if (o.row - ref.row) * dr + (o.col - ref.col) * dc > 0]
        if not ahead:
            return NOTHING
        return min(ahead, key=lambda o: abs(o.row - ref.row) + abs(o.col - ref.col)).shape
    if m := re.fullmatch(r"is there an? (\w+) (\w+)\?", question):
        return "yes" if any((o.colour, o.shape) == m.groups() for o in objects) else "no"
    if m := re.fullmatch(r"is there an object at the (\w+ \w+)\?", question):
        return "no" if at(*pos[m.group(1)]) is None else "yes"
    raise AssertionError(f"unknown question {question!r}")


def test_every_candidate_question_is_answerable_from_the_objects():
    for seed in range(150):
        sc = scene(seed)
        for kind, pool in candidates(sc).items():
            assert kind in KINDS
            for qa in pool:
                assert reference_answer(sc.objects, qa.question) == qa.answer, (seed, qa)


def test_drawn_questions_cover_kinds_and_balance_yes_no():
    kinds, yes_no = set(), []
    for n in range(600):
        e = example("train", n)
        kinds.add(e.kind)
        assert reference_answer(e.scene.objects, e.question) == e.answer
        assert len(e.answer.split()) == 1
        if e.kind == "exists":
            yes_no.append(e.answer == "yes")
    assert kinds == set(KINDS)
    assert 0.35 < sum(yes_no) / len(yes_no) < 0.65


def test_drawing_from_precomputed_candidates_draws_the_same_questions():
    for seed in (3, 40, 1_000_007):
        sc = scene(seed)
        options = candidates(sc)
        plain, shortcut = random.Random(seed), random.Random(seed)
        assert [draw_qa(sc, plain) for _ in range(30)] == [draw_qa(sc, shortcut, options) for _ in range(30)]


def test_kind_weights_shift_the_draw_towards_the_weighted_kinds():
    sc = next(s for s in map(scene, range(100)) if {"count_colour", "size_of"} <= set(candidates(s)))
    one_kind = {k: 0.0 for k in KINDS} | {"count_colour": 1.0}
    only = [draw_qa(sc, random.Random(i), kind_weights=one_kind) for i in range(50)]
    assert {qa.kind for qa in only} == {"count_colour"}
    rng_plain, rng_heavy = random.Random(0), random.Random(0)
    plain = [draw_qa(sc, rng_plain).kind for _ in range(2000)]
    heavy = [draw_qa(sc, rng_heavy, kind_weights={"count_colour": 5.0}).kind for _ in range(2000)]
    assert heavy.count("count_colour") > 3 * plain.count("count_colour")
    assert heavy.count("size_of") < plain.count("size_of")


def test_every_scene_allows_the_always_asked_kinds_and_all_zero_weights_are_refused():
    assert all(set(ALWAYS_ASKED) <= set(candidates(scene(seed))) for seed in range(300))
    sc = scene(0)
    zero = dict.fromkeys(candidates(sc), 0.0)
    with pytest.raises(ValueError, match="a weight of 0"):
        draw_qa(sc, random.Random(0), kind_weights=zero)


def test_caption_round_trip():
    for seed in range(100):
        sc = scene(seed)
        text = caption(sc)
        assert parse_caption(text) == list(sc.objects)
    e = example("test", 3, "caption")
    assert e.question == CAPTION_PROMPT and parse_caption(e.answer) == list(e.scene.objects)
    assert parse_caption("large red star at top") is None
    cells = caption(scene(4)).split(", ")
    assert len(cells) == GRID * GRID and cells[0].startswith("top left ") and cells[-1].startswith("bottom right ")
    assert parse_caption(", ".join(cells[1:])) is None, "every cell must be described"
    assert parse_caption(", ".join([cells[1], cells[0], *cells[2:]])) is None, "in reading order"


def test_vocabulary_covers_every_text():
    tokenizer = build_processor().tokenizer
    vocab = set(words())
    rng = random.Random(0)
    for seed in range(100):
        sc = scene(seed)
        texts = [caption(sc), CAPTION_PROMPT] + [f"{qa.question} {qa.answer}" for qa in [draw_qa(sc, rng)] * 3]
        for text in texts:
            assert set(re.findall(r"\w+|[^\w\s]", text)) <= vocab
            assert tokenizer.unk_token_id not in tokenizer(text)["input_ids"]
            assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


@pytest.fixture(scope="module")
def saved_processor(tmp_path_factory):
    from transformers import AutoProcessor

    directory = tmp_path_factory.mktemp("processor")
    build_processor().save_pretrained(directory)
    return AutoProcessor.from_pretrained(directory)


def test_processor_loads_expands_image_tokens_and_left_pads(saved_processor):
    processor = saved_processor
    assert type(processor).__name__ == "LlavaProcessor"
    assert processor.tokenizer.padding_side == "left"
    short, long = example("test", 0), example("test", 1, "caption")
    batch = processor(
        images=[short.image, long.image],
        text=[prompt(short.question), prompt(long.question) + " " + long.answer],
        return_tensors="pt",
        padding=True,
    )
    image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE)
    assert (batch["input_ids"] == image_id).sum(1).tolist() == [324, 324]
    assert batch["pixel_values"].shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    mask = batch["attention_mask"]
    assert mask[0, 0] == 0 and mask[0, -1] == 1 and mask[1].all(), "left padding"
    assert batch["input_ids"][0, 0] == processor.tokenizer.pad_token_id
    first = int(mask[0].argmax())
    assert batch["input_ids"][0, first] == processor.tokenizer.bos_token_id
    prompt_tokens = int(mask[0].sum())
    assert 324 / prompt_tokens >= 0.8, "visual tokens are at least 80% of a QA prompt"
    # the training fast path makes the same pixels as the image processor
    assert torch.allclose(pixel_values([short.image, long.image]), batch["pixel_values"], atol=1e-6)
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": short.question}]}]
    assert processor.apply_chat_template(chat, add_generation_prompt=True) == prompt(short.question)


def test_tiny_model_round_trips_through_from_pretrained(tmp_path, saved_processor):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from st3.compat import LOAD_KWARGS  # transformers' own layers (5.25 kernelizes by default)
    from st3_scenes.model import ScenesSpec, build_scenes_model

    spec = ScenesSpec(vision_hidden=32, vision_layers=1, vision_heads=2, text_hidden=32, text_layers=2,
                     text_heads=4, text_kv_heads=2, text_intermediate=64, rope_theta=1e6, text_head_dim=16)  # fmt: skip
    model = build_scenes_model(spec).eval()
    model.save_pretrained(tmp_path)
    build_processor().save_pretrained(tmp_path)
    loaded = LlavaForConditionalGeneration.from_pretrained(tmp_path, **LOAD_KWARGS).eval()
    processor = AutoProcessor.from_pretrained(tmp_path)
    assert loaded.config.image_seq_length == 324 == spec.image_tokens
    assert loaded.config.text_config.rope_parameters["rope_theta"] == 1e6
    assert loaded.model.language_model.layers[0].self_attn.head_dim == 16  # not 32 // 4
    e = example("validation", 0)
    inputs = processor(images=e.image, text=prompt(e.question), return_tensors="pt")
    with torch.no_grad():
        a = model(**inputs).logits
        b = loaded(**inputs).logits
    torch.testing.assert_close(a, b)
    out = loaded.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert out.shape[1] <= inputs["input_ids"].shape[1] + 2


TRAINING_SPEC = dict(vision_hidden=32, vision_layers=1, vision_heads=2, text_hidden=32, text_layers=2, text_heads=4,
                     text_kv_heads=2, text_intermediate=64)  # fmt: skip


def run_one_by_one(
    model, batch, count_layer: int | None = None, focus_layer: int = 1
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The reference for `packed_logits`: every (prefix, suffix) sequence run on its own through the eager model,
    giving its logits (zero past its length) and the focus loss terms by kind, read from `output_attentions`, for
    the heads `focus_heads_for(focus_layer, 2, count_layer)` assigns: position heads 0-1 and content heads 2-3 of
    the focus layer, and head 0 of the count layer."""
    from st3_scenes.train import FOCUS_KINDS

    model.set_attn_implementation("eager")
    width, patches = batch.prefix_ids.shape[1], batch.focus_mask.shape[1]
    where = {
        "position": (focus_layer, slice(0, 2)),
        "content": (focus_layer, slice(2, 4)),
        "count": (count_layer, slice(0, 1)),
        "word": (focus_layer, slice(2, 4)),
    }
    scene_of_row = torch.arange(len(batch.repeats)).repeat_interleave(batch.repeats).tolist()
    logits, outputs = [], []
    for row, scene_index in enumerate(scene_of_row):
        n = int((batch.suffix_ids[row] != batch.pad_id).sum())
        ids = torch.cat([batch.prefix_ids[0], batch.suffix_ids[row, :n]])[None]
        out = model(input_ids=ids, pixel_values=batch.pixel_values[scene_index : scene_index + 1],
                    output_attentions=True)  # fmt: skip
        outputs.append(out)
        row_logits = out.logits[0, width:]
        logits.append(torch.cat([row_logits, row_logits.new_zeros(batch.suffix_ids.shape[1] - n, row_logits.shape[1])]))
    terms: dict[str, list[torch.Tensor]] = {}
    for row, pos, mask, kind in zip(batch.focus_rows.tolist(), batch.focus_pos.tolist(), batch.focus_mask,
                                    batch.focus_kind.tolist()):  # fmt: skip
        layer, heads = where[FOCUS_KINDS[kind]]
        attention = outputs[row].attentions[layer][0, heads, width + pos]  # [heads, keys]
        image = attention[:, batch.image_start : batch.image_start + patches]
        if FOCUS_KINDS[kind] == "count":  # KL(uniform over every patch || attention)
            assert mask.all()
            term = -image.log().mean(-1) - math.log(patches)
        else:
            term = -((image * mask).sum(-1) + 1e-6).log()
        terms.setdefault(FOCUS_KINDS[kind], []).append(term)
    model.set_attn_implementation("sdpa")
    return torch.stack(logits), {kind: torch.cat(parts) for kind, parts in terms.items()}


def test_packed_training_equals_separate_sequences():
    from st3_scenes.model import ScenesSpec, build_scenes_model
    from st3_scenes.train import make_batch, packed_logits

    spec = ScenesSpec(**TRAINING_SPEC)
    model = build_scenes_model(spec).eval()
    batch = make_batch(build_processor().tokenizer, [11, 12], questions=2, caption_weight=2.0,
                       image_tokens=spec.image_tokens)  # fmt: skip
    lengths = (batch.suffix_ids != batch.pad_id).sum(1)
    assert lengths.max() > 2 * lengths.min(), "captions and questions share a packed sequence"
    with torch.no_grad():
        packed, focus_terms = packed_logits(model, batch)
        reference, _ = run_one_by_one(model, batch)
    assert focus_terms == {}
    supervised = torch.arange(batch.suffix_ids.shape[1])[None] < lengths[:, None]
    torch.testing.assert_close(packed[supervised], reference[supervised], atol=1e-5, rtol=1e-4)


def test_word_focus_targets_the_objects_each_colour_or_shape_word_names():
    from st3_scenes.train import FOCUS_KINDS, make_batch, patch_cells

    tokenizer = build_processor().tokenizer
    seeds = list(range(40, 46))
    batch = make_batch(tokenizer, seeds, questions=8, caption_weight=0, image_tokens=324, word_focus=True)
    assert make_batch(tokenizer, seeds, questions=8, caption_weight=0, image_tokens=324).focus_kind.tolist() == [
        k for k in batch.focus_kind.tolist() if FOCUS_KINDS[k] != "word"
    ], "the flag only adds the word targets"
    scene_of_row = torch.arange(len(seeds)).repeat_interleave(batch.repeats).tolist()
    cell_of_patch = patch_cells(324, 8)
    words = 0
    for row, pos, mask, kind in zip(batch.focus_rows.tolist(), batch.focus_pos.tolist(), batch.focus_mask,
                                    batch.focus_kind.tolist()):  # fmt: skip
        if FOCUS_KINDS[kind] != "word":
            continue
        words += 1
        tokens = tokenizer.convert_ids_to_tokens(batch.suffix_ids[row].tolist())
        word = tokens[pos]
        assert word in COLOURS + SHAPES and pos < tokens.index("assistant"), "a colour or shape word of the question"
        named = {(o.row, o.col) for o in scene(seeds[scene_of_row[row]]).objects if word in (o.colour, o.shape)}
        assert named and set(cell_of_patch[mask].tolist()) == {r * GRID + c for r, c in named}
    assert words > 10


def test_objects_lie_in_their_cells_and_patch_labels_describe_the_cell():
    from st3_scenes.train import LABEL_HEADS, patch_labels

    heads = [name for name, _ in LABEL_HEADS]
    singular = {plural: shape for shape, plural in PLURALS.items()}
    side, cell = IMAGE_SIZE // 8, IMAGE_SIZE // GRID
    assert side % GRID == 0, "grid cells are whole patches"
    for seed in range(30):
        sc = scene(seed)
        assert sc.owner.shape == (IMAGE_SIZE, IMAGE_SIZE)
        labels = patch_labels(sc, side * side, 8).view(side, side, len(heads))
        options = candidates(sc)
        directions = [qa for kind in ("left_of", "right_of", "above", "below") for qa in options.get(kind, [])]
        for index, o in enumerate(sc.objects):
            ys, xs = (sc.owner == index).nonzero()
            assert len(ys) > 100, "every object is drawn"
            assert (ys // cell).min() == o.row == (ys // cell).max(), "drawn inside its own grid cell"
            assert (xs // cell).min() == o.col == (xs // cell).max()
            centre = dict(zip(heads, labels[int(ys.mean()) // 8, int(xs.mean()) // 8].tolist()))
            want = [COLOURS.index(o.colour) + 1, SHAPES.index(o.shape) + 1, SIZES.index(o.size) + 1]
            if o.shape not in ("cross", "star"):  # thin shapes may leave their centre patch
                assert [centre["object_colour"], centre["object_shape"], centre["object_size"]] == want
        for r in range(side):
            for c in range(side):
                row, col = r * GRID // side, c * GRID // side
                got = dict(zip(heads, labels[r, c].tolist()))
                assert (got["row"], got["col"]) == (row, col)
                o = sc.at(row, col)
                want = (0, 0, 0) if o is None else (
                    COLOURS.index(o.colour) + 1, SHAPES.index(o.shape) + 1, SIZES.index(o.size) + 1)  # fmt: skip
                assert (got["colour"], got["shape"], got["size"]) == want
                for kind in ("count_colour", "count_shape", "count_all"):  # the count labels answer the counts
                    for qa in options[kind]:
                        name = "all" if kind == "count_all" else qa.question.split()[2]
                        name = singular.get(name, name)
                        assert NUMBERS[got[f"count_{name}"]] == qa.answer
                for qa in directions:  # the neighbour labels answer the direction questions about the cell
                    if qa.focus == ((row, col),):
                        assert got[f"{qa.kind}_shape"] == (0 if qa.answer == NOTHING else SHAPES.index(qa.answer) + 1)


@pytest.mark.parametrize(
    "count_layer, rope_theta, word",
    [(None, 1e4, False), (0, 1e6, True)],
    ids=["cells", "cells+counts+words, rope base 1e6"],
)
def test_focus_attention_matches_eager_attention(count_layer, rope_theta, word):
    from st3_scenes.model import ScenesSpec, build_scenes_model
    from st3_scenes.train import FOCUS_KINDS, focus_heads_for, make_batch, packed_logits

    spec = ScenesSpec(**TRAINING_SPEC, rope_theta=rope_theta)
    model = build_scenes_model(spec).eval()
    counts = count_layer is not None
    batch = make_batch(build_processor().tokenizer, [21, 22], questions=6, caption_weight=1.5,
                       image_tokens=spec.image_tokens, count_focus=counts, word_focus=word)  # fmt: skip
    kinds = [FOCUS_KINDS[k] for k in batch.focus_kind.tolist()]
    assert {"position", "content"} <= set(kinds) and ("count" in kinds) == counts and ("word" in kinds) == word
    with torch.no_grad():
        _, terms = packed_logits(model, batch, focus=focus_heads_for(1, 2, count_layer, word=word))
        _, reference = run_one_by_one(model, batch, count_layer)
    assert terms.keys() == reference.keys() == set(kinds)
    for kind in terms:
        torch.testing.assert_close(terms[kind], reference[kind], atol=1e-5, rtol=1e-4)


def test_packed_training_has_the_gradients_of_separate_sequences():
    from st3_scenes.model import ScenesSpec, build_scenes_model
    from st3_scenes.train import focus_heads_for, focus_loss_of, loss_of, make_batch, packed_logits

    spec = ScenesSpec(**TRAINING_SPEC, text_head_dim=16)
    model = build_scenes_model(spec)
    batch = make_batch(build_processor().tokenizer, [31, 32, 33], questions=4, caption_weight=1.5,
                       image_tokens=spec.image_tokens, count_focus=True)  # fmt: skip
    grads = []
    for packed in (True, False):
        model.zero_grad()
        if packed:
            logits, focus_terms = packed_logits(model, batch, focus=focus_heads_for(1, 2, 0))
            focus_loss = focus_loss_of(focus_terms)
        else:
            logits, reference_terms = run_one_by_one(model, batch, count_layer=0)
            focus_loss = focus_loss_of(reference_terms)
        (loss_of(logits, batch)[0] + focus_loss).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert grads[1].abs().max() > 0 and len(grads[0]) == len(grads[1])
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-3)
